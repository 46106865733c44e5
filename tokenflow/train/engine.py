"""`LocalEngine`: the subset of DeepSpeed's engine interface the training step uses, for one process.

    engine.backward(loss)   # loss / grad_accum, backward
    engine.step()           # at every grad_accum-th call: clip, optimiser step, lr schedule, zero grads

which is what `deepspeed.initialize(...)` returns on a cluster (with `gradient_accumulation_steps` and
`gradient_clipping` in its config), so the step is written once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenflow.train.config import OptimizerConfig


def lr_factor(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based): linear warm-up over warmup_steps, then
    constant or cosine down to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(cfg: OptimizerConfig, max_steps: int):
    """optimizer -> its `lr_factor` schedule (a LambdaLR): what `LocalEngine` builds, and what
    `deepspeed.initialize(lr_scheduler=...)` takes."""

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, max_steps))

    return schedule


class LocalEngine:
    """Adam (or AdamW) over a module's trainable parameters with DeepSpeed's call/backward/step semantics."""

    def __init__(
        self,
        module: nn.Module,
        cfg: OptimizerConfig,
        *,
        max_steps: int,
        grad_accum: int = 1,
        param_groups: list[dict] | None = None,
    ):
        """`param_groups`: torch optimiser groups (e.g. no weight decay on norms), as DeepSpeed's
        `model_parameters`; default: every trainable parameter of `module` in one group."""
        self.module = module
        self.cfg = cfg
        self.grad_accum = grad_accum
        groups = param_groups if param_groups is not None else [{"params": module.parameters()}]
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError(f"{type(module).__name__} has no trainable parameters")
        adam = torch.optim.AdamW if cfg.decoupled_weight_decay else torch.optim.Adam
        self.optimizer = adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.scheduler = lr_schedule(cfg, max_steps)(self.optimizer)
        self.micro_steps = 0
        self.global_steps = 0
        self.grad_norm: float | None = None
        """Global gradient norm before clipping at the last optimiser step."""

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]
