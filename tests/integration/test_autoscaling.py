"""Autoscaling for real on one machine: the node types of `ray_cluster.yaml` on Ray's fake multi-node provider.

The cluster starts as a head with no CPUs and no workers. The pretokenize job, asking for the tokenize node type's
custom resource as `jobs/configs/pretokenize_cluster.yaml` does (this machine has no GPU, so the job asks for the
custom resource alone), makes the autoscaler launch a tokenize node and a CPU node; the training node type is never
launched; the output is complete; and once the job has ended, the idle nodes are removed.

Resources are scaled down to fit a 2-core machine (1 CPU and at most 1 GPU per node, one node of each GPU type and
three CPU nodes at most);
everything else (node type names, custom resources, upscaling speed) comes from `ray_cluster.yaml`. Ray's wheel
lacks the `example.yaml` that `ray.cluster_utils.AutoscalingCluster` reads, so the fake-provider config is written
here. The driver runs on the head machine without `--working-dir`: fake nodes share one session directory, and a
node scaled down mid-job was seen to take the job's unpacked working directory with it (`ray job submit` is
covered by tests/integration/test_job_submit.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.ray_procs import free_port, start_head, stop_cluster
from tests.integration.sample_corpus import assert_sample_corpus_tokenized

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IDLE_TIMEOUT_MIN = 0.1  # ray_cluster.yaml says 10; seconds here


def fake_cluster_config(gcs_address: str) -> dict:
    """`ray_cluster.yaml`'s worker node types on the fake multi-node provider, 1 CPU (and 1 GPU) each."""
    src = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    types = {}
    for name, node_type in src["available_node_types"].items():
        if name == src["head_node_type"]:
            continue
        res = node_type["resources"]
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        # A GPU node keeps one GPU that nothing here asks for: the autoscaler then keeps CPU-only demand (the read
        # tasks) off it, as it does on AWS.
        gpu = {"GPU": 1} if res.get("GPU") else {}
        # Up to 3 CPU nodes (1 of each GPU type): room for the read tasks' CPU demand, which the autoscaler serves
        # with a GPU node only when no CPU-only node type can grow any more.
        most = min(node_type["max_workers"], 3 if not gpu else 1)
        resources = {"CPU": 1, **gpu, **custom}
        types[name] = {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": most}
    types["ray.head.default"] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "fake-" + src["cluster_name"],
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": src["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory):
    """(GCS address, environment) of a head started as ray_cluster.yaml starts it (no CPUs, token auth)."""
    if not (BIN / "ray").exists():
        pytest.skip("ray CLI not installed")
    from ray._private.services import get_node_ip_address

    # the node's own address: Ray turns 127.0.0.1 in a driver's address into it anyway
    address = f"{get_node_ip_address()}:{free_port()}"
    temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    config = tmp_path_factory.mktemp("autoscaler") / "cluster.json"
    config.write_text(json.dumps(fake_cluster_config(address)))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",  # as ray_cluster.yaml's start commands; every process below inherits it
    }
    start_head(
        temp_dir,
        env,
        f"--port={address.rsplit(':', 1)[1]}",
        "--num-cpus=0",
        f"--autoscaling-config={config}",
        "--include-dashboard=false",
    )
    try:
        yield address, env
    finally:
        stop_cluster(temp_dir)


WATCH = """
import json, sys, time
import ray

ray.init(address=sys.argv[1], log_to_driver=False)
last = None
while True:
    types = set()
    for node in ray.nodes():
        res = node["Resources"]
        if node["Alive"] and res.get("CPU"):  # the head has no CPUs
            types.add(next((k for k in ("tokenize_gpu", "train_gpu") if k in res), "cpu"))
    if sorted(types) != last:
        last = sorted(types)
        print(json.dumps([time.time(), last]), flush=True)
    time.sleep(0.5)
"""


class NodeWatch:
    """The cluster's alive worker node types over time, from a driver in its own process (this test process
    cannot be one: Ray reads RAY_AUTH_MODE when it is first imported)."""

    def __init__(self, address: str, env: dict):
        self.seen: list[tuple[float, frozenset[str]]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WATCH, address],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        deadline = time.time() + 120
        while not self.seen and time.time() < deadline and self.proc.poll() is None:
            time.sleep(0.2)
        if not self.seen:
            raise RuntimeError("the node watcher could not connect to the cluster")

    def _read(self) -> None:
        for line in self.proc.stdout:
            t, types = json.loads(line)
            self.seen.append((t, frozenset(types)))

    def now(self) -> frozenset[str]:
        return self.seen[-1][1]

    def ever(self) -> set[str]:
        return set().union(*(s for _, s in self.seen))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_pretokenize_scales_a_tokenize_node_up_and_back_down(autoscaling_head, tmp_path):
    address, env = autoscaling_head
    watch = NodeWatch(address, env)
    try:
        assert watch.now() == frozenset(), "the cluster must start without worker nodes"
        cluster_cfg = yaml.safe_load((REPO / "jobs" / "configs" / "pretokenize_cluster.yaml").read_text())
        assert cluster_cfg["tokenizer_resources"] == {"tokenize_gpu": 1}  # what the command keeps from the config
        out = tmp_path / "out"
        cmd = [
            sys.executable, "jobs/pretokenize.py", "--config", "jobs/configs/pretokenize_cluster.yaml",
            "--input", str(REPO / "samples" / "images"), "--output", str(out), "--tokenizer", "preset:tiny",
            "--tokenizer-actors", "1", "--set", "tokenizer_gpus=0", "--set", "dedup_partitions=0",
            "--set", "batch_size=4",
        ]  # fmt: skip
        done = subprocess.run(
            cmd, cwd=REPO, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=600
        )
        ended = time.time()
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

        assert_sample_corpus_tokenized(out)

        assert "tokenize_gpu" in watch.ever(), watch.seen  # launched for the tokenize stage
        assert "train_gpu" not in watch.ever(), watch.seen  # a pretokenize job never starts a training node
        deadline = ended + 120
        while watch.now() and time.time() < deadline:
            time.sleep(1)
        assert watch.now() == frozenset(), f"idle nodes still up 120 s after the job: {watch.seen}"
        print("node types up, seconds from the job's end:", [(round(t - ended, 1), sorted(s)) for t, s in watch.seen])
    finally:
        watch.close()
