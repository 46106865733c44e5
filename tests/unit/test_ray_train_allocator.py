"""CPU training workers keep their freed buffers (pipelines/ray_train.py: `keep_large_buffers` in `worker_device`,
`CPU_WORKER_ENV` in the workers' environment); GPU workers are left alone."""

import sys

import pytest

from pipelines.ray_train import CPU_WORKER_ENV, RayTrainConfig, keep_large_buffers, make_trainer


def trainer_env(cfg) -> dict | None:
    trainer, _ = make_trainer(cfg, lambda config: None, {}, {}, None)
    env = trainer.run_config.worker_runtime_env
    return (env or {}).get("env_vars")


def test_cpu_workers_get_one_malloc_arena_and_gpu_workers_nothing(tmp_path):
    assert CPU_WORKER_ENV == {"MALLOC_ARENA_MAX": "1"}
    assert trainer_env(RayTrainConfig(storage_path=str(tmp_path))) == CPU_WORKER_ENV
    assert trainer_env(RayTrainConfig(storage_path=str(tmp_path), gpus_per_worker=1)) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_thresholds_are_accepted_by_glibc():
    assert keep_large_buffers()
