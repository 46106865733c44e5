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
from dataclasses import replace

from jobs._cli import config_parser, run_flags, run_job
from pipelines.train_tokenizer import TrainTokenizerConfig, run
from tokenflow.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = config_parser(__doc__, "jobs/configs/tokenizer_tiny.yaml", "TrainTokenizerConfig")
    p.add_argument("--input", action="append", help="training shards, dirs, globs or brace ranges; repeatable")
    p.add_argument("--tokenizer", help="preset:NAME (new model) or a saved tokenizer directory to start from")
    p.add_argument("--stage", choices=["full", "decoder", "enhanced_decoder"], help="training stage")
    p.add_argument("--storage-path", help="checkpoints and the final tokenizer (path or s3:// URI)")
    p.add_argument("--name", help="run name; the same name resumes")
    p.add_argument("--max-steps", type=int, help="optimiser steps")
    p.add_argument("--mlflow-experiment", help="MLflow experiment name")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainTokenizerConfig:
    """The YAML, then --set overrides, then the named flags (which win)."""
    cfg = load_config(TrainTokenizerConfig, args.config, args.set)
    own = dict(
        tokenizer=args.tokenizer,
        storage_path=args.storage_path,
        name=args.name,
        mlflow_experiment=args.mlflow_experiment,
    )
    cfg = replace(cfg, **run_flags(args, **own))
    if args.input:
        cfg = replace(cfg, data=replace(cfg.data, input=args.input))
    train = {k: v for k, v in (("stage", args.stage), ("max_steps", args.max_steps)) if v is not None}
    return replace(cfg, train=replace(cfg.train, **train)) if train else cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job(lambda: run(config_from_args(args)), ["tokenizer", "checkpoint"])


if __name__ == "__main__":
    sys.exit(main())
