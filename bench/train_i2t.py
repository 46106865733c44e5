"""Samples/s of the image-to-text training step: from token shards vs the image tokenizer's encoder in the loop,
and under Ray Train + DeepSpeed (1 worker) vs a plain PyTorch loop.

    python bench/train_i2t.py                    # both comparisons, tiny and mid, micro-batch 4, sft, ZeRO-2
    python bench/train_i2t.py --compare encoder --models mid --encoder-steps 6 --mid-preset siglip_384
    python bench/train_i2t.py --compare ray --steps 30 --zero-stage 3 --worker-niceness 0

Every side does the same math: `I2TStep` (the step `jobs/train_i2t.py` runs) on the same seeded `I2TModel` built
by the job's own `build_model` (`--stage`: sft trains the decoder and the projector, align the projector only),
the same fixed micro-batch in the job's format (`I2TBatches.take()`: right-padded conversations with a mix of
prompt and answer lengths, one image each, placed inside the prompt), the stage's optimiser
(`TrainI2TConfig.optimizer`: AdamW, no decay on norms and biases, clipping at 1), the loss normalised by the
batch's supervised tokens, fp32, the same torch thread count (`--threads`, default all cores).

1. From shards vs encoder in the loop (`--compare encoder`), both sides a plain PyTorch loop (`LocalEngine`) in
   this process, timed in interleaved rounds (the order rotating):
   - from shards: the batch carries the images' token indices and the step maps them to features with
     `Tokenizer.features` (what our job does: the tokens come from the pretokenize job's shards);
   - encoder in the loop: the batch carries the preprocessed pixels and the step runs `Tokenizer.encode` (the
     semantic and pixel encoders and the multi-scale quantizer, no gradient) and then `Tokenizer.features` on them
     every step: what the official code does by running its vision tower (the full TokenFlow-XL `encode`) in the
     training loop. The tokens of the other side are this side's, so both see the same features and losses.
   Neither side times data loading (reading shards, decoding and resizing images): both read a fixed batch.
2. Ray Train + DeepSpeed vs a plain loop (`--compare ray`), through the shared harness (`bench/step_harness.py`):
   - plain: `I2TStep` over a `LocalEngine` (torch AdamW over `param_groups`) in this process;
   - DS no Ray (left out with --no-split): `deepspeed.initialize` with the job's `ds_config` and param groups, in
     this process on a one-process gloo group;
   - Ray+DS: the same inside a Ray Train `TorchTrainer` worker (CPU, gloo) on a Ray of its own.
   The features come from the token indices (`MultiScaleQuantizer.features`, the math of `Tokenizer.features`:
   the rest of the tokenizer, hundreds of MB for mid, is not built on every side).

Models (random weights; the image rows are the tokenizer's final grid, g * g):
- tiny: the `tiny` tokenizer preset (64 px, 8 x 8 = 64 image rows, 1,024 codes) and the decoder of
  `jobs/configs/i2t_tiny.yaml` (Llama, hidden 64, 2 layers) over the bundled deepseek text vocabulary (129,280),
  as the tiny job builds it;
- mid: the architecture of the `clipb_256` preset (CLIP ViT-B/16 and the VQGAN pixel encoder at 256 px, 9 scales,
  16 x 16 = 256 image rows, 32,768 codes) and a Llama decoder of hidden 512, 4 layers, 8 heads, MLP 1,376 over a
  32,000-word vocabulary (Vicuna's). `--mid-preset siglip_384` takes TokenFlow-XL's tokenizer (SigLIP-SO400M at
  384 px, 27 x 27 = 729 image rows) instead: some 5 times slower to encode (about 25 s per micro-batch of 4 on a
  2-core CPU, against 5 s), too slow for the default run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import step_harness
import torch
import yaml
from step_harness import ms

SEED = 0
MAX_STEPS = 100_000  # the schedule's length: only its first steps run (the lr is in its warm-up throughout)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "jobs", "configs", "i2t_tiny.yaml")) as _fh:
    TINY_LLM = yaml.safe_load(_fh)["llm_config"]  # read here: the Ray worker gets it by value

MODELS = {
    "tiny": {"tokenizer": "tiny", "llm": TINY_LLM, "text_vocab": "deepseek"},
    "mid": {
        "tokenizer": None,  # --mid-preset
        "llm": dict(
            model_type="llama",
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
        "text_vocab": 32000,
    },
}

# (prompt, answer) text tokens of the micro-batch's samples, repeated for a larger one: a short caption, a long
# answer, a middling pair, a long explanation (LLaVA-665k-like spread; the prompt holds the image)
CONVERSATIONS = [(40, 12), (24, 120), (64, 48), (32, 250)]


ENCODER_STEPS = {"tiny": 20, "mid": 4}  # comparison 1's timed steps per side (mid: some 7 s a step with the encoder)


def encoder_steps(model: str, config: dict) -> int:
    return config["encoder_steps"] or ENCODER_STEPS[model]


def tokenizer_preset(model: str, config: dict) -> str:
    return MODELS[model]["tokenizer"] or config["mid_preset"]


def train_config(model: str, config: dict):
    """The job's config of this model: stage, decoder, micro-batch, ZeRO stage (its optimiser and build)."""
    from pipelines.train_i2t import TrainI2TConfig

    return TrainI2TConfig(
        stage=config["stage"],
        llm_config=dict(MODELS[model]["llm"]),
        text_tokenizer="deepseek",
        zero_stage=config["zero_stage"],
        micro_batch=config["micro_batch"],
        grad_accum=1,
        max_steps=MAX_STEPS,
        activation_checkpointing=config["checkpointing"],
        seed=SEED,
    )


def text_vocab(model: str) -> int:
    vocab = MODELS[model]["text_vocab"]
    if vocab == "deepseek":
        from pipelines.llm_train import load_text_tokenizer

        return len(load_text_tokenizer("deepseek", None))
    return vocab


def build_model(model: str, config: dict, scales, code_dim: int, ds: dict | None):
    """(I2TModel, TrainI2TConfig): the job's `build_model`, seeded (identical in the driver and the worker)."""
    from pipelines.train_i2t import build_model as job_build

    cfg = train_config(model, config)
    info = {"scales": list(scales), "code_dim": code_dim}
    return job_build(cfg, info, text_vocab(model), ds), cfg


def make_batch(micro_batch: int, vocab: int, tokens: torch.Tensor) -> dict:
    """The fixed micro-batch in the job's format (`I2TBatches.take()`): sample b is BOS, the first half of its
    prompt, the image, the rest of the prompt, the answer and EOS (supervised: the answer and EOS)."""
    from pipelines.i2t_data import I2TBatches

    g = torch.Generator().manual_seed(SEED)
    rows = []
    for b in range(micro_batch):
        prompt, answer = CONVERSATIONS[b % len(CONVERSATIONS)]
        p = torch.randint(10, vocab, (prompt,), generator=g).tolist()
        a = torch.randint(10, vocab, (answer,), generator=g).tolist() + [2]
        ids = [1] + p + a
        labels = [-100] * (1 + prompt) + a
        rows.append(
            dict(
                input_ids=ids,
                labels=labels,
                image_index=1 + prompt // 2,
                tokens=tokens[b].tolist(),
                length=0,
                truncated=0,
            )
        )
    batches = I2TBatches(None, micro_batch)
    batches._ready = [rows]  # the job's own collation (take), without a Ray Data stream behind it
    return batches.take()


def local_engine(i2t, cfg):
    from pipelines.llm_train import param_groups
    from tokenflow.train import LocalEngine

    opt = cfg.optimizer
    return LocalEngine(i2t, opt, max_steps=MAX_STEPS, param_groups=param_groups(i2t, opt.weight_decay))


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6


def positions(batch: dict, image_rows: int) -> int:
    """Sequence positions of the micro-batch: text tokens and image rows."""
    return int(batch["lengths"].sum()) + image_rows * int(batch["tokens"].shape[0])


# ---- 1. from shards vs encoder in the loop ----------------------------------------------------------------------


def encoder_sides(model: str, config: dict) -> dict:
    """Both sides of one model: {name: (I2TStep, batch, seconds in the features function in the last step, info)}:
    the same tokenizer (random weights), two identical seeded models, each with its own optimiser."""
    from PIL import Image

    from tokenflow import Tokenizer
    from tokenflow.llm.i2t_step import I2TStep

    torch.manual_seed(SEED)
    tok = Tokenizer.from_preset(tokenizer_preset(model, config)).eval().requires_grad_(False)
    size = tok.config.image_size
    gen = torch.Generator().manual_seed(SEED)
    images = []  # photos of assorted shapes, through the tokenizer's own resize and crop (untimed)
    for b in range(config["micro_batch"]):
        h, w = int(size * (1.0 + 0.25 * (b % 3))), int(size * (1.5 - 0.25 * (b % 2)))
        images.append(Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen).numpy()))
    pixels = tok.preprocess(images)
    tokens = tok.encode(pixels)
    sides = {}
    for name in ("shards", "encoder"):
        i2t, cfg = build_model(model, config, tok.scales, tok.code_dim, None)
        batch = make_batch(config["micro_batch"], i2t.llm.config.vocab_size, tokens)
        spent: list[float] = []
        if name == "shards":
            features = tok.features  # token indices -> features
        else:
            batch = {**batch, "tokens": pixels}  # the batch carries the images; the step encodes them

            def features(px, spent=spent):
                start = time.perf_counter()
                out = tok.features(tok.encode(px))
                spent.append(time.perf_counter() - start)
                return out

        step = I2TStep(local_engine(i2t, cfg), features, image_tokens=i2t.config.image_tokens, code_dim=tok.code_dim)
        info = {"params": params_m(i2t), "image_rows": i2t.config.image_tokens}
        sides[name] = (step, batch, spent, info)
    return sides


def run_side(side, n: int, out: dict) -> None:
    step, batch, spent, _ = side
    for _ in range(n):
        spent.clear()
        start = time.perf_counter()
        sums = step([batch], float(batch["supervised"]))
        out["times"].append(time.perf_counter() - start)
        out["encoder"] += spent
        out["losses"].append(float(sums["loss_sum"]) / batch["supervised"])


def compare_encoder(config: dict) -> dict:
    """{model: {side: {times, encoder, losses}, "info": ...}}, the timed steps of both sides in interleaved rounds."""
    torch.set_num_threads(config["threads"])
    results = {}
    for model in config["models"]:
        sides = encoder_sides(model, config)
        names = list(sides)
        out = {name: {"times": [], "encoder": [], "losses": []} for name in names}
        for name in names:
            run_side(sides[name], config["encoder_warmup"], {"times": [], "encoder": [], "losses": out[name]["losses"]})
        steps = encoder_steps(model, config)
        rounds = min(config["rounds"], steps)
        for r in range(rounds):
            share = steps // rounds + (r < steps % rounds)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                run_side(sides[name], share, out[name])
        step, batch, _, info = sides["shards"]
        out["info"] = {
            **info,
            "samples": int(batch["lengths"].shape[0]),
            "positions": positions(batch, step.image_tokens),
        }
        results[model] = out
        a, b = ms(out["shards"]["times"])[0], ms(out["encoder"]["times"])[0]
        print(f"{model}: from shards {a:.0f} ms/step, encoder in the loop {b:.0f}", flush=True)
        del sides
        gc.collect()
    return results


def print_encoder_report(results: dict, config: dict) -> None:
    print()
    print("## 1. from token shards vs the image tokenizer's encoder in the loop (plain PyTorch loop, this process)")
    cols = [
        ("model", 6, ""),
        ("tokenizer", 12, "preset"),
        ("params M", 10, "trained"),
        ("img rows", 10, "per image"),
        ("tok/step", 10, "positions"),
        ("from shards", 15, "ms med/mean"),
        ("samples/s", 11, "median"),
        ("encoder loop", 15, "ms med/mean"),
        ("samples/s", 11, "median"),
        ("of it enc", 11, "ms median"),
        ("speed-up", 10, "samples/s"),
        ("loss diff", 11, "all steps"),
    ]
    print("".join(f"{n:<{w}}" if i == 0 else f"{n:>{w}}" for i, (n, w, _) in enumerate(cols)))
    print("".join(f"{u:>{w}}" for _, w, u in cols))
    for model, out in results.items():
        info = out["info"]
        a_med, a_mean = ms(out["shards"]["times"])
        b_med, b_mean = ms(out["encoder"]["times"])
        enc = ms(out["encoder"]["encoder"])[0]
        n = info["samples"]
        diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(out["shards"]["losses"], out["encoder"]["losses"]))
        values = [
            tokenizer_preset(model, config),
            f"{info['params']:.3g}",
            str(info["image_rows"]),
            str(info["positions"]),
            f"{a_med:.0f} / {a_mean:.0f}",
            f"{n / a_med * 1e3:.2f}",
            f"{b_med:.0f} / {b_mean:.0f}",
            f"{n / b_med * 1e3:.2f}",
            f"{enc:.0f}",
            f"x{b_med / a_med:.2f}",
            f"{diff:.1e}",
        ]
        print(f"{model:<6}" + "".join(f"{v:>{w}}" for (_, w, _), v in zip(cols[1:], values)))
    print(
        "# speed-up = samples/s from shards / samples/s with the encoder in the loop (medians); of it enc: the"
        " median time of encode + features inside an encoder-loop step"
    )
    print("# loss diff: largest relative difference of the two sides' losses, step by step (the same features)")


# ---- 2. Ray Train + DeepSpeed vs a plain loop ----------------------------------------------------------------------


class Runner:
    """The harness's Runner: builds each model's `I2TStep` on first use (a LocalEngine or a DeepSpeed engine) and
    runs blocks of steps on it."""

    def __init__(self, engines: str, config: dict):
        self.engines, self.config = engines, config
        self.steps: dict[str, tuple] = {}
        torch.set_num_threads(config["threads"])

    def _build(self, model: str):
        from dataclasses import replace

        from tokenflow.config import preset
        from tokenflow.llm.i2t_step import I2TStep
        from tokenflow.quantize import MultiScaleQuantizer

        qcfg = replace(preset(tokenizer_preset(model, self.config)).quantizer, scale_drop_prob=0.0)
        torch.manual_seed(SEED)
        quantizer = MultiScaleQuantizer(qcfg).eval().requires_grad_(False)

        def features(indices):  # Tokenizer.features without the rest of the tokenizer
            return quantizer.features(indices).flatten(2).transpose(1, 2)

        cfg = train_config(model, self.config)
        opt = cfg.optimizer
        if self.engines == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed

            from pipelines.llm_train import param_groups
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
            i2t, _ = build_model(model, self.config, qcfg.scales, qcfg.code_dim, ds)
            schedule = lr_schedule(opt, MAX_STEPS)
            groups = param_groups(i2t, opt.weight_decay)
            engine, *_ = deepspeed.initialize(model=i2t, model_parameters=groups, config=ds, lr_scheduler=schedule)
        else:
            i2t, _ = build_model(model, self.config, qcfg.scales, qcfg.code_dim, None)
            engine = local_engine(i2t, cfg)
        params = params_m(i2t)  # under ZeRO-3 only the partitions: counted from the plain side (describe)
        g = torch.Generator().manual_seed(SEED)
        tokens = torch.randint(0, qcfg.codebook_size, (self.config["micro_batch"], qcfg.tokens_per_image), generator=g)
        batch = make_batch(self.config["micro_batch"], i2t.llm.config.vocab_size, tokens)
        rows = qcfg.scales[-1] ** 2
        step = I2TStep(engine, features, image_tokens=rows, code_dim=qcfg.code_dim)
        return step, batch, params, positions(batch, rows)

    def run(self, model: str, n: int) -> dict:
        """Seconds and loss (per supervised token) of each of n steps."""
        if model not in self.steps:
            self.steps[model] = self._build(model)
        step, batch, params, tokens = self.steps[model]
        count = float(batch["supervised"])
        times, losses = [], []
        for _ in range(n):
            start = time.perf_counter()
            sums = step([batch], count)
            times.append(time.perf_counter() - start)
            losses.append(float(sums["loss_sum"]) / count)
        samples = int(batch["lengths"].shape[0])
        return {
            "times": times,
            "losses": losses,
            "params": [params, tokens, samples],
            "threads": torch.get_num_threads(),
        }

    def free(self, model: str) -> None:
        self.steps.pop(model, None)


def describe(model: str, results: dict) -> list[tuple[str, int, str]]:
    params, tokens, samples = results["plain"][model]["params"]
    plain_s = ms(results["plain"][model]["times"])[0] / 1e3  # medians
    ray_s = ms(results["ray"][model]["times"])[0] / 1e3
    return [
        ("params M", 10, f"{params:.3g}"),
        ("tok/step", 10, str(tokens)),
        ("smp/s plain", 13, f"{samples / plain_s:.2f}"),
        ("smp/s Ray+DS", 14, f"{samples / ray_s:.2f}"),
    ]


# ---- the run ---------------------------------------------------------------------------------------------------


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n")[0]
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument(
        "--compare", choices=["all", "encoder", "ray"], default="all", help="1. encoder, 2. ray, or both (default)"
    )
    own.add_argument("--stage", choices=["sft", "align"], default="sft", help="what trains (default sft: all)")
    own.add_argument(
        "--mid-preset",
        choices=["clipb_256", "siglip_384", "clipb_224"],
        default="clipb_256",
        help="the mid model's tokenizer architecture (default clipb_256; siglip_384 is TokenFlow-XL's)",
    )
    own.add_argument(
        "--encoder-steps", type=int, help=f"timed steps per side in comparison 1 (default {ENCODER_STEPS})"
    )
    own.add_argument("--encoder-warmup", type=int, default=1, help="untimed steps per side in comparison 1")
    own.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the decoder")
    args, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    if "-h" in rest or "--help" in rest:
        own.print_help()
        print(
            "(--steps, --warmup and --no-split are comparison 2's; --rounds, --micro-batch, --models and --threads"
            " apply to both)\n"
        )
    if (args.encoder_steps is not None and args.encoder_steps < 1) or args.encoder_warmup < 0:
        own.error("--encoder-steps must be >= 1 and --encoder-warmup >= 0")
    config, split = step_harness.parse_config(doc, list(MODELS), rest, steps=10, warmup=2, micro_batch=4)
    config.update(
        stage=args.stage,
        mid_preset=args.mid_preset,
        checkpointing=args.checkpointing,
        encoder_steps=args.encoder_steps,
        encoder_warmup=args.encoder_warmup,
    )
    from datetime import date

    print(f"# {date.today()}  {step_harness.describe_machine(config['threads'])}")
    what = f"micro-batch {config['micro_batch']}, stage {args.stage}, fixed batch, fp32, the stage's AdamW recipe"
    what += ", activation checkpointing" if args.checkpointing else ""
    print(f"# {what}; models {config['models']} (mid: {args.mid_preset} tokenizer)")
    print(f"# {load()} at the start", flush=True)
    if args.compare in ("all", "encoder"):
        steps = ", ".join(f"{m} {encoder_steps(m, config)}" for m in config["models"])
        print(f"# 1. per side {args.encoder_warmup} warm-up + timed steps ({steps}) in interleaved rounds", flush=True)
        results = compare_encoder(config)
        print_encoder_report(results, config)
        print(f"# {load()}", flush=True)
    if args.compare in ("all", "ray"):
        print()
        print("## 2. Ray Train + DeepSpeed vs a plain PyTorch loop (features from token indices)")
        print(
            f"# ZeRO-{config['zero_stage']}, per side {config['warmup']} warm-up + {config['steps']} timed steps in"
            f" {min(config['rounds'], config['steps'])} interleaved rounds; malloc"
            f" {'keeps freed large buffers on every side' if config['keep_buffers'] else 'as glibc defaults'}",
            flush=True,
        )
        results, facts = step_harness.measure(Runner, config, split)
        step_harness.print_report(results, facts, config["models"], split, describe)
        print(f"# {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
