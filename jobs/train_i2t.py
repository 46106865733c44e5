"""Train the understanding model (TokenFlow features into an LLM, LLaVA-1.5 recipe) on Ray Train + DeepSpeed.

    python jobs/train_i2t.py --config jobs/configs/i2t_tiny.yaml --stage align --data demo_output/tokens \\
        --tokenizer demo_output/runs/tokenizer-tiny/tokenizer --output demo_output/runs/i2t-tiny-align
    ray job submit --working-dir . -- python jobs/train_i2t.py --config jobs/configs/i2t_qwen2.5_7b.yaml \\
        --stage sft --data s3://bucket/llava-tokens --tokenizer s3://bucket/tokenizers/siglip_384 \\
        --llm /models/Qwen2.5-7B-Instruct --projector-init s3://bucket/runs/i2t-7b-align/model \\
        --output s3://bucket/runs/i2t-7b-sft --workers 64 --gpus-per-worker 1 --mlflow-uri http://mlflow:5000

--stage align trains the projector on captions (plain template, ZeRO-2); --stage sft trains the LLM and the
projector on conversations (the chat template, ZeRO-3). --output RUN_DIR is the run's directory: checkpoints go
there, running the same command again resumes, and the trained model is written to RUN_DIR/model, the directory
`jobs/chat.py --model` and the next stage's --projector-init take.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
from dataclasses import replace

from jobs._cli import config_parser, llm_overrides, output_fields, run_flags, run_job
from pipelines.train_i2t import TrainI2TConfig, run
from tokenflow.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = config_parser(__doc__, "jobs/configs/i2t_tiny.yaml", "TrainI2TConfig")
    p.add_argument("--stage", choices=("align", "sft"), help="which stage (and its defaults) to train")
    p.add_argument("--data", action="append", help="token shards: a pretokenize output dir, files or globs")
    p.add_argument("--tokenizer", help="the image tokenizer that made the shards (directory or URI)")
    p.add_argument("--llm", help="a pretrained HF model directory, or a YAML/JSON file of decoder config fields")
    p.add_argument("--projector-init", help="a trained model directory (the align run's RUN_DIR/model)")
    p.add_argument("--output", help="the run directory: checkpoints and RUN_DIR/model (path or s3:// URI)")
    p.add_argument("--max-steps", type=int, help="optimiser steps")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainI2TConfig:
    """The YAML, then --set overrides, then the named flags (which win). The stage decides the defaults of
    zero_stage, micro_batch and grad_accum: those left null in the YAML."""
    overrides = list(args.set) + llm_overrides(args.llm) + ([f"stage={args.stage}"] if args.stage else [])
    cfg = load_config(TrainI2TConfig, args.config, overrides)
    own = dict(tokenizer=args.tokenizer, max_steps=args.max_steps, projector_init=args.projector_init)
    cfg = replace(cfg, **run_flags(args, **own, **output_fields(args.output)))
    if args.data:
        cfg = replace(cfg, data=replace(cfg.data, input=args.data))
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job(lambda: run(config_from_args(args)), ["model", "checkpoint"])


if __name__ == "__main__":
    sys.exit(main())
