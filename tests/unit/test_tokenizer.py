import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tokenflow import Tokenizer
from tokenflow.config import preset
from tokenflow.encoders.pixel import PixelDecoder, PixelEncoder, count_parameters
from tokenflow.encoders.vit import SemanticDecoder, task_mlp
from tokenflow.quantize import MultiScaleQuantizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tokenizer.from_preset("tiny").eval()


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.rand(3, 3, 64, 64) * 2 - 1


def test_encode_is_deterministic_scale_major_and_long(tiny, pixels):
    ids = tiny.encode(pixels)
    assert ids.dtype == torch.long and ids.shape == (3, 121) == (3, tiny.tokens_per_image)
    assert torch.equal(ids, tiny.encode(pixels))
    assert ids.min() >= 0 and ids.max() < tiny.codebook_size
    # per-image independence: encoding one image alone gives its row
    assert torch.equal(tiny.encode(pixels[1:2]), ids[1:2])
    # the sequence is the quantizer's per-scale maps concatenated
    out = tiny.model.quantizer(tiny.model.encode_latent(pixels), drop_scales=False)
    assert torch.equal(torch.cat(out.per_scale_indices, dim=1), ids)


def test_decode_every_scale_prefix_and_reject_others(tiny, pixels):
    ids = tiny.encode(pixels)
    ends = np.cumsum([s * s for s in tiny.scales])
    prev = None
    for t in ends:
        img = tiny.decode(ids[:, :t])
        assert img.shape == (3, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
        if prev is not None:
            assert not torch.equal(img, prev)  # every scale changes the picture
        prev = img
    with pytest.raises(ValueError, match="not a prefix of whole scales"):
        tiny.decode(ids[:, :7])
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode(ids + tiny.codebook_size)
    with pytest.raises(ValueError, match=r"expected indices of shape \(B, T\)"):
        tiny.decode(ids[0])


def test_features_equal_the_encoders_quantized_map(tiny, pixels):
    ids = tiny.encode(pixels)
    feats = tiny.features(ids)
    assert feats.shape == (3, 64, 40)
    f = tiny.model.quantizer(tiny.model.encode_latent(pixels), drop_scales=False).quantized
    assert torch.allclose(feats, f.flatten(2).transpose(1, 2), atol=1e-5)


def test_straight_through_gradients_reach_both_encoders_and_codebooks():
    tok = Tokenizer.from_preset("tiny").train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = tok(x)
    teacher = tok.make_teacher()
    target = teacher(x)
    assert out.semantic.shape == target.shape == (2, 64, tok.config.semantic_encoder.teacher_dim)
    loss = out.reconstruction.pow(2).mean() + out.semantic.pow(2).mean() + sum(out.quant.losses.values())
    loss.backward()
    m = tok.model
    for name, module in [
        ("semantic encoder", m.semantic_encoder),
        ("pixel encoder", m.pixel_encoder),
        ("encode task layer", m.encode_task_layer),
        ("quant_conv", m.quant_conv),
    ]:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    for cb in m.quantizer.quantizer.codebooks:
        assert cb.weight.grad is not None and cb.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_save_load_round_trip_is_bit_identical(tiny, pixels, tmp_path):
    tiny.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == tiny.config
    assert torch.equal(loaded.encode(pixels), tiny.encode(pixels))
    ids = tiny.encode(pixels)
    assert torch.equal(loaded.decode(ids), tiny.decode(ids))
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def _save_with_quantizer_setting(tok, path, key, value):
    """Save `tok`, then edit one quantizer field of its config.json."""
    tok.save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    data["config"]["quantizer"][key] = value
    (path / "config.json").write_text(json.dumps(data))


def test_loading_wrong_shapes_names_the_tensor(tiny, tmp_path):
    _save_with_quantizer_setting(tiny, tmp_path / "tok", "codebook_size", 512)
    with pytest.raises(
        ValueError,
        match=r"model\.quantizer\.quantizer\.codebooks\.0\.weight: file \(1024, 32\) "
        r"vs model \(512, 32\)",
    ):
        Tokenizer.from_pretrained(tmp_path / "tok")


def test_loading_missing_tensors_lists_them(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "tok")
    state = {k: v for k, v in tiny.state_dict().items() if "post_quant_conv" not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "tok" / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing: \['model\.post_quant_conv\.bias', 'model\.post_quant_conv\.weight'\]"
    ):
        Tokenizer.from_pretrained(tmp_path / "tok")


def test_unknown_config_key_is_an_error(tiny, tmp_path):
    _save_with_quantizer_setting(tiny, tmp_path / "tok", "codebok_size", 1)
    with pytest.raises(ValueError, match=r"quantizer: unknown key\(s\) \['codebok_size'\]"):
        Tokenizer.from_pretrained(tmp_path / "tok")


def test_preprocess_real_photo_in_every_mode(tiny):
    from skimage import data

    photo = Image.fromarray(data.chelsea())
    images = [photo.convert(m) for m in ("L", "LA", "P", "RGBA", "CMYK", "RGB")]
    images.append(Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257).convert("I;16"))
    x = tiny.preprocess(images)
    assert x.shape == (7, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert tiny.encode(x).shape == (7, 121)
    # an L image and its RGB conversion give the same pixels
    assert torch.equal(x[0], tiny.preprocess([photo.convert("L").convert("RGB")])[0])


def test_encode_rejects_wrong_sizes(tiny):
    with pytest.raises(ValueError, match=r"expected pixels of shape \(B, 3, 64, 64\)"):
        tiny.encode(torch.zeros(1, 3, 32, 32))


def test_unitok_multi_codebook_layout_and_round_trip(tmp_path):
    tok = Tokenizer.from_preset("tiny_unitok").eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    ids = tok.encode(x)
    assert ids.shape == (2, 64, 4) and ids.max() < 256
    assert tok.decode(ids).shape == (2, 3, 64, 64)
    assert tok.features(ids).shape == (2, 64, 32)
    tok.save_pretrained(tmp_path / "u")
    assert torch.equal(Tokenizer.from_pretrained(tmp_path / "u").encode(x), ids)


def test_local_pretrained_semantic_encoder_is_loaded(tmp_path):
    cfg = preset("tiny").semantic_encoder
    torch.manual_seed(5)
    donor = Tokenizer.from_preset("tiny").model.semantic_encoder.visual
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    state["proj"] = torch.randn(cfg.width, cfg.output_dim)
    save_file(state, str(tmp_path / "tower.safetensors"))
    tok = Tokenizer.from_preset("tiny", pretrained=str(tmp_path / "tower.safetensors"))
    assert torch.equal(tok.model.semantic_encoder.visual.conv1.weight, donor.conv1.weight)
    assert tok.config.semantic_encoder.pretrained == str(tmp_path / "tower.safetensors")
    teacher = tok.make_teacher()  # the teacher reads the same file, projection included
    assert torch.equal(teacher.encoder.visual.proj, state["proj"])


def test_unknown_pretrained_tag_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a local file nor an open_clip tag"):
        Tokenizer.from_preset("clipb_224", pretrained="no-such-tag")


@pytest.mark.parametrize(
    "name,tokens,grid",
    [("clipb_224", 561, 14), ("clipb_256", 817, 16), ("siglip_384", 2227, 27), ("unitok", 256, 16)],
)
def test_preset_token_counts_and_layout(name, tokens, grid):
    cfg = preset(name)
    assert cfg.quantizer.tokens_per_image == tokens and cfg.grid == grid
    q = MultiScaleQuantizer(cfg.quantizer).eval()
    h = torch.randn(1, cfg.quantizer.code_dim, grid, grid)
    ids = q(h).indices
    assert ids.shape[:2] == (1, tokens)
    assert q.features(ids).shape == (1, cfg.quantizer.code_dim, grid, grid)


def test_preset_component_sizes_match_the_reference():
    """Parameter counts the reference computed analytically from the official code (ref 1.4, 1.5)."""
    with torch.device("meta"):
        b, xl = preset("clipb_224"), preset("siglip_384")
        assert count_parameters(PixelEncoder(b.pixel_encoder)) == 29_298_176
        assert count_parameters(PixelDecoder(b.pixel_decoder)) == 42_449_795
        assert count_parameters(PixelDecoder(preset("clipb_256").pixel_decoder)) == 237_117_187
        assert count_parameters(SemanticDecoder(b.semantic_decoder, 32)) == 21_440_256
        assert count_parameters(SemanticDecoder(xl.semantic_decoder, 32)) == 48_699_648
        assert count_parameters(task_mlp(768, 32)) + count_parameters(task_mlp(768, 512)) == 615_200 + 984_320


@pytest.mark.parametrize("name", ["clipb_224", "clipb_256", "siglip_384"])
def test_full_presets_build_and_run_on_meta(name):
    """The real architectures wire up end to end (shapes only, no memory): encode -> quantize -> decode."""
    cfg = preset(name)
    with torch.device("meta"):
        tok = Tokenizer(cfg)
        x = torch.empty(1, 3, cfg.image_size, cfg.image_size)
        h = tok.model.encode_latent(x)
        assert h.shape == (1, 40, cfg.grid, cfg.grid)
        image, semantic = tok.model.decode_latent(h)
        assert image.shape == x.shape
        assert semantic.shape == (1, cfg.grid**2, cfg.semantic_encoder.teacher_dim)


def test_fingerprint_identifies_config_and_weights(tiny, tmp_path):
    fp = tiny.fingerprint()
    assert len(fp) == 16 and fp == tiny.fingerprint()
    tiny.save_pretrained(tmp_path / "tok")
    assert Tokenizer.from_pretrained(tmp_path / "tok").fingerprint() == fp
    other = Tokenizer.from_pretrained(tmp_path / "tok")
    with torch.no_grad():
        other.model.quant_conv.bias[0] += 1e-6
    assert other.fingerprint() != fp
