"""The understanding training job's configuration: stage defaults, flags, the official recipe; the projector a
second stage starts from."""

import pytest
import torch

from jobs.train_i2t import config_from_args, parse_args
from pipelines.train_i2t import TrainI2TConfig, load_projector
from tokenflow.config import load_config
from tokenflow.llm.i2t import I2TConfig, I2TModel
from tokenflow.llm.t2i import decoder_config

TINY = "jobs/configs/i2t_tiny.yaml"


def test_the_stage_sets_the_template_what_trains_and_the_engine():
    align = config_from_args(parse_args(["--config", TINY, "--stage", "align"]))
    sft = config_from_args(parse_args(["--config", TINY, "--stage", "sft"]))
    assert (align.active.template, align.active.trainable, align.zero_stage) == ("plain", "projector", 2)
    assert (sft.active.template, sft.active.trainable, sft.zero_stage) == ("vicuna_v1", "all", 3)
    # named flags win over the stage's defaults; --set reaches the stage sections
    cfg = config_from_args(
        parse_args(
            ["--config", TINY, "--stage", "sft", "--zero-stage", "2", "--set", "sft.lr=3e-4", "--micro-batch", "4"]
        )
    )
    assert (cfg.zero_stage, cfg.micro_batch, cfg.optimizer.lr) == (2, 4, 3e-4)
    cfg = config_from_args(parse_args(["--config", TINY, "--output", "runs/x/i2t-a", "--projector-init", "m/align"]))
    assert (cfg.storage_path, cfg.name, cfg.projector_init, cfg.model_dir) == (
        "runs/x",
        "i2t-a",
        "m/align",
        "runs/x/i2t-a/model",
    )


def test_the_defaults_are_the_official_recipe():
    cfg = TrainI2TConfig(stage="align", llm="/models/qwen", tokenizer="t", max_steps=2000)
    opt = cfg.optimizer
    assert (cfg.active.template, cfg.zero_stage, cfg.micro_batch, cfg.grad_accum) == ("plain", 2, 2, 8)
    assert (opt.lr, opt.weight_decay, opt.schedule, opt.min_lr_ratio, opt.max_grad_norm) == (
        1e-3,
        0.0,
        "cosine",
        0.0,
        1.0,
    )
    assert opt.warmup_steps == 60 and opt.betas == (0.9, 0.999) and opt.decoupled_weight_decay  # ceil(3% of 2000)
    sft = TrainI2TConfig(stage="sft", llm="/models/qwen", tokenizer="t")
    assert (sft.active.template, sft.zero_stage, sft.micro_batch, sft.grad_accum, sft.optimizer.lr) == (
        "qwen_2_5",
        3,
        2,
        1,
        2e-5,
    )
    assert cfg.data.max_length == 2048 and cfg.activation_checkpointing
    for path in ("jobs/configs/i2t_qwen2.5_7b.yaml", "jobs/configs/i2t_qwen2.5_14b.yaml"):
        big = load_config(TrainI2TConfig, path)
        assert (big.sft.template, big.sft.lr, big.align.lr, big.data.max_length) == ("qwen_2_5", 2e-5, 1e-3, 2048), path


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="stage must be align or sft"):
        TrainI2TConfig(stage="pretrain", llm="x")
    with pytest.raises(ValueError, match="unknown chat template"):
        load_config(TrainI2TConfig, TINY, ["sft.template=chatml"])
    with pytest.raises(ValueError, match="trainable must be projector or all"):
        load_config(TrainI2TConfig, TINY, ["align.trainable=lm_head"])
    with pytest.raises(ValueError, match="needs text_tokenizer"):
        load_config(TrainI2TConfig, TINY, ["text_tokenizer=null"])


def test_the_projector_comes_from_a_saved_model_trained_on_the_same_image_tokenizer(tmp_path):
    config = I2TConfig(llm=decoder_config(vocab_size=32), image_tokens=4, code_dim=8)
    torch.manual_seed(1)
    trained = I2TModel(config)
    trained.save_pretrained(tmp_path / "align", extra={"image_tokenizer_id": "tok-a"})
    torch.manual_seed(2)
    model = I2TModel(config)
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    load_projector(model, str(tmp_path / "align"), {"id": "tok-a"}, zero3=False, storage_options={})
    for k, v in trained.projector.state_dict().items():
        assert torch.equal(model.projector.state_dict()[k], v), k
    assert all(torch.equal(model.llm.state_dict()[k], v) for k, v in llm_before.items())  # only the projector

    with pytest.raises(ValueError, match="trained on the features of image tokenizer 'tok-a', not 'tok-b'"):
        load_projector(model, str(tmp_path / "align"), {"id": "tok-b"}, zero3=False, storage_options={})
    wider = I2TModel(I2TConfig(llm=decoder_config(vocab_size=32), image_tokens=4, code_dim=16))
    with pytest.raises(ValueError, match=r"projector.0.weight is \(64, 8\), not \(64, 16\)"):
        load_projector(wider, str(tmp_path / "align"), {"id": "tok-a"}, zero3=False, storage_options={})
