"""The text-to-image training job on a real local Ray cluster: 2 CPU workers, DeepSpeed ZeRO-2 and ZeRO-3, token
shards from a saved image tokenizer, a real MLflow server, and a resumed run equal to an uninterrupted one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipelines.train_t2i import TrainT2IConfig, run
from tests.integration.t2i_shards import save_tiny_tokenizer, write_token_shards
from tokenflow.config import load_config
from tokenflow.llm.t2i import T2IModel

CONFIG = "jobs/configs/t2i_tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_data")
    tok = save_tiny_tokenizer(root / "tokenizer")
    write_token_shards(root / "tokens", tok, shards=3, rows=8, bad=True)
    return root, tok


def config(data, storage, **overrides) -> TrainT2IConfig:
    root, _ = data
    base = {
        "tokenizer": str(root / "tokenizer"),
        "data.input": f"[{root / 'tokens'}]",
        "storage_path": str(storage),
        "max_steps": 4,
        "checkpoint_every": 2,
        "log_every": 2,
        "sample_every": 0,
        "micro_batch": 2,
        "data.max_text_tokens": 16,
        "sample_prompts": "[a cat, a dog]",
    }
    base.update({k: str(v) for k, v in overrides.items()})
    return load_config(TrainT2IConfig, CONFIG, [f"{k}={v}" for k, v in base.items()])


def weights(path) -> dict:
    return load_file(path / "model.safetensors")


def test_zero3_resumed_run_equals_an_uninterrupted_one(ray_local, data, mlflow_server, tmp_path):
    import mlflow

    _, tok = data
    run(config(data, tmp_path, name="straight", zero_stage=3, mlflow_uri=mlflow_server))
    first = run(config(data, tmp_path, name="resumed", zero_stage=3, max_steps=2, mlflow_uri=mlflow_server))
    assert first["checkpoint"].endswith("step_00000002")
    again = run(config(data, tmp_path, name="resumed", zero_stage=3, mlflow_uri=mlflow_server))
    assert again["checkpoint"].endswith("step_00000004")

    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "resumed" / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the export gathered ZeRO-3's partitions into full tensors
    model = T2IModel.from_pretrained(tmp_path / "straight" / "model")
    assert model.llm.get_input_embeddings().weight.shape[0] > 100_000  # the deepseek text vocabulary
    payload = json.loads((tmp_path / "straight" / "model" / "config.json").read_text())
    assert payload["image_tokenizer_id"] == tok.fingerprint() and payload["provenance"]["steps"] == 4
    assert (tmp_path / "straight" / "model" / "tokenizer.json").exists()

    # MLflow: the resumed run continued the same MLflow run; metrics of every window
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["t2i"], filter_string="tags.mlflow.runName = 'resumed'")
    assert len(runs) == 1
    run_id = runs.run_id.iloc[0]
    history = client.get_metric_history(run_id, "loss/image_eos")
    assert [m.step for m in history] == [2, 4]
    names = set(client.get_run(run_id).data.metrics)
    for name in (
        "loss/image",
        "loss/text",
        "lr",
        "grad_norm",
        "throughput/tokens_per_s",
        "accuracy/all",
        "accuracy/scale_00",
        "accuracy/scale_04",
        "data/caption_dropout_rate",
        "data/caption_first_sentence_rate",
        "data/rejected",
    ):
        assert name in names, name
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert samples == ["samples/step_00000002.png", "samples/step_00000004.png"]


def test_zero2_trains_counts_rejects_and_checks_the_tokenizer(ray_local, data, tmp_path):
    import mlflow

    root, _ = data
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # 26 rows (2 bad) over 2 workers: 13 each, 6 usable batches; 8 steps cross into the second epoch
    summary = run(config(data, tmp_path, name="z2", zero_stage=2, max_steps=8, log_every=4, mlflow_uri=uri))
    assert summary["model"] == str(tmp_path / "z2" / "model")
    mlflow.set_tracking_uri(uri)
    row = mlflow.search_runs(experiment_names=["t2i"]).iloc[0]
    assert row["metrics.data/epoch"] == 1
    assert row["metrics.data/rejected"] >= 1  # the bad rows of the first shard, counted by reason
    assert row["metrics.data/rejected"] == row.get("metrics.data/rejected.caption_missing", 0) + row.get(
        "metrics.data/rejected.tokens_length", 0
    )
    client = mlflow.MlflowClient(uri)
    losses = [m.value for m in client.get_metric_history(row.run_id, "loss/image_eos")]
    assert len(losses) == 2 and losses[1] < losses[0]

    # shards made by another tokenizer: a clear error before any worker starts
    other = tmp_path / "other_tokens"
    write_token_shards(other, data[1], shards=1, rows=2, tokenizer_id="0123456789abcdef")
    with pytest.raises(ValueError, match="made by tokenizer '0123456789abcdef'.*trains with tokenizer"):
        run(config(data, tmp_path, name="wrong", **{"data.input": f"[{other}]"}))
