"""The official-checkpoint converter: key coverage at full size (on the meta device), value transforms, safe
loading, and every failure a user can hit. Numerical parity with the official code is in
tests/integration/test_parity.py."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from tests.parity.tokenflow_recipe import official_shapes
from tokenflow.convert import convert_state_dict, detect_preset, load_official, official_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def meta_state(preset: str) -> dict[str, torch.Tensor]:
    """Official keys and shapes without any memory; the constants the converter checks get real values."""
    state = {k: torch.empty(s, device="meta") for k, s in official_shapes(preset).items()}
    for k in [k for k in state if k.startswith("scaling_layer.")]:
        state[k] = torch.full(state[k].shape, 0.5)
    return state


@pytest.mark.parametrize(("preset", "n_official", "n_project"), [("clipb_256", 649, 648), ("siglip_384", 848, 739)])
def test_full_size_official_layout_maps_exactly(preset, n_official, n_project):
    state = meta_state(preset)
    assert len(state) == n_official
    assert detect_preset("tokenflow", state) == preset
    config, out = convert_state_dict("tokenflow", state)
    assert len(out) == n_project  # and check_state_dict inside proved keys and shapes equal the preset's
    assert config.image_size == (256 if preset == "clipb_256" else 384)
    assert config.semantic_encoder.pretrained == ("openai" if preset == "clipb_256" else "webli")


def test_full_size_unitok_layout_maps_exactly():
    from tests.parity.unitok_recipe import official_shapes as unitok_shapes

    shapes = unitok_shapes()
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    constants = [k for k in state if k.endswith("zero_k_bias") or k == "encoder.pos_embed"]
    for k in constants:
        state[k] = torch.zeros(shapes[k])
    assert len(state) == 1335
    config, out = convert_state_dict("unitok", state)
    assert len(out) == 1170 and config.kind == "unitok"
    assert "model.quantizer.quantizer.codebooks.7.weight" in out
    assert not any(k.startswith("model.text_encoder") for k in out)

    state["quant_proj.attn.zero_k_bias"] = torch.full(shapes["quant_proj.attn.zero_k_bias"], 0.1)
    with pytest.raises(ValueError, match=r"zero_k_bias \(expected all 0\.0\)"):
        convert_state_dict("unitok", state)


def test_siglip_attention_and_pool_head_transforms():
    state = meta_state("siglip_384")
    o = "encoder_vqkd.vision_model."
    gen = torch.Generator().manual_seed(1)
    real = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        for leaf in ("weight", "bias"):
            key = f"{o}encoder.layers.3.self_attn.{name}.{leaf}"
            real[key] = torch.randn(state[key].shape, generator=gen)
    for leaf in ("in_proj_weight", "in_proj_bias"):
        real[f"{o}head.attention.{leaf}"] = torch.randn(state[f"{o}head.attention.{leaf}"].shape, generator=gen)
    real[f"{o}embeddings.position_embedding.weight"] = torch.randn(729, 1152, generator=gen)
    state.update(real)
    _, out = convert_state_dict("tokenflow", state)
    t = "model.semantic_encoder.visual.trunk."
    for leaf in ("weight", "bias"):
        qkv = [real[f"{o}encoder.layers.3.self_attn.{n}_proj.{leaf}"] for n in "qkv"]
        assert torch.equal(out[f"{t}blocks.3.attn.qkv.{leaf}"], torch.cat(qkv))
    w = real[f"{o}head.attention.in_proj_weight"]
    assert torch.equal(out[f"{t}attn_pool.q.weight"], w[:1152])
    assert torch.equal(out[f"{t}attn_pool.kv.weight"], w[1152:])
    assert torch.equal(out[f"{t}pos_embed"][0], real[f"{o}embeddings.position_embedding.weight"])


def test_clip_tower_and_codebooks_keep_their_values():
    state = meta_state("clipb_256")
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(2304, 768, generator=gen)
    sem, pix = torch.randn(32768, 32, generator=gen), torch.randn(32768, 8, generator=gen)
    state["encoder_vqkd.transformer.resblocks.5.attn.in_proj_weight"] = w
    state["quantize.embedding_vqkd.weight"], state["quantize.embedding_vqgan.weight"] = sem, pix
    _, out = convert_state_dict("tokenflow", state)
    assert torch.equal(out["model.semantic_encoder.visual.transformer.resblocks.5.attn.in_proj_weight"], w)
    assert torch.equal(out["model.quantizer.quantizer.codebooks.0.weight"], sem)  # stored unnormalised
    assert torch.equal(out["model.quantizer.quantizer.codebooks.1.weight"], pix)


def test_unmapped_missing_and_misshaped_tensors_fail_with_their_names():
    state = meta_state("clipb_256")
    state["aux_head.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"1 official tensor\(s\) with no mapping: \['aux_head\.weight'\]"):
        convert_state_dict("tokenflow", state)

    state = meta_state("clipb_256")
    state["encoder_vqkd.proj"] = torch.empty(768, 512, device="meta")  # mapped by prefix, unknown to the preset
    with pytest.raises(ValueError, match=r"unexpected: \['model\.semantic_encoder\.visual\.proj'\]"):
        convert_state_dict("tokenflow", state)

    state = meta_state("clipb_256")
    del state["decoder_vqkd.blocks.1.attn.q_bias"]
    with pytest.raises(ValueError, match=r"missing: \['model\.semantic_decoder\.blocks\.1\.attn\.q_bias'\]"):
        convert_state_dict("tokenflow", state)

    state = meta_state("clipb_256")
    state["quant_conv.weight"] = torch.empty(16, 256, 1, 1, device="meta")
    shapes = r"model\.quant_conv\.weight: file \(16, 256, 1, 1\) vs model \(8, 256, 1, 1\)"
    with pytest.raises(ValueError, match=shapes):
        convert_state_dict("tokenflow", state)


def test_dropped_constants_are_checked():
    state = meta_state("siglip_384")
    state["scaling_layer.scale"] = torch.full((1, 3, 1, 1), 0.25)
    with pytest.raises(ValueError, match=r"scaling_layer\.scale \(expected all 0\.5\)"):
        convert_state_dict("tokenflow", state)


def test_detect_preset_and_kind_errors():
    with pytest.raises(ValueError, match="not a TokenFlow checkpoint: .* use kind 'unitok'"):
        detect_preset("tokenflow", {"encoder.blocks.0.norm1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no preset for .* ViTamin-XL is not one yet"):
        detect_preset("tokenflow", {"encoder_vqkd.stem.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        convert_state_dict("vqgan", {})
    with pytest.raises(ValueError, match="is a tokenflow tokenizer, not unitok"):
        convert_state_dict("unitok", {}, preset_name="clipb_256")


def test_official_weights_picks_ema_then_model_and_strips_wrappers():
    a, b = torch.zeros(1), torch.ones(1)
    assert official_weights("tokenflow", {"model": {"x": b}, "ema": {"module.x": a}})["x"] is a
    assert official_weights("tokenflow", {"model": {"_orig_mod.x": b}, "steps": 3})["x"] is b
    assert official_weights("tokenflow", {"x": a})["x"] is a  # a bare state dict
    assert official_weights("unitok", {"args": {}, "trainer": {"unitok": {"y": a}, "disc": {}}})["y"] is a
    with pytest.raises(ValueError, match=r"no unitok weights found .*'trainer' -> 'unitok'"):
        official_weights("unitok", {"args": {}, "model": {"y": a}})
    with pytest.raises(ValueError, match="x is a str, not a tensor"):
        official_weights("tokenflow", {"model": {"x": "oops"}})


def test_training_checkpoint_with_namespace_args_loads(tmp_path):
    path = tmp_path / "ckpt.pt"
    args = argparse.Namespace(vq_model="TokenFlow", codebook_size=32768, enhanced_decoder=True)
    torch.save({"model": {"w": torch.arange(4.0)}, "args": args, "steps": 12}, path)
    ckpt = load_official(path)
    assert ckpt["args"].codebook_size == 32768 and ckpt["steps"] == 12
    assert torch.equal(official_weights("tokenflow", ckpt)["w"], torch.arange(4.0))


class Payload:
    """Stands for any object whose unpickling runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file if ever unpickled


def test_checkpoint_needing_other_classes_is_refused_unpickled(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload(str(marker))}, path)
    with pytest.raises(ValueError, match=r"refusing to load: the file asks to unpickle the class .*open"):
        load_official(path)
    assert not marker.exists()


def test_missing_file_and_cli_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_official(tmp_path / "nope.pt")
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(1)}}, tmp_path / "odd.pt")
    proc = subprocess.run(
        [sys.executable, "jobs/convert_checkpoint.py", "--kind", "tokenflow", "--input", str(tmp_path / "odd.pt"),
         "--output", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "convert_checkpoint: not a TokenFlow checkpoint" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_siglip_tower_uses_tanh_gelu_like_the_official_siglip():
    from tokenflow import Tokenizer
    from tokenflow.config import preset

    with torch.device("meta"):
        tok = Tokenizer(preset("siglip_384"))
    gelus = [m for m in tok.model.semantic_encoder.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == 27 + 1  # every block's MLP and the pooling head's
    assert {m.approximate for m in gelus} == {"tanh"}
