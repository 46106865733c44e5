"""Real servers for integration tests, started once per session on 127.0.0.1."""

import os

import pytest

from tests.integration.ray_procs import free_port


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray for one test module. address="local" never joins a cluster already running on the
    machine; more logical CPUs than cores so read/filter tasks find a slot next to the actors."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """An S3-compatible server (moto in server mode, as s3fs's own tests use) with one bucket."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        mp.setenv(k, v)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="tokenflow-test")
    yield endpoint
    mp.undo()
    server.stop()


# The flags of the deployed servers (infra/mlflow/) that the fixture runs with too, so that what is tested is what
# is deployed (tests/unit/test_infra.py holds the two to the same flags, the backend store aside).
MLFLOW_SERVER_FLAGS = ("--serve-artifacts", "--allowed-hosts", "127.0.0.1:*,localhost:*")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, proxied local artifacts) on 127.0.0.1."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists() and shutil.which("mlflow") is None:
        pytest.skip("mlflow CLI not installed")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(exe),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            *MLFLOW_SERVER_FLAGS,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # no job runner: its ~10 huey consumer processes (MLflow's GenAI jobs, unused here) cost a 2-core machine
        # about half a minute of CPU at start and keep polling for the whole session
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("mlflow server did not start")
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)
