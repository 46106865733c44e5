"""Stopping one test cluster started with `ray start` without touching any other Ray on the machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

MARKER = "TOKENFLOW_TEST_RAY_CLUSTER"
"""Put in the environment of `ray start` with the cluster's temp dir as value: every process of that cluster
inherits it, also the agents that rename themselves (`ray::DashboardAgent`) and a fake autoscaler's nodes."""


def start_head(temp_dir: str, env: dict, *flags: str) -> None:
    """`ray start --head` with the cluster's files in temp_dir (its processes name it), MARKER=temp_dir in every
    process's environment, free agent ports and no usage stats; `flags` add the rest."""
    ray = Path(sys.executable).parent / "ray"
    subprocess.run(
        [str(ray), "start", "--head", f"--temp-dir={temp_dir}", "--disable-usage-stats", *agent_port_flags(), *flags],
        check=True,
        env={**env, MARKER: temp_dir},
        capture_output=True,
        text=True,
        timeout=180,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_port_flags() -> list[str]:
    """`ray start` flags giving the head's agents free ports. Left at their defaults (52365 for the dashboard
    agent) they collide with any other Ray on the machine, or one still exiting, and `ray job submit` then
    fails with "No available agent to submit job"."""
    flags = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    return [f"--{flag}={free_port()}" for flag in flags]


def stop_cluster(temp_dir: str) -> None:
    """Kill the processes of the cluster started with MARKER=temp_dir (or naming temp_dir), then remove temp_dir.
    Killed at once and swept again: a raylet given time to shut down restarts its agents."""
    import psutil

    tag = f"{MARKER}={temp_dir}".encode()

    def ours(p: psutil.Process) -> bool:
        try:
            # the raw block: a process that renamed itself (setproctitle) leaves empty entries at the start of
            # its environment, where psutil's environ() stops reading
            with open(f"/proc/{p.pid}/environ", "rb") as fh:
                if tag in fh.read().split(b"\0"):
                    return True
            return temp_dir in " ".join(p.cmdline())
        except (psutil.Error, OSError):
            return False

    for _ in range(5):
        procs = [p for p in psutil.process_iter() if p.pid != os.getpid() and ours(p)]
        if not procs:
            break
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=5)
        time.sleep(1)
    shutil.rmtree(temp_dir, ignore_errors=True)


def train_workers(run_name: str) -> list:
    """The Ray Train worker processes of run `run_name` on this machine: Ray Train moves each worker into the
    run's working directory (`.../artifacts/<run name>`), so runs side by side are told apart."""
    import psutil

    workers = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])) and (
                os.path.basename(p.cwd()) == run_name
            ):
                workers.append(p)
        except (psutil.Error, OSError):
            pass
    return workers


def kill_a_worker_after(
    run_dir, checkpoint: str, running, timeout_s: float = 300, storage_options: dict | None = None
) -> None:
    """SIGKILL one training worker of the run in `run_dir` (storage_path/name: a local path or an fsspec URI such as
    s3://) once its controller has registered `checkpoint` (e.g. "step_00000004"); `running()` says whether the
    run is still going."""
    import signal

    import fsspec

    fs, root = fsspec.core.url_to_fs(str(run_dir), **(storage_options or {}))
    snapshot = root.rstrip("/") + "/checkpoint_manager_snapshot.json"

    def registered() -> bool:
        try:
            return checkpoint in fs.cat_file(snapshot).decode()  # read each time: no cached listing
        except FileNotFoundError:
            return False

    deadline = time.time() + timeout_s
    while not registered() and time.time() < deadline and running():
        time.sleep(0.2)
    assert registered(), f"{checkpoint} was not registered in {snapshot}"
    workers = train_workers(root.rstrip("/").rsplit("/", 1)[-1])
    assert len(workers) == 2, workers
    os.kill(workers[1].info["pid"], signal.SIGKILL)
