"""CPU training workers and CPU tokenize actors keep their freed buffers (pipelines/cpu_allocator.py:
`keep_large_buffers` in `worker_device` and `TokenizeStage`, `CPU_WORKER_ENV` in their environment); GPU workers
and GPU actors are left alone."""

import sys

import pytest

from pipelines.cpu_allocator import CPU_WORKER_ENV, keep_large_buffers
from pipelines.pretokenize import PretokenizeConfig, tokenize_actor_args
from pipelines.ray_train import RayTrainConfig, make_trainer
from pipelines.tokenize import TokenizeStage


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


def test_cpu_tokenize_actors_get_one_malloc_arena_and_gpu_actors_nothing():
    assert tokenize_actor_args(PretokenizeConfig(), 0.0) == {
        "num_gpus": 0.0,
        "num_cpus": 1,
        "runtime_env": {"env_vars": CPU_WORKER_ENV},
    }
    on_gpu_nodes = PretokenizeConfig(tokenizer_resources={"tokenize_gpu": 1})
    assert tokenize_actor_args(on_gpu_nodes, 1.0) == {"num_gpus": 1.0, "num_cpus": 1, "resources": {"tokenize_gpu": 1}}


def test_a_cpu_tokenize_stage_keeps_large_buffers(monkeypatch):
    calls = []
    monkeypatch.setattr("pipelines.tokenize.keep_large_buffers", lambda: calls.append("kept") or True)
    TokenizeStage("preset:tiny", device="cpu")
    assert calls == ["kept"]
