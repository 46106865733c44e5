"""The training job's configuration: YAML, --set overrides and named flags, in that order of precedence."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from jobs.train_tokenizer import config_from_args, parse_args
from pipelines.train_tokenizer import TrainTokenizerConfig
from tokenflow.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_flags_win_over_set_which_wins_over_the_yaml():
    args = parse_args(
        [
            "--config",
            os.path.join(ROOT, "jobs/configs/tokenizer_tiny.yaml"),
            "--set",
            "workers=4",
            "--set",
            "train.loss.disc_start=7",
            "--set",
            "zero_stage=1",
            "--zero-stage",
            "3",
            "--input",
            "a.tar",
            "--input",
            "b.tar",
            "--max-steps",
            "9",
            "--stage",
            "decoder",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.workers == 4 and cfg.zero_stage == 3 and cfg.train.loss.disc_start == 7
    assert cfg.data.input == ["a.tar", "b.tar"] and cfg.train.max_steps == 9 and cfg.train.stage == "decoder"
    assert cfg.micro_batch == 2 and cfg.train.generator.betas == (0.9, 0.95)  # from the YAML


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "jobs/configs/tokenizer_*.yaml"))))
def test_shipped_configs_load(path):
    cfg = load_config(TrainTokenizerConfig, path)
    assert cfg.image_every % cfg.log_every == 0 and cfg.data.input


def test_config_errors_are_plain():
    with pytest.raises(ValueError, match="multiple of log_every"):
        TrainTokenizerConfig(log_every=3, image_every=10)
    with pytest.raises(ValueError, match="zero_stage"):
        TrainTokenizerConfig(zero_stage=4)


def test_help_shows_the_documented_config():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs/train_tokenizer.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--zero-stage" in out.stdout and "disc_start:" in out.stdout


def test_rng_state_of_a_checkpoint_round_trips_through_a_weights_only_load():
    import io
    import random

    import numpy as np
    import torch

    from pipelines.ray_train import rng_state, set_rng_state

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # leaves a cached Gaussian in numpy's state
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    draws = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3).tolist())
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))  # no pickled classes: safe to read from shared storage
    assert (random.random(), np.random.normal(), np.random.rand(), torch.rand(3).tolist()) == draws
