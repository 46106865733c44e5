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
import logging
from dataclasses import replace

import yaml

from pipelines.train_t2i import TrainT2IConfig, run
from tokenflow.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = os.path.join(ROOT, "jobs/configs/t2i_tiny.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    with open(DEFAULTS) as fh:
        epilog = f"A complete config ({os.path.relpath(DEFAULTS)}); change any field with --set:\n\n" + fh.read()
    p = argparse.ArgumentParser(
        description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML file of TrainT2IConfig fields (jobs/configs/t2i_*.yaml)")
    p.add_argument("--data", action="append", help="token shards: a pretokenize output dir, files or globs")
    p.add_argument("--tokenizer", help="the image tokenizer that made the shards (directory or URI)")
    p.add_argument("--llm", help="a pretrained HF model directory, or a YAML/JSON file of decoder config fields")
    p.add_argument("--output", help="the run directory: checkpoints and RUN_DIR/model (path or s3:// URI)")
    p.add_argument("--max-steps", type=int, help="optimiser steps")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpus-per-worker", type=float, help="0 trains on CPU")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument("--micro-batch", type=int, help="samples per worker per forward")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="default: $MLFLOW_TRACKING_URI")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainT2IConfig:
    """The YAML, then --set overrides, then the named flags (which win)."""
    overrides = list(args.set)
    if args.llm is not None:
        if os.path.isfile(args.llm):  # a decoder config file: a new model
            with open(args.llm) as fh:
                fields = yaml.safe_load(fh)
            if not isinstance(fields, dict):
                raise ValueError(f"{args.llm}: expected a mapping of decoder config fields")
            overrides += ["llm=null", f"llm_config={yaml.safe_dump(fields, default_flow_style=True).strip()}"]
        else:  # a pretrained directory, with its own text tokenizer
            overrides += [f"llm={args.llm}", "llm_config={}", "text_tokenizer=null"]
    cfg = load_config(TrainT2IConfig, args.config, overrides)
    storage_path = name = None
    if args.output:
        storage_path, _, name = args.output.rstrip("/").rpartition("/")
        if not name:
            raise ValueError(f"--output {args.output!r}: give the run directory, e.g. runs/t2i-1b")
        storage_path = storage_path or "."
    flags = {
        "tokenizer": args.tokenizer,
        "storage_path": storage_path,
        "name": name,
        "max_steps": args.max_steps,
        "workers": args.workers,
        "gpus_per_worker": args.gpus_per_worker,
        "zero_stage": args.zero_stage,
        "micro_batch": args.micro_batch,
        "mlflow_uri": args.mlflow_uri,
    }
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if args.data:
        cfg = replace(cfg, data=replace(cfg.data, input=args.data))
    return cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        summary = run(config_from_args(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {summary['model']}")
    print(f"last checkpoint: {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
