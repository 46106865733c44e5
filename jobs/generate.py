"""Generate images with a trained text-to-image model (next-scale sampling with a KV cache and CFG).

    python jobs/generate.py --model demo_output/runs/t2i-tiny/model \\
        --tokenizer demo_output/runs/tokenizer-tiny/tokenizer --prompt "a photo of a cat" --output demo_output/samples
    ray job submit --working-dir . -- python jobs/generate.py --model s3://bucket/runs/t2i-7b/model \\
        --tokenizer s3://bucket/tokenizers/clipb_256 --prompts geneval/prompts/evaluation_metadata.jsonl \\
        --geneval-layout --images-per-prompt 4 --loop 3 --cfg 7.5 --output s3://bucket/geneval/t2i-7b \\
        --actors 8 --gpus-per-actor 1

Writes OUTPUT/images/00000.png ... and OUTPUT/samples.parquet (index, prompt, seed, tokens); with --geneval-layout,
OUTPUT/<prompt:05d>/metadata.jsonl + samples/<n:04d>.png, the layout GenEval's evaluate_images.py reads.
--prompts takes a text file (one prompt per line) or a JSONL file of objects with a "prompt" field (GenEval's
metadata file). Each image's seed is --seed + its index, so any image can be regenerated alone.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import json
import logging

from pipelines.generate import GenerateConfig, generate


def read_prompts(path: str) -> tuple[list[str], list[dict] | None]:
    """Prompts from a text file (one per line, blank lines skipped) or JSONL with a "prompt" per object."""
    import fsspec

    with fsspec.open(path, "r") as fh:
        lines = [line.rstrip("\n") for line in fh if line.strip()]
    if path.endswith(".jsonl"):
        metadata = []
        for n, line in enumerate(lines, 1):
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{n}: expected a JSON object with a string 'prompt'")
            metadata.append(obj)
        return [m["prompt"] for m in metadata], metadata
    return lines, None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the T2IModel directory (train_t2i output or a converted release)")
    p.add_argument("--tokenizer", required=True, help="the image tokenizer the model was trained with")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    p.add_argument("--prompts", help="a text file (one prompt per line) or JSONL with a 'prompt' per line")
    p.add_argument("--output", required=True, help="output directory (path or URI)")
    p.add_argument("--seed", type=int, default=0, help="image i gets seed SEED + i")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance at the last scale (ramped)")
    p.add_argument("--loop", type=int, default=1, choices=[1, 2, 3], help="passes per scale (3: the paper's 25)")
    p.add_argument("--top-k", type=int, nargs="+", help="top-k per pass (default: the --loop preset)")
    p.add_argument("--top-p", type=float, nargs="+", help="top-p per pass (default: the --loop preset)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward")
    p.add_argument("--actors", type=int, default=1, help="sampling actors (one per GPU)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--geneval-layout", action="store_true", help="write GenEval's directory layout")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        prompts, metadata = list(args.prompt), None
        if args.prompts:
            if prompts:
                raise ValueError("give --prompt or --prompts, not both")
            prompts, metadata = read_prompts(args.prompts)
        cfg = GenerateConfig(
            model=args.model,
            tokenizer=args.tokenizer,
            output=args.output,
            prompts=prompts,
            metadata=metadata,
            images_per_prompt=args.images_per_prompt,
            seed=args.seed,
            cfg=args.cfg,
            loop=args.loop,
            top_k=args.top_k,
            top_p=args.top_p,
            batch_size=args.batch_size,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            precision=args.precision,
            geneval_layout=args.geneval_layout,
        )
        summary = generate(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary['images']} images to {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
