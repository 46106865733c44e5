"""The understanding model's training job on a real local Ray cluster, 2 CPU workers: the align stage under ZeRO-2
(its output fits the SFT stage's projector_init), and a ZeRO-3 step where one worker's micro-batch has no image at
all, equal to one process. The SFT stage's run (ZeRO-3, resumed, MLflow) is in test_job_submit.py."""

import json

import pytest
import torch

from pipelines.llm_train import build_decoder, load_text_tokenizer
from pipelines.train_i2t import TrainI2TConfig, load_projector, run
from tests.integration.i2t_shards import save_projector_model, write_i2t_data
from tokenflow.config import load_config
from tokenflow.llm.i2t import I2TConfig, I2TModel
from tokenflow.llm.i2t_step import I2TStep
from tokenflow.llm.t2i import decoder_config

CONFIG = "jobs/configs/i2t_tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2t_data")
    return root, write_i2t_data(root)


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


def test_align_trains_the_projector_only_and_its_output_starts_an_sft_run(ray_local, data, tmp_path):
    """The align stage under ZeRO-2 on caption shards. (The SFT stage under ZeRO-3, resumed and tracked in MLflow,
    runs through `ray job submit` in tests/integration/test_job_submit.py.)"""
    root, tok = data
    align = run(config(data, tmp_path, stage="align", name="align", max_steps=3, checkpoint_every=3,
                       **{"data.input": f"[{root / 'captions'}, {root / 'chat'}]"}))  # fmt: skip
    assert align["checkpoint"].endswith("step_00000003")
    init = I2TModel.from_pretrained(align["model"])
    assert init.config.template == "plain" and init.config.image_tokens == 64
    payload = json.loads((tmp_path / "align" / "model" / "config.json").read_text())
    assert payload["image_tokenizer_id"] == tok.fingerprint() and payload["provenance"]["stage"] == "align"
    # align trains the projector only: the decoder is still the one every worker built from the seed
    torch.manual_seed(0)
    cfg = config(data, tmp_path)
    fresh = build_decoder(None, cfg.llm_config, len(load_text_tokenizer("deepseek", None)))
    for k, v in fresh.state_dict().items():
        assert torch.equal(init.llm.state_dict()[k], v), k
    # its output is what an SFT run's projector_init takes
    seed_model = save_projector_model(tmp_path / "seed", tok.fingerprint())
    assert not torch.equal(seed_model.projector[0].weight, init.projector[0].weight)
    load_projector(seed_model, align["model"], {"id": tok.fingerprint()}, zero3=False, storage_options={})
    assert torch.equal(seed_model.projector[0].weight, init.projector[0].weight)


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
