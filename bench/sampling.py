"""Next-scale sampling: the KV-cached sampler against the recompute-everything loop (the official approach).

    python bench/sampling.py                      # tiny and mid-size models, batch 8, preset 3 (25 passes)
    python bench/sampling.py --sizes mid --batch 2 --threads 2

Both loops run the same model, seed and prompts on the released tokenizer's 9 scales (817 tokens, 32,768 codes);
the script checks they give identical tokens and prints images/s and the ratio. Random weights: the speed of a
forward does not depend on them. The recompute loop scores every position, as the official one does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from tokenflow.config import QuantizerConfig
from tokenflow.llm.layout import T2ILayout
from tokenflow.llm.sampling import SamplingConfig, T2ISampler, seeded_generators
from tokenflow.llm.t2i import T2IConfig, T2IModel, decoder_config
from tokenflow.quantize import MultiScaleQuantizer

SCALES = (1, 2, 4, 6, 8, 10, 12, 14, 16)
SIZES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "mid": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16
    ),
}


def build(size: str, device: str):
    torch.manual_seed(0)
    cfg = T2IConfig(
        llm=decoder_config(vocab_size=32000, **SIZES[size]), scales=SCALES, codebook_size=32768, code_dim=40
    )
    model = T2IModel(cfg).to(device).eval()
    quantizer = MultiScaleQuantizer(QuantizerConfig(codebook_size=32768, scales=SCALES)).to(device).eval()
    layout = T2ILayout(scales=SCALES, eos_id=2, pad_id=0, image_open=(5, 6, 7), image_close=(8, 6, 7), bos_id=1)
    return T2ISampler(model, quantizer, layout), layout


def time_it(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--loop", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}, preset {args.loop}")
    print(
        f"{'model':<6} {'params':>8} {'cached img/s':>13} {'recompute img/s':>16} {'speed-up':>9} {'same tokens':>12}"
    )
    for size in args.sizes:
        sampler, layout = build(size, args.device)
        params = sum(p.numel() for p in sampler.model.parameters())
        captions = [[10 + i, 20 + i, 30 + i] for i in range(args.batch)]
        ids, valid = T2ILayout.stack([layout.prefix(c) for c in captions])
        ids, valid = ids.to(args.device), valid.to(args.device)
        config = SamplingConfig.preset(args.loop, cfg=7.5)

        def run(use_cache: bool, sampler=sampler, ids=ids, valid=valid, config=config):
            gens = seeded_generators(range(args.batch), args.device)
            with torch.inference_mode():
                return sampler.sample(ids, valid, config, gens, use_cache=use_cache)

        cached_s, cached = time_it(lambda: run(True), args.repeats)
        full_s, full = time_it(lambda: run(False), args.repeats)
        same = bool(torch.equal(cached, full))
        print(
            f"{size:<6} {params / 1e6:>7.1f}M {args.batch / cached_s:>13.3f} {args.batch / full_s:>16.3f} "
            f"{full_s / cached_s:>8.2f}x {str(same):>12}"
        )


if __name__ == "__main__":
    main()
