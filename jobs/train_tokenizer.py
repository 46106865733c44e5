"""Train a TokenFlow or UniTok image tokenizer on Ray Train + DeepSpeed, tracked in MLflow.

    python jobs/train_tokenizer.py --config jobs/configs/tokenizer_tiny.yaml --input samples/images
    ray job submit --working-dir . -- python jobs/train_tokenizer.py --config jobs/configs/tokenizer_clipb_256.yaml \\
        --input 's3://bucket/laion/{00000..09999}.tar' --storage-path s3://bucket/runs --name clipb-256-a \\
        --workers 16 --gpus-per-worker 1 --zero-stage 2 --mlflow-uri http://mlflow:5000

Checkpoints go to STORAGE_PATH/NAME every checkpoint_every steps; running the same command again resumes from the
latest one (a worker failure resumes by itself, up to max_failures times). The trained tokenizer is written to
STORAGE_PATH/NAME/tokenizer, the directory `jobs/pretokenize.py --tokenizer` takes.
"""

from __future__ import annotations

import os
import sys

# Run as `python jobs/x.py` (also under `ray job submit --working-dir .`): make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import logging
from dataclasses import replace

from pipelines.train_tokenizer import TrainTokenizerConfig, run
from tokenflow.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = os.path.join(ROOT, "jobs/configs/tokenizer_tiny.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    with open(DEFAULTS) as fh:
        epilog = f"A complete config ({os.path.relpath(DEFAULTS)}); change any field with --set:\n\n" + fh.read()
    p = argparse.ArgumentParser(
        description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML file of TrainTokenizerConfig fields (jobs/configs/tokenizer_*.yaml)")
    p.add_argument("--input", action="append", help="training shards, dirs, globs or brace ranges; repeatable")
    p.add_argument("--tokenizer", help="preset:NAME (new model) or a saved tokenizer directory to start from")
    p.add_argument("--stage", choices=["full", "decoder", "enhanced_decoder"], help="training stage")
    p.add_argument("--storage-path", help="checkpoints and the final tokenizer (path or s3:// URI)")
    p.add_argument("--name", help="run name; the same name resumes")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpus-per-worker", type=float, help="0 trains on CPU")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument("--max-steps", type=int, help="optimiser steps")
    p.add_argument("--micro-batch", type=int, help="images per worker per forward")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="default: $MLFLOW_TRACKING_URI")
    p.add_argument("--mlflow-experiment", help="MLflow experiment name")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, dotted for sections: --set train.loss.disc_start=5000",
    )
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainTokenizerConfig:
    """The YAML, then --set overrides, then the named flags (which win)."""
    cfg = load_config(TrainTokenizerConfig, args.config, args.set)
    flags = {
        "tokenizer": args.tokenizer,
        "storage_path": args.storage_path,
        "name": args.name,
        "workers": args.workers,
        "gpus_per_worker": args.gpus_per_worker,
        "zero_stage": args.zero_stage,
        "micro_batch": args.micro_batch,
        "mlflow_uri": args.mlflow_uri,
        "mlflow_experiment": args.mlflow_experiment,
    }
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if args.input:
        cfg = replace(cfg, data=replace(cfg.data, input=args.input))
    train = {k: v for k, v in (("stage", args.stage), ("max_steps", args.max_steps)) if v is not None}
    return replace(cfg, train=replace(cfg.train, **train)) if train else cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        summary = run(config_from_args(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer: {summary['tokenizer']}")
    print(f"last checkpoint: {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
