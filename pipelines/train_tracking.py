"""MLflow for a training run, from rank 0: the one place the training loop's logging meets MLflow.

    tracker = RunTracker.start(uri, experiment="tokenizer", run_id=None, run_name="tiny", params=..., tags=...)
    tracker.metrics({"loss/total": 0.3}, step=100)
    tracker.image(pil_image, "reconstructions/step_000100.png")
    tracker.directory("/tmp/tokenizer", "tokenizer")
    tracker.run_id                        # store it in the checkpoint: a resumed run continues the same MLflow run

Training never stops for MLflow: when the server cannot be reached at the start, or a call fails later, the
tracker says so once (a warning naming the URI and the error) and every later call is a no-op. System metrics
(CPU, memory, GPU, network) are sampled by MLflow's own monitor while the run is open.
"""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.request

log = logging.getLogger("train.mlflow")


def _reachable(uri: str, timeout_s: float = 10.0) -> str | None:
    """None when a tracking server answers its health check; otherwise why not. Local stores always pass."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


class RunTracker:
    def __init__(self, mlflow_module=None, run_id: str | None = None, uri: str | None = None):
        self._mlflow, self.run_id, self.uri = mlflow_module, run_id, uri

    @classmethod
    def disabled(cls) -> RunTracker:
        return cls()

    @classmethod
    def start(
        cls,
        uri: str | None,
        *,
        experiment: str,
        run_id: str | None = None,
        run_name: str | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        system_metrics: bool = True,
    ) -> RunTracker:
        """Open (or, with run_id, reopen) the run; a disabled tracker when uri is None or MLflow fails."""
        if not uri:
            return cls.disabled()
        # fail in seconds, not after MLflow's default minutes of retries (the user's settings win)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        why = _reachable(uri)
        if why is not None:
            log.warning("MLflow tracking server %s is unreachable (%s): training continues without tracking", uri, why)
            return cls.disabled()
        try:
            import mlflow

            from pipelines.tracking import local_artifact_location

            mlflow.set_tracking_uri(uri)
            if mlflow.get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location=local_artifact_location(uri))
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(
                run_id=run_id, run_name=None if run_id else run_name, log_system_metrics=system_metrics
            )
            tracker = cls(mlflow, run.info.run_id, uri)
            if run_id is None:  # params are immutable in MLflow: logged once, by the run that created it
                items = sorted((params or {}).items())
                for i in range(0, len(items), 100):
                    mlflow.log_params(dict(items[i : i + 100]))
            if tags:
                mlflow.set_tags(tags)
            return tracker
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning("MLflow at %s failed (%s: %s): training continues without tracking", uri, type(e).__name__, e)
            return cls.disabled()

    @property
    def enabled(self) -> bool:
        return self._mlflow is not None

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if self._mlflow is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            log.warning(
                "MLflow %s failed at %s (%s: %s): training continues, tracking is off for the rest of this run",
                what,
                self.uri,
                type(e).__name__,
                e,
            )
            self._mlflow = None

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self._mlflow is not None:
            self._call("log_metrics", self._mlflow.log_metrics, values, step=step)

    def image(self, img, artifact_file: str) -> None:
        if self._mlflow is not None:
            self._call("log_image", self._mlflow.log_image, img, artifact_file=artifact_file)

    def text(self, text: str, artifact_file: str) -> None:
        if self._mlflow is not None:
            self._call("log_text", self._mlflow.log_text, text, artifact_file)

    def directory(self, local_dir: str, artifact_path: str) -> None:
        if self._mlflow is not None:
            self._call("log_artifacts", self._mlflow.log_artifacts, local_dir, artifact_path)

    def remote_directory(self, uri: str, artifact_path: str, storage_options: dict | None = None) -> None:
        """Log a directory that may live on S3: copied to a temporary directory first."""
        if self._mlflow is None:
            return
        import fsspec

        with tempfile.TemporaryDirectory() as tmp:
            fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
            fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
            self.directory(tmp, artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self._mlflow is not None:
            self._call("end_run", self._mlflow.end_run, status=status)
