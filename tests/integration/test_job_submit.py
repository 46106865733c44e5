"""The real cluster path: `ray start --head` on 127.0.0.1, `ray job submit --working-dir .`, read the output."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node started like a platform team would; token authentication stays at its default (on)."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("ray CLI not installed")
    port, dash = _free_port(), _free_port()
    # Token authentication is on by default for local clusters; the job CLI only sends the token (from
    # ~/.ray/auth_token, written by `ray start`) when RAY_AUTH_MODE=token is set on the client side too.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=4",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        yield address, env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_pretokenize(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--submission-id",
        f"pretokenize-test-{int(time.time())}",
        "--",
        sys.executable,
        "jobs/pretokenize.py",
        "--input",
        str(REPO / "samples" / "images"),
        "--output",
        str(out),
        "--tokenizer",
        "preset:tiny",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 4 and manifest["counts"]["rejected"] == 0
    kept = pq.read_table(out / "shards" / "_root.parquet").to_pylist()
    assert sorted(r["key"] for r in kept) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert all(len(r["tokens"]) == 121 for r in kept)
