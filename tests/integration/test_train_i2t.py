"""The understanding model's training job on a real local Ray cluster: 2 CPU workers, the align stage under ZeRO-2
(its output fits the SFT stage's projector_init), the SFT stage under ZeRO-3 from a saved projector, resumed by
rerunning the command, tracked in a real MLflow server; and a ZeRO-3 step where one worker's micro-batch has no
image at all."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipelines.llm_train import build_decoder, load_text_tokenizer
from pipelines.train_i2t import TrainI2TConfig, load_projector, run
from tests.integration.t2i_shards import save_tiny_tokenizer, write_token_shards
from tokenflow.config import load_config
from tokenflow.llm.i2t import I2TConfig, I2TModel
from tokenflow.llm.i2t_step import I2TStep
from tokenflow.llm.t2i import decoder_config

CONFIG = "jobs/configs/i2t_tiny.yaml"


def _turns(question: str, answer: str) -> str:
    return json.dumps([{"from": "human", "value": question}, {"from": "gpt", "value": answer}])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Caption shards (the plain formats) and one conversation shard (the llava format): image and text-only
    conversations, one malformed and one whose answer does not fit max_length."""
    root = tmp_path_factory.mktemp("i2t_data")
    tok = save_tiny_tokenizer(root / "tokenizer")
    write_token_shards(root / "captions", tok, shards=2, rows=8)
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(12):
        image = i % 3 != 0
        rows.append(
            {
                "key": f"llava.json/{i}",
                "caption": None,
                "tokens": torch.randint(0, tok.codebook_size, (tok.tokens_per_image,), generator=g).tolist()
                if image
                else None,
                "conversations": _turns(("<image>\n" if image else "") + f"What is item {i}?", f"It is number {i}."),
            }
        )
    rows.append({**rows[1], "key": "llava.json/bad", "conversations": '[{"from": "gpt"'})
    rows.append({**rows[1], "key": "llava.json/long", "conversations": _turns("<image>\n" + "why " * 200, "ok")})
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("tokens", pa.list_(pa.uint16())),
            ("conversations", pa.string()),
        ]
    )
    (root / "chat" / "shards").mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata({b"tokenizer_id": tok.fingerprint()})
    pq.write_table(table, root / "chat" / "shards" / "part-00000.parquet")
    return root, tok


def config(data, storage, **overrides) -> TrainI2TConfig:
    root, _ = data
    base = {
        "tokenizer": str(root / "tokenizer"),
        "storage_path": str(storage),
        "log_every": 2,
        "sample_every": 0,
        "data.max_length": 128,
        "data.repeat": 1,
        "data.group_window": 2,
    }
    base.update({k: str(v) for k, v in overrides.items()})
    return load_config(TrainI2TConfig, CONFIG, [f"{k}={v}" for k, v in base.items()])


def test_align_and_sft_runs_resumed_and_tracked(ray_local, data, mlflow_server, tmp_path):
    import threading

    import mlflow

    root, tok = data
    # the SFT run starts from a saved model's projector (the align run's RUN_DIR/model in practice; that its output
    # fits is checked below): the two runs are independent and run side by side
    torch.manual_seed(3)
    seed_model = I2TModel(I2TConfig(llm=decoder_config(vocab_size=32), image_tokens=64))
    seed_model.save_pretrained(tmp_path / "projector", extra={"image_tokenizer_id": tok.fingerprint()})
    align: dict = {}
    align_cfg = config(data, tmp_path, stage="align", name="align", max_steps=3, checkpoint_every=3,
                       **{"data.input": f"[{root / 'captions'}]"})  # fmt: skip
    side = threading.Thread(target=lambda: align.update(run(align_cfg)), daemon=True)
    side.start()
    sft = dict(
        stage="sft",
        name="sft",
        projector_init=str(tmp_path / "projector"),
        checkpoint_every=2,
        mlflow_uri=mlflow_server,
        sample_every=2,
        **{"data.input": f"[{root / 'chat'}, {root / 'captions'}]"},
    )
    first = run(config(data, tmp_path, max_steps=2, **sft))
    assert first["checkpoint"].endswith("step_00000002")
    side.join(timeout=600)
    assert align, "the align run did not complete"

    init = I2TModel.from_pretrained(align["model"])
    assert init.config.template == "plain" and init.config.image_tokens == 64
    # align trains the projector only: the decoder is still the one every worker built from the seed
    torch.manual_seed(0)
    cfg = config(data, tmp_path)
    fresh = build_decoder(None, cfg.llm_config, len(load_text_tokenizer("deepseek", None)))
    for k, v in fresh.state_dict().items():
        assert torch.equal(init.llm.state_dict()[k], v), k
    # and its output is what an SFT run's projector_init takes
    load_projector(seed_model, align["model"], {"id": tok.fingerprint()}, zero3=False, storage_options={})
    assert torch.equal(seed_model.projector[0].weight, init.projector[0].weight)

    again = run(config(data, tmp_path, max_steps=4, **sft))
    assert again["checkpoint"].endswith("step_00000004")

    model_dir = tmp_path / "sft" / "model"
    model = I2TModel.from_pretrained(model_dir)  # ZeRO-3's partitions gathered into full tensors
    assert model.config.template == "vicuna_v1"
    payload = json.loads((model_dir / "config.json").read_text())
    assert payload["image_tokenizer_id"] == tok.fingerprint() and payload["provenance"]["steps"] == 4
    assert payload["provenance"]["projector_init"] == str(tmp_path / "projector")
    assert (model_dir / "tokenizer.json").exists()
    assert load_file(model_dir / "model.safetensors").keys() == model.state_dict().keys()

    client = mlflow.MlflowClient(mlflow_server)
    (run_info,) = client.search_runs([client.get_experiment_by_name("i2t").experiment_id])
    assert run_info.data.tags["stage"] == "sft" and run_info.data.tags["template"] == "vicuna_v1"
    history = [m.step for m in client.get_metric_history(run_info.info.run_id, "loss")]
    assert history == [2, 4]  # the resumed run continued the same MLflow run
    metrics = run_info.data.metrics
    assert metrics["data/rejected.conversations_invalid"] >= 1 and metrics["data/zero_supervision"] >= 1
    assert metrics["data/samples_text_only"] >= 1 and metrics["data/samples_image"] >= 1
    artifacts = {a.path for a in client.list_artifacts(run_info.info.run_id, "conversations")}
    assert artifacts == {"conversations/step_00000002.txt", "conversations/step_00000004.txt"}
    text = client.download_artifacts(run_info.info.run_id, "conversations/step_00000004.txt", str(tmp_path))
    body = open(text).read()
    assert "=== worker 0" in body and "=== worker 1" in body and "--- reference" in body


# ---- one worker without an image under ZeRO-3 -------------------------------------------------------------------


def zero3_loop(config: dict) -> None:
    """Rank 0 trains on text-only samples, rank 1 on image samples; both generate (rank 0 without an image)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from pipelines.llm_train import param_groups, zero3_construction
    from tokenflow.llm.i2t import I2TConfig, I2TModel
    from tokenflow.llm.i2t_step import I2TStep
    from tokenflow.train import OptimizerConfig
    from tokenflow.train.deepspeed import ds_config

    rank = ray.train.get_context().get_world_rank()
    opt = OptimizerConfig(lr=1e-3, betas=(0.9, 0.999), max_grad_norm=0.0, decoupled_weight_decay=True)
    ds = ds_config(opt, zero_stage=3, micro_batch=2, grad_accum=1, world_size=2, bf16=False)
    deepspeed.init_distributed()
    torch.manual_seed(0)
    with zero3_construction(ds) as init, init:
        model = I2TModel(I2TConfig(llm=config["llm"], image_tokens=4, code_dim=8))
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=ds)
    batch = config["batches"][rank]
    step = I2TStep(engine, lambda t: config["codes"][t[:, 1:]], image_tokens=4, code_dim=8, world_size=2)
    sums = step([batch], config["global_count"])
    index = int(batch["image_index"][0])
    features = step.inputs(batch, "cpu")["features"][: 1 if index >= 0 else 0]
    answer = engine.module.generate(
        [batch["input_ids"][0, :3].tolist()], [index if 0 <= index <= 3 else None], features,
        max_new_tokens=2 + 3 * rank, eos_token_id=10**6, synced_gpus=True,
    )  # fmt: skip
    out = [None, None]
    dist.all_gather_object(out, {"loss_sum": float(sums["loss_sum"]), "answer": answer[0]})
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    if rank == 0:
        torch.save({"results": out, "initial": initial, "weights": weights}, config["out"])


def test_zero3_step_with_a_text_only_worker_matches_one_process(ray_local, tmp_path):
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    llm = decoder_config(vocab_size=64)
    codes = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    text_only = {
        "input_ids": torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]]),
        "labels": torch.tensor([[-100, -100, 6, 7, 2], [-100, -100, 9, 2, -100]]),
        "lengths": torch.tensor([5, 4]),
        "image_index": torch.tensor([-1, -1]),
        "tokens": torch.zeros(0, 0, dtype=torch.long),
    }
    images = {
        "input_ids": torch.tensor([[1, 3, 11, 12, 2], [1, 3, 13, 2, 0]]),
        "labels": torch.tensor([[-100, -100, 11, 12, 2], [-100, -100, 13, 2, -100]]),
        "lengths": torch.tensor([5, 4]),
        "image_index": torch.tensor([1, 1]),
        "tokens": torch.tensor([[0, 1, 2, 3, 4], [0, 5, 6, 7, 8]]),
    }
    global_count = 5.0 + 5.0  # supervised targets of both workers
    out = tmp_path / "zero3.pt"
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module by name
    TorchTrainer(
        zero3_loop,
        train_loop_config={
            "llm": llm,
            "codes": codes,
            "batches": [text_only, images],
            "global_count": global_count,
            "out": str(out),
        },  # fmt: skip
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()
    saved = torch.load(out, weights_only=False)
    (r0, r1) = saved["results"]
    assert len(r0["answer"]) == 2 and len(r1["answer"]) == 5  # the ranks finished apart, in step

    # one process, both micro-batches, the same normalisation: the same loss and the same updated weights
    model = I2TModel(I2TConfig(llm=llm, image_tokens=4, code_dim=8))
    model.load_state_dict(saved["initial"])  # the workers' initial weights (zero.Init draws them in its own order)
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    step = I2TStep(model, lambda t: codes[t[:, 1:]], image_tokens=4, code_dim=8)
    losses = [model(**step.inputs(b, "cpu")).loss_sum for b in (text_only, images)]
    assert [r0["loss_sum"], r1["loss_sum"]] == pytest.approx([float(x) for x in losses], rel=1e-5)
    (sum(losses) / global_count).backward()
    grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    adam.step()
    for k, v in model.named_parameters():
        # Adam's first step moves each weight by about lr * sign(grad): compare where the gradient is clearly
        # not zero (a sign decided by rounding noise could go either way)
        clear = grads[k].abs() > 1e-6
        assert clear.any() or k.startswith("llm.model.embed_tokens"), k
        torch.testing.assert_close(saved["weights"][k][clear], v.detach()[clear], rtol=1e-4, atol=1e-6, msg=k)
