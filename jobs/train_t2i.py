"""Train the text-to-image model (TokenFlow's next-scale t2i) from token shards on Ray Train + DeepSpeed.

    python jobs/train_t2i.py --config jobs/configs/t2i_tiny.yaml --data demo_output/tokens \\
        --tokenizer demo_output/runs/tokenizer-tiny/tokenizer --output demo_output/runs/t2i-tiny
    ray job submit --working-dir . -- python jobs/train_t2i.py --config jobs/configs/t2i_7b.yaml \\
        --data s3://bucket/tokens --tokenizer s3://bucket/tokenizers/clipb_256 --llm /models/Llama-2-7b-hf \\
        --output s3://bucket/runs/t2i-7b --workers 64 --gpus-per-worker 1 --zero-stage 3 --mlflow-uri http://mlflow:5000

--output RUN_DIR is the run's directory (the config's storage_path/name): checkpoints go there every
checkpoint_every steps, running the same command again resumes from the latest one, and the trained model is
written to RUN_DIR/model, the directory `jobs/generate.py --model` takes.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
from dataclasses import replace

from jobs._cli import config_parser, llm_overrides, output_fields, run_flags, run_job
from pipelines.train_t2i import TrainT2IConfig, run
from tokenflow.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = config_parser(__doc__, "jobs/configs/t2i_tiny.yaml", "TrainT2IConfig")
    p.add_argument("--data", action="append", help="token shards: a pretokenize output dir, files or globs")
    p.add_argument("--tokenizer", help="the image tokenizer that made the shards (directory or URI)")
    p.add_argument("--llm", help="a pretrained HF model directory, or a YAML/JSON file of decoder config fields")
    p.add_argument("--output", help="the run directory: checkpoints and RUN_DIR/model (path or s3:// URI)")
    p.add_argument("--max-steps", type=int, help="optimiser steps")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainT2IConfig:
    """The YAML, then --set overrides, then the named flags (which win)."""
    cfg = load_config(TrainT2IConfig, args.config, list(args.set) + llm_overrides(args.llm))
    own = dict(tokenizer=args.tokenizer, max_steps=args.max_steps)
    cfg = replace(cfg, **run_flags(args, **own, **output_fields(args.output)))
    if args.data:
        cfg = replace(cfg, data=replace(cfg.data, input=args.data))
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job(lambda: run(config_from_args(args)), ["model", "checkpoint"])


if __name__ == "__main__":
    sys.exit(main())
