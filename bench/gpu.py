"""GPU throughput of the two jobs' inner loops, for the README and the cluster cost estimate (needs CUDA).

    python bench/gpu.py                                 # every preset, both precisions, and the training step
    python bench/gpu.py --presets clipb_256 --no-train

- encode: the tokenize actor's arithmetic (`pipelines.tokenize.TokenizeStage`: bf16 weights and activations, the
  quantizer in fp32; or fp32 with TF32 off) on random pixels in [-1, 1], `--batch` images per forward at the
  preset's size, `--warmup` untimed then `--iters` timed forwards, CUDA-synchronised wall clock. Random weights
  (seed 0): the network's cost does not depend on them. Also the share of a few real photos' tokens that bf16
  leaves identical to CPU fp32 (all positions: one flip at a coarse scale changes the residual of every later
  scale, so this understates how close the codes are).
- train: one `TrainStep` of the full stage (teacher, LPIPS with random VGG weights, PatchGAN from step 0) over
  `LocalEngine`s under bf16 autocast with fp32 weights, micro-batch `--train-batch`: images/s and peak memory.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenflow import Tokenizer  # noqa: E402
from tokenflow.losses import LossConfig, TokenizerLoss  # noqa: E402
from tokenflow.train import LocalEngine, OptimizerConfig, TrainStep  # noqa: E402


def timed(fn, warmup: int, iters: int) -> float:
    """Seconds per call, CUDA-synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def encode_bench(name: str, batch: int, warmup: int, iters: int) -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cpu = Tokenizer.from_preset(name).eval()
    built = time.perf_counter() - t0
    size = cpu.config.image_size
    x = torch.rand(batch, 3, size, size, device="cuda") * 2 - 1
    for precision in ("bf16", "fp32"):
        tok = copy.deepcopy(cpu).cuda()
        if precision == "bf16":  # as TokenizeStage
            tok.model.to(torch.bfloat16)
            tok.model.quantizer.float()
            inp = x.to(torch.bfloat16)
        else:
            inp = x
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.cuda.reset_peak_memory_stats()
        sec = timed(lambda tok=tok, inp=inp: tok.encode(inp), warmup, iters)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"encode {name:11s} {size} px  {precision}  batch {batch}: {batch / sec:8.1f} img/s "
            f"({sec * 1000:.0f} ms/batch, {cpu.tokens_per_image} tokens/img, peak {peak:.1f} GiB, "
            f"built in {built:.0f} s)",
            flush=True,
        )
        if precision == "bf16":
            from tests.parity.photos import PHOTOS, photo

            pixels = cpu.preprocess([photo(n) for n in PHOTOS])
            want = cpu.encode(pixels)
            got = tok.encode(pixels.cuda().to(torch.bfloat16)).cpu()
            same = (got == want).float().mean().item()
            print(f"  bf16 CUDA vs fp32 CPU on {len(PHOTOS)} photos: {same:.4f} of tokens identical", flush=True)
        del tok
        torch.cuda.empty_cache()
    torch.backends.cudnn.allow_tf32 = True


def train_bench(name: str, batch: int, warmup: int, iters: int) -> None:
    torch.manual_seed(0)
    tok = Tokenizer.from_preset(name).cuda()
    teacher = tok.make_teacher().cuda() if tok.config.kind == "tokenflow" else None
    loss_fn = TokenizerLoss(LossConfig(disc_start=0)).cuda()  # LPIPS on, with random VGG weights
    opt = OptimizerConfig()
    gen = LocalEngine(tok, opt, max_steps=1000)
    disc = LocalEngine(loss_fn.discriminator, opt, max_steps=1000)
    step = TrainStep(tok, loss_fn, gen, disc, teacher=teacher, amp_dtype=torch.bfloat16)
    size = tok.config.image_size
    x = torch.rand(batch, 3, size, size, device="cuda") * 2 - 1
    counter = iter(range(10**9))
    torch.cuda.reset_peak_memory_stats()
    sec = timed(lambda: step(x, next(counter)), warmup, iters)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"train  {name:11s} {size} px  bf16 autocast, micro-batch {batch}: {batch / sec:6.1f} img/s "
        f"({sec * 1000:.0f} ms/step, peak {peak:.1f} GiB)",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["clipb_256", "siglip_384", "unitok"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--train-presets", nargs="+", default=["clipb_256"])
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--no-train", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    for name in args.presets:
        encode_bench(name, args.batch, args.warmup, args.iters)
    if not args.no_train:
        for name in args.train_presets:
            train_bench(name, args.train_batch, args.warmup, args.iters)


if __name__ == "__main__":
    main()
