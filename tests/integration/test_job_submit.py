"""The real cluster path: `ray start --head` on 127.0.0.1, `ray job submit --working-dir .` of the pretokenize job
and of a training job (the understanding model's SFT stage, a worker killed on the way), read the output."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.integration.ray_procs import free_port, kill_a_worker_after, start_head, stop_cluster
from tests.integration.sample_corpus import assert_sample_corpus_tokenized

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node started like a platform team would; token authentication stays at its default (on). Its agents
    get free ports, so another Ray on the machine cannot take them (ray_procs.agent_port_flags)."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("ray CLI not installed")
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # Token authentication is on by default for local clusters; the job CLI only sends the token (from
    # ~/.ray/auth_token, written by `ray start`) when RAY_AUTH_MODE=token is set on the client side too.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    start_head(
        temp_dir,
        env,
        f"--port={port}",
        "--num-cpus=4",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_job_api(address, env)
        yield address, env
    finally:
        stop_cluster(temp_dir)


def _wait_for_job_api(address: str, env: dict, timeout_s: float = 120) -> None:
    """`ray start` returns before the dashboard agent accepts jobs ("No available agent to submit job")."""
    deadline = time.time() + timeout_s
    while True:
        probe = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0 and "No available agent" not in probe.stdout + probe.stderr:
            return
        if time.time() > deadline:
            pytest.fail(f"the job API at {address} did not come up: {probe.stderr[-2000:]}")
        time.sleep(1)


def test_ray_job_submit_pretokenize(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    for attempt in range(5):  # the agent may still be starting even after the job API answers
        cmd = [
            str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
            "--submission-id", f"pretokenize-test-{int(time.time())}-{attempt}", "--",
            sys.executable, "jobs/pretokenize.py", "--input", str(REPO / "samples" / "images"),
            "--output", str(out), "--tokenizer", "preset:tiny",
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(5)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    assert_sample_corpus_tokenized(out)


def _submit(address: str, env: dict, name: str, args: list[str]) -> str:
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--submission-id", f"{name}-{time.time_ns()}", "--", sys.executable, *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    return done.stdout + done.stderr


def test_ray_job_submit_understanding_sft_survives_a_killed_worker(ray_head, mlflow_server, tmp_path):
    """The research team's command for the understanding model's SFT stage (ZeRO-3, from a saved projector, on
    conversation and caption shards), 4 steps; a worker killed after the step-2 checkpoint is replaced by Ray Train,
    which resumes from that checkpoint within the same job and the same MLflow run. (Rerunning a stopped run's
    command resumes through the same code: tests/integration/test_train_t2i.py.)"""
    import mlflow

    from tests.integration.i2t_shards import save_projector_model, write_i2t_data
    from tokenflow.llm.i2t import I2TModel

    address, env = ray_head
    tok = write_i2t_data(tmp_path / "data")
    save_projector_model(tmp_path / "projector", tok.fingerprint())
    args = [
        "jobs/train_i2t.py", "--config", "jobs/configs/i2t_tiny.yaml", "--stage", "sft",
        "--data", str(tmp_path / "data" / "chat"), "--data", str(tmp_path / "data" / "captions"),
        "--tokenizer", str(tmp_path / "data" / "tokenizer"), "--projector-init", str(tmp_path / "projector"),
        "--output", str(tmp_path / "runs" / "sft"), "--mlflow-uri", mlflow_server, "--max-steps", "4",
        "--set", "checkpoint_every=2", "--set", "log_every=2", "--set", "sample_every=2", "--set", "max_failures=1",
        "--set", "data.max_length=128", "--set", "data.repeat=1", "--set", "data.group_window=2",
    ]  # fmt: skip
    out: dict = {}
    job = threading.Thread(target=lambda: out.update(log=_submit(address, env, "i2t-sft", args)), daemon=True)
    job.start()
    kill_a_worker_after(tmp_path / "runs" / "sft", "step_00000002", job.is_alive)
    job.join(timeout=600)
    assert "log" in out, "the job did not succeed after a worker was killed"
    assert f"checkpoint: {tmp_path / 'runs' / 'sft' / 'step_00000004'}" in out["log"]
    assert "resumed at step 2" in out["log"]

    model_dir = tmp_path / "runs" / "sft" / "model"
    model = I2TModel.from_pretrained(model_dir)  # ZeRO-3's partitions gathered into full tensors
    assert model.config.template == "vicuna_v1"
    payload = json.loads((model_dir / "config.json").read_text())
    assert payload["image_tokenizer_id"] == tok.fingerprint() and payload["provenance"]["steps"] == 4
    assert payload["provenance"]["projector_init"] == str(tmp_path / "projector")
    assert (model_dir / "tokenizer.json").exists()

    client = mlflow.MlflowClient(mlflow_server)
    (run_info,) = client.search_runs([client.get_experiment_by_name("i2t").experiment_id])
    assert run_info.data.tags["stage"] == "sft" and run_info.data.tags["template"] == "vicuna_v1"
    history = [m.step for m in client.get_metric_history(run_info.info.run_id, "loss")]
    # the restarted workers continued the same MLflow run from step 2; the controller registers a checkpoint at its
    # next poll of the workers (every 2 s), so they may have logged step 4 before the kill, and log it again
    assert history in ([2, 4], [2, 4, 4])
    metrics = run_info.data.metrics
    assert metrics["data/rejected.conversations_invalid"] >= 1 and metrics["data/zero_supervision"] >= 1
    assert metrics["data/samples_text_only"] >= 1 and metrics["data/samples_image"] >= 1
    artifacts = {a.path for a in client.list_artifacts(run_info.info.run_id, "conversations")}
    assert artifacts == {"conversations/step_00000002.txt", "conversations/step_00000004.txt"}
    text = client.download_artifacts(run_info.info.run_id, "conversations/step_00000004.txt", str(tmp_path))
    body = open(text).read()
    assert "=== worker 0" in body and "=== worker 1" in body and "--- reference" in body
