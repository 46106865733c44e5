"""The text-to-image training job on a real local Ray cluster: 2 CPU workers, DeepSpeed ZeRO-3, token shards from a
saved image tokenizer, a real MLflow server, a resumed run equal to an uninterrupted one, and shards of another
tokenizer refused."""

import json
import threading

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
        "data.repeat": 1,
    }
    base.update({k: str(v) for k, v in overrides.items()})
    return load_config(TrainT2IConfig, CONFIG, [f"{k}={v}" for k, v in base.items()])


def weights(path) -> dict:
    return load_file(path / "model.safetensors")


def test_zero3_resumed_run_equals_an_uninterrupted_one(ray_local, data, mlflow_server, tmp_path):
    """8 steps cross into the second epoch (26 rows, 2 of them bad, over 2 workers: 6 batches of 2 each); the
    interrupted run stops at step 4 and is run again with the same command."""
    import mlflow

    _, tok = data
    common = dict(zero_stage=3, mlflow_uri=mlflow_server, max_steps=8, checkpoint_every=4, log_every=4)
    # the uninterrupted run and the first half of the interrupted one are independent: run them side by side
    straight: dict = {}
    thread = threading.Thread(target=lambda: straight.update(run(config(data, tmp_path, name="straight", **common))))
    thread.start()
    first = run(config(data, tmp_path, name="resumed", **{**common, "max_steps": 4}))
    thread.join(timeout=600)
    assert straight and first["checkpoint"].endswith("step_00000004")
    again = run(config(data, tmp_path, name="resumed", **common))
    assert again["checkpoint"].endswith("step_00000008")

    a, b = weights(tmp_path / "straight" / "model"), weights(tmp_path / "resumed" / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the export gathered ZeRO-3's partitions into full tensors
    model = T2IModel.from_pretrained(tmp_path / "straight" / "model")
    assert model.llm.get_input_embeddings().weight.shape[0] > 100_000  # the deepseek text vocabulary
    payload = json.loads((tmp_path / "straight" / "model" / "config.json").read_text())
    assert payload["image_tokenizer_id"] == tok.fingerprint() and payload["provenance"]["steps"] == 8
    assert (tmp_path / "straight" / "model" / "tokenizer.json").exists()

    # MLflow: the resumed run continued the same MLflow run; metrics of every window
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["t2i"], filter_string="tags.mlflow.runName = 'resumed'")
    assert len(runs) == 1
    row = runs.iloc[0]
    history = client.get_metric_history(row.run_id, "loss/image_eos")
    assert [m.step for m in history] == [4, 8]
    names = set(client.get_run(row.run_id).data.metrics)
    expected = ["loss/image", "loss/text", "lr", "grad_norm", "throughput/tokens_per_s", "accuracy/all"]
    expected += ["accuracy/scale_00", "accuracy/scale_04", "data/caption_dropout_rate"]
    expected += ["data/caption_first_sentence_rate", "data/rejected", "data/epoch"]
    for name in expected:
        assert name in names, name
    assert row["metrics.data/epoch"] == 1
    # the bad rows of the first shard are counted by reason, across the restart
    reasons = row["metrics.data/rejected.caption_missing"] + row["metrics.data/rejected.tokens_length"]
    assert row["metrics.data/rejected"] == reasons >= 2
    samples = [a.path for a in client.list_artifacts(row.run_id, "samples")]
    assert samples == ["samples/step_00000004.png", "samples/step_00000008.png"]


def test_shards_of_another_tokenizer_are_refused_before_any_worker_starts(ray_local, data, tmp_path):
    # (ZeRO-2 runs of the LLM jobs: the understanding model's align stage, tests/integration/test_train_i2t.py,
    # through the same pipelines/llm_train.py; `make demo` trains this model under ZeRO-2)
    other = tmp_path / "other_tokens"
    write_token_shards(other, data[1], shards=1, rows=2, tokenizer_id="0123456789abcdef")
    with pytest.raises(ValueError, match="made by tokenizer '0123456789abcdef'.*trains with tokenizer"):
        run(config(data, tmp_path, name="wrong", **{"data.input": f"[{other}]"}))
