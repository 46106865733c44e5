"""Typed training configs. Defaults follow the official tokenizer recipe (shared/reference/tokenflow.md §2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tokenflow.losses import LossConfig

Stage = Literal["full", "decoder", "enhanced_decoder"]
STAGES: tuple[str, ...] = ("full", "decoder", "enhanced_decoder")


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam and its learning-rate schedule, for one of the two models (generator or discriminator)."""

    lr: float = 1e-4
    """Peak learning rate (official: 1e-4 for both models)."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    """Official: none (its --weight-decay flag is unused)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimiser steps (official: none)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant (official) or cosine decay to min_lr_ratio * lr at max_steps."""
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (official: 1.0); 0 disables it."""
    decoupled_weight_decay: bool = False
    """AdamW (decay applied to the weights directly, as HF's Trainer does) instead of Adam's L2 term."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("lr must be > 0, warmup_steps and max_grad_norm >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("min_lr_ratio must be in [0, 1]")


@dataclass(kw_only=True)
class TrainConfig:
    """What one training run does, independent of where it runs (one process or Ray Train + DeepSpeed)."""

    stage: Stage = "full"
    """full: every weight but the frozen teacher; decoder: only the pixel decoder trains, and nothing else is
    computed with gradients (no teacher, semantic decoder or VQ losses); enhanced_decoder: the pixel decoder is
    replaced by the 2x wide, 2x deep one and trained from scratch as in the decoder stage."""
    max_steps: int = 100_000
    """Optimiser steps (each of grad_accum micro-batches)."""
    grad_accum: int = 1
    generator: OptimizerConfig = field(default_factory=OptimizerConfig)
    discriminator: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.max_steps < 1 or self.grad_accum < 1:
            raise ValueError("max_steps and grad_accum must be >= 1")
