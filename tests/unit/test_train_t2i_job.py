"""jobs/train_t2i.py's command line: flags over the YAML, --output as the run directory, --llm as a file or a dir."""

import pytest
import yaml

from jobs.train_t2i import config_from_args, parse_args

TINY = "jobs/configs/t2i_tiny.yaml"


def cfg(*argv):
    return config_from_args(parse_args(["--config", TINY, *argv]))


def test_output_is_the_run_directory():
    c = cfg("--output", "s3://bucket/runs/t2i-7b/")
    assert (c.storage_path, c.name, c.run_dir, c.model_dir) == (
        "s3://bucket/runs",
        "t2i-7b",
        "s3://bucket/runs/t2i-7b",
        "s3://bucket/runs/t2i-7b/model",
    )
    assert cfg("--output", "t2i").run_dir == "./t2i"
    with pytest.raises(ValueError, match="give the run directory"):
        cfg("--output", "/")


def test_llm_directory_or_config_file(tmp_path):
    c = cfg("--llm", str(tmp_path))  # a pretrained model directory: its own text tokenizer, no config fields
    assert c.llm == str(tmp_path) and c.llm_config == {} and c.text_tokenizer is None
    fields = tmp_path / "decoder.yaml"
    fields.write_text(yaml.safe_dump({"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 2}))
    c = cfg("--llm", str(fields))
    assert c.llm is None and c.llm_config == {"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 2}
    assert c.text_tokenizer == "deepseek"  # the YAML's, kept for a new model


def test_flags_win_over_the_yaml():
    c = cfg(
        "--max-steps", "7", "--workers", "3", "--zero-stage", "3", "--micro-batch", "5", "--data", "a", "--data", "b"
    )
    assert (c.max_steps, c.workers, c.zero_stage, c.micro_batch, c.data.input) == (7, 3, 3, 5, ["a", "b"])
    assert cfg("--set", "optimizer.lr=0.01").optimizer.lr == 0.01


def test_configs_load_with_the_official_recipe():
    from pipelines.train_t2i import TrainT2IConfig
    from tokenflow.config import load_config

    for name in ("t2i_1b", "t2i_7b"):
        c = load_config(TrainT2IConfig, f"jobs/configs/{name}.yaml")
        o = c.optimizer
        assert (o.lr, o.betas, o.weight_decay, o.warmup_steps, o.max_grad_norm) == (5e-4, (0.9, 0.999), 0.1, 5000, 0.5)
        assert o.decoupled_weight_decay and c.zero_stage == 3 and c.micro_batch == 16 and c.data.max_text_tokens == 128


def test_attention_choice():
    from pipelines.train_t2i import run

    assert cfg().attention == "sdpa"
    assert cfg("--set", "attention=flex", "--gpus-per-worker", "1").attention == "flex"
    with pytest.raises(ValueError, match="GPUs only"):
        run(cfg("--set", "attention=flex"))  # refused before anything starts
    with pytest.raises(ValueError, match="attention must be sdpa or flex"):
        cfg("--set", "attention=eager")
