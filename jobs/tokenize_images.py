"""Tokenize a folder of images with a tokenizer and write the tokens and a reconstruction grid.

    python jobs/tokenize_images.py --input samples/images --tokenizer tiny --output demo_output
    python jobs/tokenize_images.py --input photos/ --tokenizer s3://bucket/tokenizers/clipb_256 --output out/

`--tokenizer` is a preset name (random weights unless `--pretrained` gives the semantic encoder's open_clip tag or
checkpoint) or a directory written by `Tokenizer.save_pretrained`. Writes OUTPUT/tokens.jsonl (one line per
image: file, scales, tokens), OUTPUT/reconstruction.png (originals on top, decoded tokens below) and
OUTPUT/rejected.jsonl for images that could not be used (never dropped silently). Until the Ray pretokenize
job lands this is `make demo`.
"""

from __future__ import annotations

import os
import sys

# Run as `python jobs/x.py` (also under `ray job submit --working-dir .`): make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from tokenflow import ImageError, Tokenizer
from tokenflow.config import PRESETS
from tokenflow.image import to_pil

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a folder of images (searched recursively) or one image")
    p.add_argument("--tokenizer", default="tiny", help=f"preset {sorted(PRESETS)} or a saved tokenizer directory")
    p.add_argument("--pretrained", default=None, help="semantic encoder weights for a preset (tag or path)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed for a preset's random weights")
    return p.parse_args(argv)


def load_tokenizer(name: str, pretrained: str | None, seed: int) -> Tokenizer:
    if name in PRESETS:
        torch.manual_seed(seed)
        return Tokenizer.from_preset(name, pretrained=pretrained).eval()
    return Tokenizer.from_pretrained(name).eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    src, out = Path(args.input), Path(args.output)
    files = [src] if src.is_file() else sorted(f for f in src.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        print(f"no images found under {src}", file=sys.stderr)
        return 1
    tok = load_tokenizer(args.tokenizer, args.pretrained, args.seed)
    out.mkdir(parents=True, exist_ok=True)

    kept, originals, rejected = [], [], []
    for f in files:
        try:
            kept.append((f, tok.preprocess([f])))
        except ImageError as e:
            rejected.append({"file": str(f), "reason": e.reason, "detail": str(e)})

    recon, heads = [], []
    with open(out / "tokens.jsonl", "w") as fh:
        for start in range(0, len(kept), args.batch_size):
            batch = kept[start : start + args.batch_size]
            pixels = torch.cat([p for _, p in batch])
            ids = tok.encode(pixels)
            recon.append(tok.decode(ids))
            originals.append((pixels + 1) / 2)
            for (f, _), row in zip(batch, ids):
                heads.append((f.name, row[:16].tolist()))
                fh.write(json.dumps({"file": str(f), "scales": list(tok.scales), "tokens": row.tolist()}) + "\n")
    with open(out / "rejected.jsonl", "w") as fh:
        for r in rejected:
            fh.write(json.dumps(r) + "\n")

    if kept:
        grid = _grid(torch.cat(originals), torch.cat(recon))
        grid.save(out / "reconstruction.png")
    print(
        f"tokenizer: {args.tokenizer} ({tok.tokens_per_image} tokens/image, scales {tok.scales}, "
        f"codebook {tok.codebook_size})"
    )
    for name, first in heads[:4]:
        print(f"  {name}: first tokens {first} ...")
    print(f"tokenized {len(kept)} image(s), rejected {len(rejected)}")
    print(f"tokens:         {out / 'tokens.jsonl'}")
    if kept:
        print(f"reconstruction: {out / 'reconstruction.png'}")
    return 0


def _grid(top: torch.Tensor, bottom: torch.Tensor) -> Image.Image:
    """Originals in the first row, reconstructions in the second; inputs in [0, 1]."""
    rows = torch.cat([torch.cat(list(top), dim=2), torch.cat(list(bottom), dim=2)], dim=1)  # (3, 2H, N*W)
    return to_pil(rows[None] * 2 - 1)[0]


if __name__ == "__main__":
    sys.exit(main())
