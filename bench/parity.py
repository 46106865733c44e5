"""Token parity and encode speed of this project's tokenizers against the OFFICIAL TokenFlow / UniTok code.

Both run on the same seeded, official-shaped weights (`tests/parity/*_recipe.official_state_dict(seed)`;
the published checkpoints cannot be downloaded here) and the same real photos (`tests/parity/photos.py`),
CPU fp32. Printed:

- preprocessing: max abs difference between the official preprocessing and `Tokenizer.preprocess`;
- tokens: agreement under the near-tie rule (`tests/parity/compare.py`: scales compared up to each image's
  first difference, which must be a near-tie within 1e-5), on the official pixels, and the plain fraction of
  identical tokens from `Tokenizer.encode` end to end (its own preprocessing);
- decoding: max abs difference between the official decoder and ours on the official tokens (raw, unclamped);
- speed: encode of a batch of `--batch` images, official vs `Tokenizer.encode`, best of 3 after a warm-up,
  same thread count, and the ratio official / ours;
- the arithmetic bound: encode's matmul and convolution FLOPs over this machine's fp32 GEMM rate (of one
  ViT-like shape), about the least time any implementation of the same arithmetic can take, and so about the
  largest speed-up over the official code possible.

`--write-fixture PATH` saves the OFFICIAL outputs as the .npz that tests/integration/test_parity.py checks.

The official code must be available locally, with its own dependencies, in a separate venv (see
`bench/official/tokenflow.py` and `bench/official/unitok.py`):

    /work/offenv/bin/python bench/parity.py --official-repo /work/official/TokenFlow --preset clipb_256 \\
        [--batch 8] [--threads 2] [--write-fixture tests/fixtures/parity/clipb_256.npz]

Presets: clipb_256 and siglip_384 (official TokenFlow tree), unitok (official UniTok tree).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# preset -> (adapter module, converter kind)
PRESETS = {
    "clipb_256": ("bench.official.tokenflow", "tokenflow"),
    "siglip_384": ("bench.official.tokenflow", "tokenflow"),
    "unitok": ("bench.official.unitok", "unitok"),
}
SUBSAMPLE = 7  # fixtures keep every 7th pixel row and column


def seeded_state(preset: str, seed: int) -> dict[str, torch.Tensor]:
    if preset == "unitok":
        from tests.parity.unitok_recipe import official_state_dict

        return official_state_dict(seed)
    from tests.parity.tokenflow_recipe import official_state_dict

    return official_state_dict(preset, seed)


def clock(fn):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best_of(fns: dict, repeats: int = 3) -> dict[str, float]:
    """Best wall time of each function over `repeats` rounds after one warm-up call each; the functions take
    turns within a round, so a change in background load affects them alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], clock(fn)[1])
    return best


def write_fixture(path, preset, seed, names, pixels, tokens, decoded) -> None:
    sub = (..., slice(None, None, SUBSAMPLE), slice(None, None, SUBSAMPLE))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(
        path,
        photos=np.array(names),
        seed=np.int64(seed),
        preset=np.array(preset),
        pixels_sub=pixels[sub].numpy().astype(np.float32),
        tokens=tokens.numpy().astype(np.int32),
        decoded_sub=decoded[sub].numpy().astype(np.float32),
    )
    print(f"fixture: wrote {path} ({os.path.getsize(path) / 1024:.1f} KiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", required=True, help="local working tree of the official repository")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8, help="images per encode in the timing (default 8)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the official-shaped weights")
    parser.add_argument("--photos", type=int, default=None, help="use only the first N photos")
    parser.add_argument("--decoded", type=int, default=2, help="photos whose tokens are decoded (default 2)")
    parser.add_argument("--write-fixture", metavar="PATH", help="save the official outputs as a parity fixture")
    args = parser.parse_args(argv)

    from tests.parity.photos import PHOTOS, photo

    torch.set_num_threads(args.threads)
    adapter_name, kind = PRESETS[args.preset]
    adapter = importlib.import_module(adapter_name)
    repo, preset = args.official_repo, args.preset
    names = list(PHOTOS[: args.photos])
    images = [photo(n) for n in names]
    print(
        f"preset {preset}, photos {names}, seed {args.seed}, {args.threads} threads, {os.cpu_count()} CPUs, "
        f"{platform.machine()}, torch {torch.__version__}"
    )

    # ---- the official implementation -------------------------------------------------------------------------
    state, secs = clock(lambda: seeded_state(preset, args.seed))
    print(f"seeded state dict: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} values ({secs:.1f} s)")
    official, secs = clock(lambda: adapter.build_official(repo, preset, state))
    print(f"official build + strict load: {secs:.1f} s")
    pixels = torch.stack([adapter.official_preprocess(repo, preset, im) for im in images])
    tokens, secs = clock(lambda: torch.cat([adapter.official_encode(official, p[None]) for p in pixels]))
    print(f"official encode: {tuple(tokens.shape)} tokens, {secs / len(names):.2f} s per image (batch of 1)")
    decoded, secs = clock(lambda: adapter.official_decode(official, tokens[: args.decoded]))
    print(f"official decode: {args.decoded} images in {secs:.1f} s, range [{decoded.min():.2f}, {decoded.max():.2f}]")
    if args.write_fixture:
        write_fixture(args.write_fixture, preset, args.seed, names, pixels, tokens, decoded)

    # ---- this project ----------------------------------------------------------------------------------------
    from tests.parity.compare import compare_tokens
    from tokenflow.convert import tokenizer_from_official

    tok, secs = clock(lambda: tokenizer_from_official(kind, state, preset_name=preset))
    print(f"project convert + build: {secs:.1f} s")
    ours_pixels = tok.preprocess(images)
    print(f"preprocessing max abs diff: {(ours_pixels - pixels).abs().max().item():.3g}")
    report, secs = clock(lambda: compare_tokens(tok, pixels, tokens))
    print(
        f"token agreement (near-tie rule, official pixels): {report['agreement']:.6f} of {report['compared']} "
        f"compared, first differing scale per image {report['per_image']}, near ties ok {report['near_ties_ok']}, "
        f"max gap {report['max_gap']:.3g} ({secs:.1f} s)"
    )
    ours, secs = clock(lambda: torch.cat([tok.encode(p[None]) for p in ours_pixels]))
    same = (ours == tokens).float().mean(dim=tuple(range(1, tokens.ndim)))
    print(
        f"tokens identical end to end (Tokenizer.preprocess + encode, all positions): {same.mean():.6f}, "
        f"per image {[round(float(s), 4) for s in same]} ({secs / len(names):.2f} s per image)"
    )
    with torch.no_grad():
        ours_decoded, secs = clock(
            lambda: tok.model.decode_pixels(tok.model.quantizer.features(tokens[: args.decoded]))
        )
    print(
        f"decode max abs diff (official tokens, raw): {(ours_decoded - decoded).abs().max().item():.3g} "
        f"(project decode {secs:.1f} s)"
    )

    # ---- speed -----------------------------------------------------------------------------------------------
    batch = pixels[torch.arange(args.batch) % len(names)].contiguous()
    gemm, gemm_flops = gemm_probe()
    rounds = {"official": lambda: adapter.official_encode(official, batch), "project": lambda: tok.encode(batch)}
    best = best_of({**rounds, "gemm": gemm})
    t_official, t_ours = best["official"], best["project"]
    print(
        f"encode batch of {args.batch} at {batch.shape[-1]} px, {args.threads} threads, best of 3: "
        f"official {t_official:.2f} s, project {t_ours:.2f} s, official/project {t_official / t_ours:.2f}x"
    )
    flops, rate = encode_flops(tok, batch), gemm_flops / best["gemm"]
    floor = flops / rate
    print(
        f"arithmetic bound: encode does {flops / 1e12:.3f} TFLOP of matmuls and convolutions; this machine's fp32 "
        f"GEMM ran at {rate / 1e9:.0f} GFLOP/s in the same rounds, so code doing the same arithmetic at that rate "
        f"throughout would take {floor:.2f} s (official at {floor / t_official:.0%} of that rate, project at "
        f"{floor / t_ours:.0%}; the largest speed-up over the official possible without changing the arithmetic: "
        f"{t_official / floor:.2f}x)"
    )
    return 0


def encode_flops(tok, batch: torch.Tensor) -> float:
    """Floating-point operations of `tok.encode(batch)` in matmuls, convolutions and attention (torch's
    FlopCounterMode); the element-wise work (norms, activations) comes on top, so this is a lower bound."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tok.encode(batch)
    return float(counter.get_total_flops())


def gemm_probe(m: int = 2048, k: int = 1024, n: int = 4096, products: int = 16):
    """(call, FLOPs per call): `products` fp32 matrix products of a ViT-L-like shape (2,048 tokens x 1,024 ->
    4,096), the work that dominates encode, timed in the same rounds as the encodes (a shared machine's speed
    drifts; a rate measured apart from them would not compare)."""
    a, b = torch.randn(m, k), torch.randn(k, n)

    def call():
        for _ in range(products):
            a @ b

    return call, 2.0 * m * k * n * products


if __name__ == "__main__":
    sys.exit(main())
