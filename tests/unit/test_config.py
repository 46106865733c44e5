import dataclasses
from pathlib import Path

import pytest
import yaml

from pipelines.pretokenize import PretokenizeConfig
from tokenflow.config import TokenizerConfig, load_config, preset, to_dict


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("batch_size: 16\nfilters:\n  min_side: 128\n  metadata_max: {punsafe: 0.5}\n")
    cfg = load_config(PretokenizeConfig, str(path), ["filters.min_side=256", "input=[a.tar, b.tar]", "dedup=false"])
    assert cfg.batch_size == 16 and cfg.filters.min_side == 256 and cfg.filters.metadata_max == {"punsafe": 0.5}
    assert cfg.input == ["a.tar", "b.tar"] and cfg.dedup is False
    assert cfg.filters.max_aspect_ratio == 3.0  # untouched defaults stay


def test_typos_and_malformed_overrides_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"filters: unknown key\(s\) \['min_sid'\]"):
        load_config(PretokenizeConfig, None, ["filters.min_sid=3"])
    with pytest.raises(ValueError, match="must look like key.sub=value"):
        load_config(PretokenizeConfig, None, ["batch_size"])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(PretokenizeConfig, str(tmp_path / "list.yaml"))


def test_numbers_written_without_a_dot_are_floats_where_floats_are_expected():
    from pipelines.train_t2i import TrainT2IConfig

    base = ["llm_config={model_type: llama}", "text_tokenizer=deepseek"]
    cfg = load_config(TrainT2IConfig, None, [*base, "optimizer.lr=3e-4", "optimizer.max_grad_norm=1"])
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.max_grad_norm, float)
    with pytest.raises(ValueError, match="optimizer.lr: expected a number, got 'fast'"):
        load_config(TrainT2IConfig, None, [*base, "optimizer.lr=fast"])


def test_tokenizer_config_round_trips_through_a_dict():
    for name in ("tiny", "clipb_256", "siglip_384", "unitok"):
        cfg = preset(name)
        assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg


def test_the_pretokenize_yaml_documents_every_field_with_its_default():
    path = str(Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "pretokenize.yaml")
    with open(path) as fh:
        documented = yaml.safe_load(fh)
    assert [f.name for f in dataclasses.fields(PretokenizeConfig) if f.name not in documented] == []
    assert to_dict(load_config(PretokenizeConfig, path, [])) == to_dict(PretokenizeConfig())
