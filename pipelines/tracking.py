"""MLflow logging of a finished pretokenize run: the one place that knows MLflow.

Params are the flattened job configuration, metrics the manifest's counts (per reason too) and throughput, and
the manifest itself is an artifact. Nothing here touches credentials: the tracking URI comes from the caller
(`--mlflow-uri` or MLFLOW_TRACKING_URI) and MLflow reads its own auth settings from the environment.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"filters": {"min_side": 64}} -> {"filters.min_side": "64"} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def local_artifact_location(tracking_uri: str) -> str | None:
    """For a local sqlite store, artifacts next to the database (MLflow's default is ./mlruns in the current
    directory); a tracking server decides for itself (None)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db = os.path.abspath(tracking_uri[len(prefix) :])
    return Path(os.path.dirname(db), "mlartifacts").as_uri()


def log_pretokenize_run(
    manifest: dict, *, tracking_uri: str, experiment: str = "pretokenize", run_name: str | None = None
) -> str:
    """Log one run and return its run id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=local_artifact_location(tracking_uri))
    mlflow.set_experiment(experiment)
    counts = manifest["counts"]
    metrics = {
        "samples": counts["samples"],
        "kept": counts["kept"],
        "rejected": counts["rejected"],
        "kept_fraction": counts["kept"] / counts["samples"] if counts["samples"] else 0.0,
        "shards_done": manifest["shards_done"],
        **{f"rejected.{reason}": n for reason, n in counts["reasons"].items()},
    }
    if manifest.get("wall_time_s") is not None:
        metrics["wall_time_s"] = manifest["wall_time_s"]
    if manifest.get("samples_per_s") is not None:
        metrics["samples_per_s"] = manifest["samples_per_s"]
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(flatten(manifest.get("config", {})))
        mlflow.set_tags(
            {
                "tokenizer_id": manifest["tokenizer_id"],
                "tokenizer": manifest["tokenizer"],
                "tokenflow_version": manifest.get("tokenflow_version", ""),
            }
        )
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "manifest.json")
            with open(path, "w") as fh:
                json.dump(manifest, fh, indent=1, sort_keys=True)
            mlflow.log_artifact(path)
        return run.info.run_id


EVAL_METRICS = ("fid", "clip_score", "clip_cosine", "n_generated", "n_reference", "n_reference_rejected")


def check_run(tracking_uri: str, run_id: str) -> None:
    """Fail early (ValueError) when `run_id` is not a run of the store, before an evaluation that may take hours."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"MLflow run {run_id!r} not found at {tracking_uri}: {e.message}") from e


def log_eval_run(
    result: dict,
    *,
    tracking_uri: str,
    experiment: str = "t2i-eval",
    run_id: str | None = None,
    run_name: str | None = None,
    step: int | None = None,
) -> str:
    """Log a text-to-image evaluation (`pipelines/eval_t2i.evaluate`'s result) and return the run id.

    A new run in `experiment`, or, with `run_id`, the existing run (e.g. the training run of the evaluated model),
    whose status is left as it is (it may still be training). Metrics: the `EVAL_METRICS` that were computed, at
    `step` (e.g. the checkpoint's training step; 0 without). The configuration goes in as `eval.*` params in a new
    run and as `eval.*` tags in an existing one (params cannot change, and a run may be evaluated more than once).
    The whole result is the artifact `eval/eval.json` (`eval/step_<step>/eval.json` with a step)."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri)
    new_run = run_id is None
    if new_run:
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else client.create_experiment(experiment, artifact_location=local_artifact_location(tracking_uri))
        )
        run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(result[k]), now, step or 0) for k in EVAL_METRICS if result.get(k) is not None]
    config = {f"eval.{k}": v for k, v in flatten(result.get("config", {})).items()}
    status = "FAILED"
    try:
        if new_run:
            client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in config.items()])
        else:
            client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in config.items()])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "eval.json")
            with open(path, "w") as fh:
                json.dump(result, fh, indent=1, sort_keys=True)
            client.log_artifact(run_id, path, artifact_path="eval" if step is None else f"eval/step_{step}")
        status = "FINISHED"
    finally:
        if new_run:
            client.set_terminated(run_id, status)
    return run_id
