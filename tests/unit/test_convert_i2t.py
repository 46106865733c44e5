"""The released understanding model's layout (`Tokenflow-llava-qwen2.5-14B-finetuning`) converted and run by this
project against the official code's outputs, and every way the conversion refuses a checkpoint.

`tests/fixtures/i2t_official/` was made once by running the official `i2t/llava` code (`LlavaQwenForCausalLM`,
ByteFlow-AI/TokenFlow @9812da0) tiny and seeded (bench/official/i2t.py; see the README there): `model/` is the
official `save_pretrained` directory (two safetensors shards and an index, config.json, the tokenizer files),
`outputs.npz` the official data code's ids (-200 at the image) and labels, the features, and the official logits.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.parity.i2t_layout import RELEASED_14B, released_shapes
from tokenflow.llm.convert import read_released
from tokenflow.llm.convert_i2t import convert_i2t_checkpoint, i2t_config, map_keys
from tokenflow.llm.i2t import I2TModel

FIXTURE = Path(__file__).parents[1] / "fixtures" / "i2t_official"
RELEASED = FIXTURE / "model"
TOL = 1e-4
IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def official():
    return dict(np.load(FIXTURE / "outputs.npz"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The official directory converted by the job's command line, then loaded as any saved model."""
    from jobs.convert_checkpoint import main

    out = tmp_path_factory.mktemp("converted") / "i2t"
    assert main(["--kind", "tokenflow-llava", "--input", str(RELEASED), "--output", str(out)]) == 0
    return out


def project_inputs(official):
    """The official batch as `I2TModel` takes it: the -200 id becomes `image_index`, the other ids (and labels)
    close up; `lengths` counts text ids."""
    ids, labels = torch.from_numpy(official["input_ids"]), torch.from_numpy(official["labels"])
    n = torch.from_numpy(official["text_lengths"])
    is_image = ids == IMAGE
    index = torch.where(is_image.any(1), is_image.long().argmax(1), -1)
    out_ids = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.long)
    out_labels = torch.full_like(out_ids, -100)
    for b in range(ids.shape[0]):
        keep = ~is_image[b, : n[b]]
        out_ids[b, : int(keep.sum())] = ids[b, : n[b]][keep]
        out_labels[b, : int(keep.sum())] = labels[b, : n[b]][keep]
        assert labels[b, : n[b]][~keep].eq(-100).all()  # the official label at the image position is ignored
    return out_ids, out_labels, n - is_image.any(1).long(), index, torch.from_numpy(official["features"])


def test_conversion_is_complete_and_records_its_source(converted):
    payload = json.loads((converted / "config.json").read_text())
    cfg = payload["config"]
    assert payload["kind"] == "i2t" and cfg["image_tokens"] == 729 and cfg["code_dim"] == 40
    assert cfg["template"] == "qwen_2_5" and cfg["llm"]["model_type"] == "qwen2"
    assert cfg["llm"]["rope_parameters"]["rope_theta"] == 1e6 and cfg["llm"]["num_key_value_heads"] == 2
    assert payload["image_tokenizer_id"] is None and payload["max_length"] == 2048
    assert payload["provenance"]["kind"] == "tokenflow-llava" and payload["provenance"]["converted_from"] == str(
        RELEASED
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        assert (converted / name).read_bytes() == (RELEASED / name).read_bytes()
    _, source = read_released(str(RELEASED))
    model = I2TModel.from_pretrained(converted)
    assert torch.equal(model.projector[2].bias, source["model.mm_projector.2.bias"])
    assert torch.equal(model.llm.model.layers[1].self_attn.k_proj.bias, source["model.layers.1.self_attn.k_proj.bias"])
    assert torch.equal(model.llm.lm_head.weight, source["lm_head.weight"])


def test_logits_and_loss_match_the_official_model(converted, official):
    model = I2TModel.from_pretrained(converted)
    ids, labels, lengths, index, features = project_inputs(official)
    with torch.no_grad():
        x, mask, _ = model.splice(ids, lengths, index, features)
        positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)  # 0 .. L-1, as the official forward
        logits = model.llm(inputs_embeds=x, attention_mask=mask.long(), position_ids=positions).logits.float()
        out = model(ids, labels, lengths, index, features)
    assert mask.sum(1).tolist() == official["seq_lengths"].tolist()
    rows = torch.from_numpy(official["rows"])
    ours = logits[rows[:, 0], rows[:, 1]]
    torch.testing.assert_close(ours, torch.from_numpy(official["logits"]), rtol=0, atol=TOL)
    valid = mask.bool()
    lse = torch.logsumexp(logits, -1)[valid]
    torch.testing.assert_close(lse, torch.from_numpy(official["logsumexp"])[valid], rtol=0, atol=TOL)
    clear = torch.from_numpy(official["top2_gap"])[valid] > TOL  # a near-tie may break either way
    assert clear.float().mean() > 0.99
    assert torch.equal(logits.argmax(-1)[valid][clear], torch.from_numpy(official["argmax"])[valid][clear])
    # the official loss: mean cross-entropy over the batch's supervised (shifted) labels
    torch.testing.assert_close(
        (out.loss_sum / out.count).float(), torch.tensor(float(official["loss"])), atol=TOL, rtol=0
    )


def test_the_project_template_builds_the_official_prompt(converted, official):
    from transformers import AutoTokenizer

    from tokenflow.llm.templates import prompt_for_generation

    tok = AutoTokenizer.from_pretrained(converted)
    question = [{"from": "human", "value": "<image>\nWhat is shown in this picture?"}]
    ids, image_index = prompt_for_generation("qwen_2_5", tok, question, has_image=True)
    want = official["input_ids"][0, : official["text_lengths"][0]].tolist()
    assert image_index == want.index(IMAGE)
    assert ids == [i for i in want if i != IMAGE]


def test_full_size_released_layout_maps_exactly():
    """Every key of a 14 B release (on the meta device: no memory) maps onto the model built from its config."""
    h = RELEASED_14B["hidden_size"]
    shapes = released_shapes(RELEASED_14B)
    state = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}
    assert len(state) == 7 + 12 * 48
    cfg = i2t_config(RELEASED_14B, state, image_tokens=729, template="qwen_2_5")
    with torch.device("meta"):
        model = I2TModel(cfg)
    assert model.llm.config.layer_types == ["full_attention"] * 48  # no sliding window, as the release runs
    mapped, dropped = map_keys(state, model.state_dict(), "released")
    assert len(mapped) == 583 and dropped == 0 and not state
    assert sum(t.numel() for t in mapped.values()) == 14_770_033_664 + h * 40 + h + h * h + h


def released_copy(tmp_path, state, config=None, name="model.safetensors"):
    """A released-style directory with `state` in one file (no index)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(RELEASED / "config.json", tmp_path / "config.json")
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if name.endswith(".safetensors"):
        save_file(state, tmp_path / name)
    else:
        torch.save(state, tmp_path / name)
    return tmp_path


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    _, state = read_released(str(RELEASED))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.image_newline"] = torch.zeros(64)  # the `unpad` merge's parameter: not the released layout
    state["model.layers.0.self_attn.qknorm.query_norm.weight"] = torch.ones(16)  # a t2i key
    src = released_copy(tmp_path / "src", state)
    with pytest.raises(ValueError) as err:
        convert_i2t_checkpoint(str(src), str(tmp_path / "out"))
    msg = str(err.value)
    assert "missing: ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected: ['model.image_newline', 'model.layers.0.self_attn.qknorm.query_norm.weight']" in msg
    assert not (tmp_path / "out").exists()


def test_a_shard_missing_from_the_index_and_the_vision_tower(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(RELEASED, src)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"listed in model.safetensors.index.json but in no shard: \['"):
        convert_i2t_checkpoint(str(src), str(tmp_path / "out"))

    # a .bin read with weights_only=True; model.vision_tower.* (the image tokenizer's weights) is dropped, counted
    _, state = read_released(str(RELEASED))
    state["model.vision_tower.vision_tower.quantize.embedding.weight"] = torch.zeros(4, 8)
    logs = []
    model = convert_i2t_checkpoint(
        str(released_copy(tmp_path / "bin", state, name="pytorch_model.bin")),
        str(tmp_path / "out"),
        image_tokenizer_id="tok-xl",
        log=logs.append,
    )
    payload = json.loads((tmp_path / "out" / "config.json").read_text())
    assert payload["image_tokenizer_id"] == "tok-xl" and payload["provenance"]["dropped_vision_tower_tensors"] == 1
    assert any("dropped 1 model.vision_tower" in line for line in logs)
    assert model.projector[0].weight.shape == (64, 40)


def test_a_bf16_release_stays_bf16_on_disk_and_loads_in_fp32(tmp_path):
    """The release is bf16: the converted file keeps bf16 (half the bytes of fp32), and the returned model answers
    as the model loaded from the directory (fp32, the same values), RoPE included."""
    from tokenflow import safetensors_io

    _, state = read_released(str(RELEASED))
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    returned = convert_i2t_checkpoint(str(released_copy(tmp_path / "src", half)), str(tmp_path / "out"))
    with open(tmp_path / "out" / "model.safetensors", "rb") as fh:
        dtypes = {t.dtype for t in safetensors_io.meta(fh).values()}
    assert dtypes == {torch.bfloat16}
    loaded = I2TModel.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.llm.lm_head.weight, half["lm_head.weight"].float())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a = returned.float().llm(input_ids=ids).logits
        b = loaded.llm(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


class Payload:
    """An object whose unpickling would run code (creates a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_unread(tmp_path):
    marker = tmp_path / "executed"
    src = released_copy(
        tmp_path / "evil", {"lm_head.weight": torch.zeros(1), "x": Payload(str(marker))}, name="pytorch_model.bin"
    )
    with pytest.raises(ValueError, match=r"pytorch_model.bin cannot be read with torch.load\(weights_only=True\)"):
        convert_i2t_checkpoint(str(src), str(tmp_path / "out"))
    assert not marker.exists()
    src = released_copy(tmp_path / "odd", {"lm_head.weight": torch.zeros(1), "step": 3}, name="pytorch_model.bin")
    with pytest.raises(ValueError, match=r"non-tensor values under \['step'\]"):
        convert_i2t_checkpoint(str(src), str(tmp_path / "out"))


def test_config_checks_and_cli_errors(tmp_path, capsys):
    config = json.loads((RELEASED / "config.json").read_text())
    for change, message in [
        ({"model_type": "llava_llama"}, "expected a llava_qwen"),
        ({"mm_hidden_size": 1024}, "mm_hidden_size 1024"),
        ({"mm_projector_type": "linear"}, "mm_projector_type 'linear'"),
        ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type 'spatial_unpad'"),
    ]:
        with pytest.raises(ValueError, match=message):
            i2t_config({**config, **change}, {}, image_tokens=729, template="qwen_2_5")
    with pytest.raises(ValueError, match="unknown chat template"):
        i2t_config(config, {}, image_tokens=729, template="chatml")

    from jobs.convert_checkpoint import main

    (tmp_path / "src").mkdir()  # config.json only: the layout is checked before any weight is read
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "mm_hidden_size": 1024}))
    assert main(["--kind", "tokenflow-llava", "--input", str(tmp_path / "src"), "--output", str(tmp_path / "o")]) == 2
    assert "convert_checkpoint: not the released TokenFlow llava layout: mm_hidden_size 1024" in capsys.readouterr().err
    assert main(["--kind", "tokenflow", "--input", "x.pt", "--output", "o", "--image-tokenizer-id", "t"]) == 2
