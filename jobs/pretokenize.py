"""Pretokenize an image-text corpus into Parquet token shards on Ray.

    python jobs/pretokenize.py --input 'data/{00000..00099}.tar' --output out/ --tokenizer s3://bucket/tokenizer
    python jobs/pretokenize.py --format llava --input data/llava_v1_5_mix665k.json --image-root data/ \\
        --output out/ --tokenizer s3://bucket/tokenizer
    ray job submit --working-dir . -- python jobs/pretokenize.py --config pipelines/configs/pretokenize.yaml \\
        --input s3://bucket/laion/ --output s3://bucket/tokens/ --tokenizer s3://bucket/tokenizer \\
        --set filters.min_side=128 --set 'filters.metadata_max={punsafe: 0.5}'

Running the same command again resumes: committed input shards are skipped, the rest are redone. The output
layout, reject reasons and file metadata are documented in the README ("Token shards").
"""

from __future__ import annotations

import os
import sys

# Run as `python jobs/x.py` (also under `ray job submit --working-dir .`): make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import logging
from dataclasses import replace

from pipelines.pretokenize import PretokenizeConfig, run
from pipelines.tracking import log_pretokenize_run
from tokenflow.config import load_config

DEFAULTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines/configs/pretokenize.yaml"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    with open(DEFAULTS) as fh:
        epilog = f"Every config field, with its default ({os.path.relpath(DEFAULTS)}; change any with --set):\n\n"
        epilog += fh.read()
    p = argparse.ArgumentParser(
        description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML file of PretokenizeConfig fields (pipelines/configs/pretokenize.yaml)")
    p.add_argument("--input", action="append", help="input shards, dirs, globs or brace ranges; repeatable")
    p.add_argument("--output", help="output root (path or s3:// URI)")
    p.add_argument("--tokenizer", help="tokenizer directory (path or URI), or preset:NAME for smoke tests")
    p.add_argument("--format", choices=["webdataset", "parquet", "folder", "llava"], help="default: detect")
    p.add_argument(
        "--image-root",
        help="llava: directory (path or s3:// URI) the annotations' image paths are relative to "
        "(default: each annotation file's directory)",
    )
    p.add_argument("--s3-endpoint", help="endpoint URL of an S3-compatible store")
    p.add_argument("--batch-size", type=int, help="images per tokenizer forward")
    p.add_argument("--tokenizer-actors", type=int, help="size of the tokenize actor pool")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--mlflow-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="log the run to this MLflow tracking URI (default: $MLFLOW_TRACKING_URI; unset: no logging)",
    )
    p.add_argument("--mlflow-experiment", default="pretokenize", help="MLflow experiment name")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, dotted for sections: --set filters.min_side=128",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    flags = {
        "input": args.input,
        "output": args.output,
        "tokenizer": args.tokenizer,
        "format": args.format,
        "image_root": args.image_root,
        "s3_endpoint": args.s3_endpoint,
        "batch_size": args.batch_size,
        "tokenizer_actors": args.tokenizer_actors,
        "device": args.device,
    }
    try:
        cfg = load_config(PretokenizeConfig, args.config, args.set)
        cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})  # named flags win
        manifest = run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if manifest.get("nothing_to_do"):
        print(f"nothing to do: every input shard is already committed in {cfg.output}")
    elif args.mlflow_uri:
        run_id = log_pretokenize_run(manifest, tracking_uri=args.mlflow_uri, experiment=args.mlflow_experiment)
        print(f"mlflow: run {run_id} in experiment {args.mlflow_experiment!r} at {args.mlflow_uri}")
    c = manifest["counts"]
    print(
        f"{c['kept']} kept, {c['rejected']} rejected of {c['samples']} samples in {manifest['shards_done']} shards;"
        f" reasons {c['reasons']}"
    )
    print(f"output: {cfg.output} (manifest.json, shards/, rejects/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
