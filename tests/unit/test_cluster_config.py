"""ray_cluster.yaml: Ray's own cluster-config validation, the settings platform teams rely on (a head that runs no
work, scale from zero, token auth, a dashboard that is not exposed), and consistency with what the jobs' cluster
configs ask for; and how the pretokenize job sizes and places its tokenize pool."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipelines.pretokenize import PretokenizeConfig, tokenize_pool
from pipelines.train_tokenizer import TrainTokenizerConfig
from tokenflow.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
HEAD = CLUSTER["head_node_type"]
WORKER_TYPES = {k: v for k, v in CLUSTER["available_node_types"].items() if k != HEAD}
# The job configs meant for this cluster, and the node types they must land on.
PRETOKENIZE = ROOT / "jobs" / "configs" / "pretokenize_cluster.yaml"
TRAINING = [ROOT / "jobs" / "configs" / f"tokenizer_clipb_256{s}.yaml" for s in ("", "_enhanced")]


def test_ray_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(CLUSTER)
    validate_config(prepare_config(copy.deepcopy(CLUSTER)))  # with Ray's AWS defaults filled in


def test_rays_validation_is_real():
    """The check above can fail: a misspelt key of a node type is rejected by Ray's schema."""
    from ray.autoscaler._private.util import validate_config

    broken = copy.deepcopy(CLUSTER)
    broken["available_node_types"]["cpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_head_schedules_no_work_and_workers_scale_from_zero():
    assert CLUSTER["available_node_types"][HEAD]["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in c for c in CLUSTER["head_start_ray_commands"])
    for name, node_type in WORKER_TYPES.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
    assert CLUSTER["max_workers"] >= sum(t["max_workers"] for t in WORKER_TYPES.values())
    assert 0 < CLUSTER["idle_timeout_minutes"] <= 30 and CLUSTER["upscaling_speed"] > 0


def test_token_auth_on_and_dashboard_not_exposed():
    for command in CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command
    (head_start,) = [c for c in CLUSTER["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH), never a public port
    assert CLUSTER["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # one token on every node


def test_stage_resources_are_on_distinct_node_types():
    """Each custom resource is offered by GPU node types only, one unit per GPU; no node type offers both, so
    tokenize actors never take a training node and training workers never take a tokenize node."""
    offered = {}
    for name, node_type in WORKER_TYPES.items():
        res = node_type["resources"]
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        assert len(custom) <= 1, name
        for key, amount in custom.items():
            assert amount == res.get("GPU"), f"{name}: {key} must count the node's GPUs"
            offered.setdefault(key, []).append(name)
    assert set(offered) == {"tokenize_gpu", "train_gpu"}


def _capacity(request: dict[str, float]) -> tuple[list[str], int]:
    """Node types that fit one `request` bundle, and how many bundles the cluster can hold at most."""
    fits, total = [], 0
    for name, node_type in WORKER_TYPES.items():
        res = node_type["resources"]
        per_node = min((int(res.get(k, 0) // v) for k, v in request.items() if v), default=0)
        if per_node >= 1:
            fits.append(name)
            total += per_node * node_type["max_workers"]
    return fits, total


def test_pretokenize_cluster_config_fits_the_tokenize_nodes():
    cfg = load_config(PretokenizeConfig, str(PRETOKENIZE), [])
    actors, gpus = tokenize_pool(cfg, {"CPU": 0})  # sized without any worker up: the cluster starts empty
    assert gpus == 1 and actors == cfg.tokenizer_actors
    request = {"CPU": 1, "GPU": gpus, **cfg.tokenizer_resources}  # what each tokenize actor asks Ray for
    fits, capacity = _capacity(request)
    assert fits == ["tokenize_gpu_1x"] and capacity >= actors, (fits, capacity)


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_training_configs_fit_the_training_nodes(path):
    cfg = load_config(TrainTokenizerConfig, str(path), [])
    request = {"CPU": cfg.cpus_per_worker, "GPU": cfg.gpus_per_worker, **cfg.worker_resources}
    fits, capacity = _capacity(request)
    assert fits == ["train_gpu_8x"] and capacity >= cfg.workers, (fits, capacity)


def test_a_cpu_stage_never_needs_a_gpu_node():
    fits, _ = _capacity({"CPU": 1})
    assert "cpu_worker" in fits


# ---- sizing the tokenize pool ------------------------------------------------------------------------------------


def test_tokenize_pool_defaults_follow_the_cluster():
    assert tokenize_pool(PretokenizeConfig(), {"CPU": 16, "GPU": 4}) == (4, 1.0)
    assert tokenize_pool(PretokenizeConfig(), {"CPU": 16}) == (4, 0.0)  # a quarter of the CPUs
    assert tokenize_pool(PretokenizeConfig(device="cpu"), {"CPU": 16, "GPU": 4}) == (4, 0.0)
    assert tokenize_pool(PretokenizeConfig(tokenizer_gpus=0.5), {"CPU": 16, "GPU": 4}) == (8, 0.5)
    on_custom = PretokenizeConfig(tokenizer_resources={"tokenize_gpu": 1})
    assert tokenize_pool(on_custom, {"CPU": 16, "GPU": 8, "tokenize_gpu": 3}) == (3, 1.0)


def test_tokenize_pool_on_an_empty_autoscaling_cluster_needs_a_size():
    cfg = PretokenizeConfig(tokenizer_gpus=1, tokenizer_resources={"tokenize_gpu": 1})
    with pytest.raises(ValueError, match="set tokenizer_actors"):
        tokenize_pool(cfg, {"CPU": 0})
    assert tokenize_pool(PretokenizeConfig(tokenizer_gpus=1, tokenizer_actors=32), {"CPU": 0}) == (32, 1)


def test_tokenize_placement_is_validated():
    with pytest.raises(ValueError, match="device cpu"):
        PretokenizeConfig(tokenizer_gpus=1, device="cpu")
    with pytest.raises(ValueError, match="tokenizer_resources"):
        PretokenizeConfig(tokenizer_resources={"tokenize_gpu": 0})
    with pytest.raises(ValueError, match="tokenizer_actors"):
        PretokenizeConfig(tokenizer_actors=0)
