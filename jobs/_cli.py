"""The command line the training jobs share: a YAML config, `--set` overrides, the run's common flags.

p = config_parser(__doc__, "jobs/configs/t2i_tiny.yaml", "TrainT2IConfig")   # then add the job's own flags
cfg = load_config(TrainT2IConfig, args.config, args.set + extra)
cfg = replace(cfg, **run_flags(args, own={...}))                            # named flags win
sys.exit(run_job(lambda: run(config_from_args(args)), ["model", "checkpoint"]))
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_parser(doc: str, defaults: str, config_class: str) -> argparse.ArgumentParser:
    """A parser with --config and --set, the shared run flags, and the complete default YAML as its epilog."""
    path = os.path.join(ROOT, defaults)
    with open(path) as fh:
        epilog = f"A complete config ({os.path.relpath(path)}); change any field with --set:\n\n" + fh.read()
    p = argparse.ArgumentParser(description=doc, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML file of {config_class} fields (jobs/configs/)")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpus-per-worker", type=float, help="0 trains on CPU")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument("--micro-batch", type=int, help="samples per worker per forward")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="default: $MLFLOW_TRACKING_URI")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, dotted for sections: --set data.seed=3",
    )
    return p


def run_flags(args: argparse.Namespace, **own) -> dict:
    """The config fields the shared flags (and the job's `own` ones) set, leaving out flags not given."""
    flags = {
        "workers": args.workers,
        "gpus_per_worker": args.gpus_per_worker,
        "zero_stage": args.zero_stage,
        "micro_batch": args.micro_batch,
        "mlflow_uri": args.mlflow_uri,
        **own,
    }
    return {k: v for k, v in flags.items() if v is not None}


def run_job(job: Callable[[], dict], show: list[str]) -> int:
    """Run a job with logging on; a bad config or a missing input is one `error:` line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        summary = job()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key in show:
        print(f"{key}: {summary[key]}")
    return 0


def llm_overrides(llm: str | None) -> list[str]:
    """`--llm` as config overrides: a YAML/JSON file of decoder config fields builds a new model (the text tokenizer
    stays the config's); a directory is a pretrained model with its own text tokenizer."""
    import yaml

    if llm is None:
        return []
    if os.path.isfile(llm):
        with open(llm) as fh:
            fields = yaml.safe_load(fh)
        if not isinstance(fields, dict):
            raise ValueError(f"{llm}: expected a mapping of decoder config fields")
        return ["llm=null", f"llm_config={yaml.safe_dump(fields, default_flow_style=True).strip()}"]
    return [f"llm={llm}", "llm_config={}", "text_tokenizer=null"]


def output_fields(output: str | None) -> dict:
    """`--output RUN_DIR` as the config's storage_path and name (RUN_DIR = storage_path/name)."""
    if not output:
        return {}
    storage_path, _, name = output.rstrip("/").rpartition("/")
    if not name:
        raise ValueError(f"--output {output!r}: give the run directory, e.g. runs/my-run")
    return {"storage_path": storage_path or ".", "name": name}
