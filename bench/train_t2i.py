"""Tokens/s of the text-to-image training step under Ray Train + DeepSpeed (1 worker) vs a plain PyTorch loop.

    python bench/train_t2i.py            # tiny and mid, micro-batch 2, ZeRO-2, 2 warm-up + 10 steps, 5 rounds
    python bench/train_t2i.py --models mid --steps 30 --zero-stage 3 --worker-niceness 0

Every side does the same math: `T2IStep` (the step `jobs/train_t2i.py` runs) on the same seeded `T2IModel`
with the same fixed batch (left-padded captions of different lengths, random image tokens, the teacher-forcing
features of the frozen quantizer), the official optimiser (AdamW with decoupled decay, no decay on norms,
biases and the two tables, clipping at 0.5), the loss normalised by the batch's supervised tokens, fp32, the
same torch thread count (`--threads`, default all cores).

- plain: `T2IStep` over a `LocalEngine` (torch AdamW over `param_groups`) in this process;
- DS no Ray (left out with --no-split): `deepspeed.initialize` with the job's `ds_config` and param groups, in
  this process on a one-process gloo group;
- Ray+DS: the same inside a Ray Train `TorchTrainer` worker (CPU, gloo) on a Ray of its own.

The sides take turns in interleaved rounds (`bench/step_harness.py`). Tokens/s counts every sequence position
(text, image, `</img>`, EOS) of the micro-batch per step.

Models (a Llama decoder built from a config, random weights):
- tiny: the `t2i_tiny` decoder (hidden 64, 2 layers), the tiny tokenizer's 5 scales (121 tokens), 1,024 codes,
  32 text tokens;
- mid: hidden 512, 4 layers, 8 heads, MLP 1,376, a 32,000-word text vocabulary, and the released layout of the
  clipb_256 tokenizer: 9 scales (817 image tokens), 32,768 codes, 64 text tokens.
"""

from __future__ import annotations

import os
import time

import step_harness
import torch
from step_harness import ms

from tokenflow.config import QuantizerConfig, preset

SEED = 0

MODELS = {
    "tiny": {
        "llm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        "kv_heads": 2,
        "text_vocab": 1000,
        "text_tokens": 32,
        "quantizer": lambda: preset("tiny").quantizer,
    },
    "mid": {
        "llm": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
        "kv_heads": 8,
        "text_vocab": 32000,
        "text_tokens": 64,
        "quantizer": lambda: preset("clipb_256").quantizer,
    },
}


def build(model: str, micro_batch: int):
    """(T2IModel, quantizer, layout, fixed batch), seeded: identical in the driver and the worker."""
    from dataclasses import replace

    from tokenflow.llm.layout import T2ILayout
    from tokenflow.llm.t2i import T2IConfig, T2IModel, decoder_config
    from tokenflow.quantize import MultiScaleQuantizer

    spec = MODELS[model]
    qcfg: QuantizerConfig = replace(spec["quantizer"](), scale_drop_prob=0.0)
    torch.manual_seed(SEED)
    quantizer = MultiScaleQuantizer(qcfg).eval().requires_grad_(False)
    llm = decoder_config(
        **spec["llm"], num_key_value_heads=spec["kv_heads"], vocab_size=spec["text_vocab"], max_position_embeddings=2048
    )
    t2i = T2IModel(T2IConfig(llm=llm, scales=qcfg.scales, codebook_size=qcfg.codebook_size, code_dim=40))
    layout = T2ILayout(
        scales=qcfg.scales,
        eos_id=2,
        pad_id=0,
        image_open=(5, 6),
        image_close=(7, 8),
        bos_id=1,
        max_text_tokens=spec["text_tokens"],
    )
    g = torch.Generator().manual_seed(SEED)
    captions = []
    for i in range(micro_batch):  # lengths from a quarter to all of the text budget: rows with padding
        n = max(1, (spec["text_tokens"] - 1) * (i + 1) // micro_batch)
        captions.append(torch.randint(10, spec["text_vocab"], (n,), generator=g).tolist())
    ids, valid = T2ILayout.stack([layout.prefix(c) for c in captions])
    tokens = torch.randint(0, qcfg.codebook_size, (micro_batch, layout.image_tokens), generator=g)
    batch = {"prefix_ids": ids, "prefix_valid": valid, "tokens": tokens}
    return t2i, quantizer, layout, batch


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6


class Runner:
    """Builds each model's `T2IStep` on first use (a LocalEngine or a DeepSpeed engine) and runs blocks of steps
    on it."""

    def __init__(self, engines: str, config: dict):
        self.engines, self.config = engines, config
        self.steps: dict[str, tuple] = {}
        torch.set_num_threads(config["threads"])

    def _build(self, model: str):
        from pipelines.train_t2i import _official_optimizer, param_groups
        from tokenflow.llm.t2i_step import T2IStep, supervised_count
        from tokenflow.train import LocalEngine

        t2i, quantizer, layout, batch = build(model, self.config["micro_batch"])
        opt = _official_optimizer()
        groups = param_groups(t2i, opt.weight_decay)
        if self.engines == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed

            from tokenflow.train.deepspeed import ds_config
            from tokenflow.train.engine import lr_schedule

            ds = ds_config(
                opt,
                zero_stage=self.config["zero_stage"],
                micro_batch=self.config["micro_batch"],
                grad_accum=1,
                world_size=1,
                bf16=False,
            )
            schedule = lr_schedule(opt, 100_000)
            engine, *_ = deepspeed.initialize(model=t2i, model_parameters=groups, config=ds, lr_scheduler=schedule)
        else:
            engine = LocalEngine(t2i, opt, max_steps=100_000, param_groups=groups)
        step = T2IStep(engine, quantizer, layout)
        positions = batch["tokens"].shape[0] * (layout.prefix_len + layout.image_tokens + len(layout.suffix))
        return step, batch, float(supervised_count(batch, layout)), positions, params_m(t2i)

    def run(self, model: str, n: int) -> dict:
        """Seconds and loss (per supervised token) of each of n steps."""
        if model not in self.steps:
            self.steps[model] = self._build(model)
        step, batch, count, positions, params = self.steps[model]
        times, losses = [], []
        for _ in range(n):
            start = time.perf_counter()
            sums = step([batch], count)
            times.append(time.perf_counter() - start)
            losses.append(float(sums["loss_sum"]) / count)
        return {"times": times, "losses": losses, "params": [params, positions], "threads": torch.get_num_threads()}

    def free(self, model: str) -> None:
        self.steps.pop(model, None)


def describe(model: str, results: dict) -> list[tuple[str, int, str]]:
    params, positions = results["plain"][model]["params"]
    plain_s = ms(results["plain"][model]["times"])[0] / 1e3  # medians
    ray_s = ms(results["ray"][model]["times"])[0] / 1e3
    return [
        ("params M", 10, f"{params:.1f}"),
        ("tok/step", 10, str(positions)),
        ("tok/s plain", 13, f"{positions / plain_s:.0f}"),
        ("tok/s Ray+DS", 14, f"{positions / ray_s:.0f}"),
    ]


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n")[0]
    what = "fixed batch, fp32, official AdamW recipe"
    return step_harness.main(
        doc, Runner, list(MODELS), argv, what=what, describe=describe, steps=10, warmup=2, micro_batch=2
    )


if __name__ == "__main__":
    raise SystemExit(main())
