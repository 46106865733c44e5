"""Step time of the tokenizer training step under Ray Train + DeepSpeed (1 worker) vs a plain PyTorch loop.

    python bench/train_step.py          # tiny and mid, micro-batch 4, ZeRO-2, 3 warm-up + 20 steps, 5 rounds
    python bench/train_step.py --models mid --steps 50 --zero-stage 0 --worker-niceness 0

Every side does the same math: the same seeded tokenizer and discriminator (`TokenizerLoss`, PatchGAN, no
LPIPS as there are no VGG weights offline), the same fixed random batch, the full stage with its semantic
teacher, the discriminator on from step 0 (disc_start 0, so its forward, backward and step are timed too),
scale drop off, fp32, the same torch thread count (`--threads`, default all cores).

- plain: `TrainStep` over two `LocalEngine`s (torch Adam, clipping) in this process;
- DS no Ray (left out with --no-split): `build_engines(zero_stage=Z)` + `TrainStep` in this process too, on a
  one-process gloo group: splits the overhead into DeepSpeed's share and Ray's;
- Ray+DS: a `TorchTrainer` with one CPU worker (gloo) on a Ray of its own (`address="local"`), running
  `build_engines` + `TrainStep`.

Each step is timed with `time.perf_counter` around `step(pixels, s)`; the sides take turns in interleaved
rounds (`bench/step_harness.py`, shared with `bench/train_t2i.py`, says how).

The table gives the median (and mean) ms/step, the overhead (Ray+DS / plain - 1) on medians against the goal
of at most 15 %, and the largest relative difference from plain of the total loss over the first two steps: a
check that the sides do the same math. Later steps drift apart on any side: ZeRO's flat buffers round in a
different order, and this training from random init amplifies last-bit differences (weights nudged by 1e-7
after step 0 change some step-1 gradients by 1 %, in the plain loop alone). Ray starts its workers with
niceness 15 (`worker_niceness`), so on a busy machine they yield to everything else: `--worker-niceness 0`.

The "mid" tokenizer is the tiny preset scaled up to roughly 0.5-2 s per step on a 2-core CPU at micro-batch
4: 128 px, a 192-wide 4-layer ViT (patch 16), a 5-level pixel CNN of width 32 with 2 residual blocks per
level, a codebook of 4,096, the same 8 x 8 grid and scales as tiny.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import step_harness
import torch

from tokenflow.config import TokenizerConfig, preset

SEED = 0


def tiny_config() -> TokenizerConfig:
    cfg = preset("tiny")
    return replace(cfg, quantizer=replace(cfg.quantizer, scale_drop_prob=0.0))


def mid_config() -> TokenizerConfig:
    cfg = tiny_config()
    cnn = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=64, norm_groups=16)  # stride 16
    return replace(
        cfg,
        image_size=128,
        quantizer=replace(cfg.quantizer, codebook_size=4096),
        semantic_encoder=replace(
            cfg.semantic_encoder, image_size=128, patch_size=16, width=192, layers=4, heads=3, output_dim=128
        ),
        semantic_decoder=replace(cfg.semantic_decoder, width=192, depth=2, heads=3),
        pixel_encoder=replace(cfg.pixel_encoder, **cnn),
        pixel_decoder=replace(cfg.pixel_decoder, **cnn),
    )


MODELS = {"tiny": tiny_config, "mid": mid_config}


def build(model: str, micro_batch: int):
    """(tokenizer, teacher, loss, train config, fixed batch), seeded: identical in the driver and the worker."""
    from tokenflow import Tokenizer
    from tokenflow.losses import LossConfig, TokenizerLoss
    from tokenflow.train import OptimizerConfig, TrainConfig

    cfg = MODELS[model]()
    torch.manual_seed(SEED)
    tok = Tokenizer(cfg)
    teacher = tok.make_teacher()
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0.0, disc_start=0))
    opt = OptimizerConfig(lr=1e-4)
    train_cfg = TrainConfig(max_steps=100_000, generator=opt, discriminator=opt, loss=loss_fn.cfg)
    g = torch.Generator().manual_seed(SEED)
    pixels = torch.rand(micro_batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    return tok, teacher, loss_fn, train_cfg, pixels


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6


class Runner:
    """Builds each model's `TrainStep` on first use (LocalEngines or DeepSpeed engines) and runs blocks of
    steps on it, its step count running on from block to block."""

    def __init__(self, engines: str, config: dict):
        self.engines, self.config = engines, config
        self.steps: dict[str, tuple] = {}
        self.done: dict[str, int] = {}
        torch.set_num_threads(config["threads"])

    def _build(self, model: str):
        from tokenflow.train import LocalEngine, TrainStep

        tok, teacher, loss_fn, cfg, pixels = build(model, self.config["micro_batch"])
        if self.engines == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            from tokenflow.train.deepspeed import build_engines

            stage, micro_batch = self.config["zero_stage"], self.config["micro_batch"]
            gen, disc = build_engines(tok, loss_fn, cfg, zero_stage=stage, micro_batch=micro_batch, world_size=1)
        else:
            gen = LocalEngine(tok, cfg.generator, max_steps=cfg.max_steps, grad_accum=cfg.grad_accum)
            disc = LocalEngine(
                loss_fn.discriminator, cfg.discriminator, max_steps=cfg.max_steps, grad_accum=cfg.grad_accum
            )
        step = TrainStep(tok, loss_fn, gen, disc, teacher=teacher, stage=cfg.stage)
        return step, pixels, (params_m(tok), params_m(loss_fn.discriminator))

    def run(self, model: str, n: int) -> dict:
        """Seconds and total loss of each of n steps (time.perf_counter around each call)."""
        if model not in self.steps:
            self.steps[model] = self._build(model)
            self.done[model] = 0
        step, pixels, params = self.steps[model]
        times, losses = [], []
        for _ in range(n):
            start = time.perf_counter()
            metrics = step(pixels, self.done[model])
            times.append(time.perf_counter() - start)
            losses.append(metrics["loss/total"])
            self.done[model] += 1
        return {"times": times, "losses": losses, "params": params, "threads": torch.get_num_threads()}

    def free(self, model: str) -> None:
        self.steps.pop(model, None)


def describe(model: str, results: dict) -> list[tuple[str, int, str]]:
    g, d = results["plain"][model]["params"]
    return [("px", 5, str(MODELS[model]().image_size)), ("params M G + D", 16, f"{g:.2f} + {d:.2f}")]


def main(argv: list[str] | None = None) -> int:
    what = "fixed random batch, fp32, full stage with teacher, discriminator from step 0, no LPIPS"
    doc = __doc__.split("\n\n")[0]
    return step_harness.main(
        doc, Runner, list(MODELS), argv, what=what, describe=describe, steps=20, warmup=3, micro_batch=4
    )


if __name__ == "__main__":
    raise SystemExit(main())
