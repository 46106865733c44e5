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
