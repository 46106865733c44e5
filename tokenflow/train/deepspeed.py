"""DeepSpeed engines for the training step: one for the tokenizer (generator), one for the discriminator.

    gen, disc = build_engines(tok, loss_fn, cfg, zero_stage=2, micro_batch=8, world_size=ws)
    step = TrainStep(tok, loss_fn, gen, disc, teacher=teacher, stage=cfg.stage)

Each engine gets its own optimiser (`torch.optim.Adam` built by DeepSpeed from the config: `torch_adam`, so no
CPU-Adam or fused-Adam kernel is compiled), the same lr schedule as `LocalEngine` (`lr_factor`), gradient
clipping and accumulation from `TrainConfig`, and ZeRO stage 0-3. bf16 is used on GPUs; on CPU everything stays
fp32 (the quantizer always runs in fp32). The frozen teacher is never given to DeepSpeed, so it holds no
optimiser state and is not partitioned.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenflow.losses import TokenizerLoss
from tokenflow.train.config import OptimizerConfig, TrainConfig
from tokenflow.train.engine import lr_schedule


def ds_config(
    opt: OptimizerConfig, *, zero_stage: int, micro_batch: int, grad_accum: int, world_size: int, bf16: bool
) -> dict:
    """The DeepSpeed config dict of one engine."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": float(opt.max_grad_norm),
        "optimizer": {
            "type": "AdamW" if opt.decoupled_weight_decay else "Adam",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "weight_decay": opt.weight_decay,
                "torch_adam": True,
                "adam_w_mode": opt.decoupled_weight_decay,
            },
        },
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 1 << 30,  # progress goes to MLflow, not DeepSpeed's log
    }


def zero3_external_params(tok: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """(module, parameter) pairs where a module's forward reads a parameter owned by a child whose own forward
    it never calls. ZeRO-3 gathers a partitioned parameter only around its owner's forward, so each of these
    must be registered as external to the module that reads it (`deepspeed.zero.register_external_parameter`).
    """
    from tokenflow.encoders import vit, vitamin
    from tokenflow.encoders.semantic import SemanticEncoder

    pairs = []
    for module in tok.modules():
        if isinstance(module, SemanticEncoder):  # class token, position tables of the tower and its timm trunk
            owners = [module.visual] + ([module.visual.trunk] if module.is_timm else [])
            pairs += [(module, p) for owner in owners for p in owner.parameters(recurse=False)]
        elif isinstance(module, (vit.Attention, vitamin.PlainAttention)):  # qkv weight with the q/v bias
            pairs.append((module, module.qkv.weight))
    return pairs


def build_engines(
    tok: nn.Module,
    loss_fn: TokenizerLoss,
    cfg: TrainConfig,
    *,
    zero_stage: int,
    micro_batch: int,
    world_size: int,
    bf16: bool | None = None,
):
    """(generator engine, discriminator engine). `bf16` defaults to "on CUDA"."""
    import deepspeed

    if bf16 is None:
        bf16 = torch.cuda.is_available()
    if zero_stage == 3 and loss_fn.cfg.adaptive_gan_weight:
        raise ValueError("adaptive_gan_weight reads the decoder's last weight directly, which ZeRO-3 partitions")
    engines = []
    for module, opt in ((tok, cfg.generator), (loss_fn.discriminator, cfg.discriminator)):
        config = ds_config(
            opt,
            zero_stage=zero_stage,
            micro_batch=micro_batch,
            grad_accum=cfg.grad_accum,
            world_size=world_size,
            bf16=bf16,
        )
        params = [p for p in module.parameters() if p.requires_grad]
        schedule = lr_schedule(opt, cfg.max_steps)
        engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config, lr_scheduler=schedule)
        if zero_stage == 3:
            for owner, param in zero3_external_params(module):
                deepspeed.zero.register_external_parameter(owner, param)
        engines.append(engine)
    return engines[0], engines[1]
