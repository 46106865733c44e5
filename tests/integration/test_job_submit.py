"""The real cluster path: `ray start --head` on 127.0.0.1, `ray job submit --working-dir .` of the pretokenize and
training jobs, read the output."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.ray_procs import free_port, start_head, stop_cluster
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


def test_ray_job_submit_train_tokenizer(ray_head, tmp_path):
    """The research team's command: the tiny config, 4 steps, then the tokenizer it wrote loads."""
    address, env = ray_head
    runs = tmp_path / "runs"
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--submission-id", f"train-tokenizer-test-{int(time.time())}", "--",
        sys.executable, "jobs/train_tokenizer.py", "--config", "jobs/configs/tokenizer_tiny.yaml",
        "--input", str(REPO / "samples" / "images"), "--storage-path", str(runs), "--name", "submitted",
        "--max-steps", "4", "--set", "checkpoint_every=2", "--set", "log_every=2", "--set", "image_every=2",
        "--set", "eval_every=0",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    state = json.loads((runs / "submitted" / "step_00000004" / "state.json").read_text())
    assert state["step"] == 4

    from tokenflow import Tokenizer

    tok = Tokenizer.from_pretrained(runs / "submitted" / "tokenizer")
    assert tok.scales == (1, 2, 4, 6, 8)
