"""The UniTok model mirrors the released ViTamin-L tokenizer: official key names and shapes, parameter count,
token layout, training gradients, and each block against its formula written out."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.parity.unitok_recipe import official_shapes
from tokenflow import Tokenizer
from tokenflow.config import TokenizerConfig, UniTokConfig, preset
from tokenflow.encoders.vitamin import (
    AttnProjection,
    Block,
    GeGluMlp,
    HybridEmbed,
    InvMbConvBlock,
    LayerNorm2d,
    MbConvBlock,
    PlainAttention,
    Upsample2d,
    make_divisible,
)

# --------------------------------------------------------------------------------------------------------------
# the official tokenizer state dict (UniTok `trainer.unitok`, timm 1.0.8 layout; tests/parity/unitok_recipe.py),
# tokenizer weights only (no text tower, fc_norm, projection, logit_scale, vocab_usage, zero_k_bias,
# encoder.pos_embed)

NOT_TOKENIZER = ("text_encoder.", "fc_norm.", "projection.", "logit_scale")
STATISTICS_AND_CONSTANTS = ("vocab_usage", "zero_k_bias", "encoder.pos_embed")


def official_tokenizer_keys(cfg: TokenizerConfig) -> dict[str, tuple[int, ...]]:
    return {
        k: s
        for k, s in official_shapes(cfg).items()
        if not k.startswith(NOT_TOKENIZER) and not k.endswith(STATISTICS_AND_CONSTANTS)
    }


def project_key(official: str) -> str:
    """The conversion rule: "model." + key, except the codebooks."""
    if official.startswith("quantizer.codebooks.") and official.endswith(".codebook.weight"):
        k = official.split(".")[2]
        return f"model.quantizer.quantizer.codebooks.{k}.weight"
    return "model." + official


def _expected(cfg: TokenizerConfig) -> dict[str, tuple[int, ...]]:
    return {project_key(k): shape for k, shape in official_tokenizer_keys(cfg).items()}


# --------------------------------------------------------------------------------------------------------------
# the released layout


@pytest.fixture(scope="module")
def released_on_meta():
    with torch.device("meta"):
        return Tokenizer(preset("unitok"))


def test_released_preset_has_exactly_the_official_tokenizer_keys_and_shapes(released_on_meta):
    expected = _expected(preset("unitok"))
    assert len(expected) == 1170
    found = {k: tuple(v.shape) for k, v in released_on_meta.state_dict().items()}
    assert sorted(set(expected) - set(found)) == []
    assert sorted(set(found) - set(expected)) == []
    assert {k: s for k, s in found.items() if s != expected[k]} == {}


def test_released_preset_parameter_count_equals_the_official_tokenizer_weights(released_on_meta):
    official = official_tokenizer_keys(preset("unitok"))
    total = sum(math.prod(s) for s in official.values())
    assert total == 695_858_115  # ref A1.7: everything but the text tower and the CLIP head
    assert sum(p.numel() for p in released_on_meta.parameters()) == total
    assert list(released_on_meta.buffers()) == []  # no zero_k_bias / pos_embed / vocab_usage
    # group sizes of ref A1.7
    stem = sum(math.prod(s) for k, s in official.items() if ".backbone." in k)
    upsampler = sum(math.prod(s) for k, s in official.items() if ".up_conv" in k)
    assert (stem, upsampler) == (6_794_144, 26_865_763)


def test_released_preset_runs_on_meta(released_on_meta):
    x = torch.empty(1, 3, 256, 256, device="meta")
    h = released_on_meta.model.encode_latent(x)
    assert h.shape == (1, 64, 16, 16)
    assert released_on_meta.model.decode_pixels(h).shape == (1, 3, 256, 256)
    assert released_on_meta.model.last_layer.shape == (3, 160, 3, 3)


def test_tiny_preset_follows_the_same_key_rule():
    with torch.device("meta"):
        tok = Tokenizer(preset("tiny_unitok"))
    found = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert found == _expected(preset("tiny_unitok"))


def test_stride_and_grid_validation():
    assert UniTokConfig().stride == 16 and preset("unitok").grid == 16
    assert preset("tiny_unitok").unitok.stride == 8 and preset("tiny_unitok").grid == 8
    cfg = preset("unitok")
    with pytest.raises(ValueError, match="stride 16 != last scale 16"):
        replace(cfg, image_size=224)
    with pytest.raises(ValueError, match="two MBConv stages"):
        UniTokConfig(stage_depths=(2, 4, 1))
    assert TokenizerConfig.from_dict(preset("tiny_unitok").to_dict()) == preset("tiny_unitok")


# --------------------------------------------------------------------------------------------------------------
# the tiny model end to end


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tokenizer.from_preset("tiny_unitok")


def test_tiny_shapes_and_the_official_token_layout(tiny):
    tiny.eval()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = tiny.model.encode_latent(x)
    assert z.shape == (2, 32, 8, 8)
    ids = tiny.encode(x)
    assert ids.shape == (2, 64, 4) and ids.dtype == torch.long
    # the official f_to_idx: tokens (B, T, C) row-major, contiguous chunks of C / M channels per codebook,
    # cosine argmax, stacked to (B, M, T); ours is its transpose
    tokens = z.flatten(2).transpose(1, 2)
    books = [F.normalize(e.weight, dim=1) for e in tiny.model.quantizer.quantizer.codebooks]
    official = torch.stack(
        [(F.normalize(c, dim=-1) @ bk.T).argmax(-1) for c, bk in zip(tokens.split(8, dim=-1), books)], dim=1
    )
    assert official.shape == (2, 4, 64)
    assert torch.equal(ids, official.transpose(1, 2))
    image = tiny.decode(ids)
    assert image.shape == (2, 3, 64, 64) and 0 <= image.min() and image.max() <= 1
    raw = tiny.model.decode_pixels(tiny.model.quantizer.features(ids))
    assert raw.shape == (2, 3, 64, 64)


def test_inference_writes_activations_in_place_with_the_autograd_values(tiny):
    """Without autograd the GELUs, the GeGLU product and the residual sums are written into fresh intermediates;
    the values must be bit-identical to the autograd path's, and the caller's tensors untouched."""
    tiny.eval()
    m = tiny.model
    torch.manual_seed(3)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    x_before = x.clone()
    with torch.enable_grad():
        z_grad = m.encode_latent(x)
        tokens = torch.randn(2, 64, m.decoder.norm.normalized_shape[0])
        dec_grad = m.decoder(tokens)
        proj_in = torch.randn(2, 64, 32)
        proj_grad = m.post_quant_proj(proj_in)
    tokens_before, proj_in_before = tokens.clone(), proj_in.clone()
    with torch.no_grad():
        assert torch.equal(m.encode_latent(x), z_grad)
        assert torch.equal(m.decoder(tokens), dec_grad)
        assert torch.equal(m.post_quant_proj(proj_in), proj_grad)
    assert torch.equal(x, x_before) and torch.equal(tokens, tokens_before) and torch.equal(proj_in, proj_in_before)


def test_tiny_training_forward_reaches_every_parameter(tiny):
    tiny.train()
    tiny.zero_grad()
    torch.manual_seed(2)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = tiny(x)
    assert out.semantic is None and out.reconstruction.shape == x.shape
    loss = F.mse_loss(out.reconstruction, x) + sum(out.quant.losses.values())
    loss.backward()
    params = dict(tiny.named_parameters())
    assert len(params) == len(_expected(preset("tiny_unitok")))
    no_grad = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert tiny.model.last_layer is tiny.model.decoder.up_conv4.conv2.weight
    tiny.eval()


def test_init_is_trainable_from_scratch(tiny):
    m = tiny.model
    for name, mod in m.named_modules():
        if isinstance(mod, nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
    w = m.encoder.blocks[0].attn.qkv.weight
    assert abs(w.std().item() - 0.02) < 0.002  # trunc-normal(0.02) (truncated at +-2 absolute, as in timm)
    assert torch.all(m.quant_proj.attn.q_bias == 0) and torch.all(m.encoder.blocks[0].attn.qkv.bias == 0)


# --------------------------------------------------------------------------------------------------------------
# each block against its formula


def _ln(x, p, eps):
    return F.layer_norm(x, x.shape[-1:], p.weight, p.bias, eps)


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _heads_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v per head, written out; inputs (B, H, N, d)."""
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _split_qkv(att: PlainAttention, x):
    b, n, _ = x.shape
    bias = torch.cat([att.q_bias, torch.zeros_like(att.q_bias), att.v_bias])
    qkv = x @ att.qkv.weight.T + bias
    q, k, v = qkv.chunk(3, dim=-1)
    heads = lambda t: t.view(b, n, att.heads, -1).transpose(1, 2)  # noqa: E731
    return heads(q), heads(k), heads(v)


def test_down_projection_averages_the_heads():
    att = _randomize(PlainAttention(32, 8, heads=4))
    x = torch.randn(2, 5, 32)
    q, k, v = _split_qkv(att, x)
    assert q.shape == (2, 4, 5, 8)
    o = _heads_attention(q, k, v)  # (B, 4, N, 8)
    want = ((o[:, 0] + o[:, 1] + o[:, 2] + o[:, 3]) / 4) @ att.proj.weight.T + att.proj.bias
    torch.testing.assert_close(att(x), want, rtol=1e-5, atol=1e-5)


def test_down_projection_pools_when_head_width_differs():
    att = _randomize(PlainAttention(32, 4, heads=2), seed=1)  # heads of 16, pooled to 4 (groups of 4 channels)
    x = torch.randn(1, 3, 32)
    o = _heads_attention(*_split_qkv(att, x)).mean(1)  # (B, N, 16)
    pooled = o.view(1, 3, 4, 4).mean(-1)
    torch.testing.assert_close(att(x), pooled @ att.proj.weight.T + att.proj.bias, rtol=1e-5, atol=1e-5)


def test_up_projection_concatenates_the_heads_and_the_key_bias_is_zero():
    att = _randomize(PlainAttention(8, 32, heads=4), seed=2)
    x = torch.randn(2, 5, 8)
    o = _heads_attention(*_split_qkv(att, x))  # (B, 4, N, 8)
    cat = torch.cat([o[:, h] for h in range(4)], dim=-1)
    torch.testing.assert_close(att(x), cat @ att.proj.weight.T + att.proj.bias, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in att.named_parameters()] == ["q_bias", "v_bias", "qkv.weight", "proj.weight", "proj.bias"]


def test_attn_projection_is_linear_path_plus_attention_then_geglu():
    proj = _randomize(AttnProjection(32, 8, heads=4), seed=3)
    x = torch.randn(2, 5, 32)
    y = proj.proj(_ln(x, proj.norm3, 1e-5)) + proj.attn(_ln(x, proj.norm1, 1e-5))
    want = y + proj.mlp(_ln(y, proj.norm2, 1e-5))
    torch.testing.assert_close(proj(x), want, rtol=1e-5, atol=1e-5)
    assert proj.norm1.eps == proj.norm2.eps == proj.norm3.eps == 1e-5 and proj.mlp.norm.eps == 1e-6


def test_geglu_and_transformer_block():
    mlp = _randomize(GeGluMlp(16, 32), seed=4)
    x = torch.randn(2, 6, 16)
    h = _ln(x, mlp.norm, 1e-6)
    gelu_tanh = lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))  # noqa: E731
    want = (gelu_tanh(h @ mlp.w0.weight.T + mlp.w0.bias) * (h @ mlp.w1.weight.T + mlp.w1.bias)) @ mlp.w2.weight.T
    torch.testing.assert_close(mlp(x), want + mlp.w2.bias, rtol=1e-5, atol=1e-5)

    blk = _randomize(Block(16, heads=2, mlp_ratio=2.0), seed=5).eval()
    a = blk.attn
    hn = _ln(x, blk.norm1, 1e-6)
    q, k, v = (hn @ a.qkv.weight.T + a.qkv.bias).view(2, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)
    attn = _heads_attention(q, k, v).transpose(1, 2).reshape(2, 6, 16) @ a.proj.weight.T + a.proj.bias
    y = x + attn
    want = y + blk.mlp(_ln(y, blk.norm2, 1e-6))
    torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-5)


def test_layernorm2d_normalises_channels_per_pixel():
    ln = _randomize(LayerNorm2d(6), seed=6)
    x = torch.randn(2, 6, 3, 4)
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-6) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), want, rtol=1e-5, atol=1e-5)


def test_mbconv_stride2_shortcut_is_avgpool_without_padding_then_1x1():
    blk = _randomize(MbConvBlock(4, 8, stride=2), seed=7)
    assert make_divisible(8 * 4.0) == 32 and blk.conv1_1x1.out_channels == 32
    with torch.no_grad():  # silence the main branch
        blk.conv3_1x1.weight.zero_()
        blk.conv3_1x1.bias.zero_()
    x = torch.randn(1, 4, 6, 6)
    pooled = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    # count_include_pad=False: the corner averages its 2 x 2 valid pixels, an edge its 2 x 3
    torch.testing.assert_close(pooled[..., 0, 0], x[..., :2, :2].mean((-1, -2)))
    torch.testing.assert_close(pooled[..., 0, 1], x[..., :2, 1:4].mean((-1, -2)))
    want = F.conv2d(pooled, blk.shortcut.expand.weight, blk.shortcut.expand.bias)
    torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-5)
    assert blk(x).shape == (1, 8, 3, 3)


def test_mbconv_main_branch_order():
    blk = _randomize(MbConvBlock(8, 8, stride=1), seed=8)
    x = torch.randn(1, 8, 5, 5)
    h = F.gelu(blk.conv1_1x1(blk.pre_norm(x)))  # exact GELU
    h = F.gelu(F.conv2d(h, blk.conv2_kxk.weight, blk.conv2_kxk.bias, padding=1, groups=32))
    torch.testing.assert_close(blk(x), blk.conv3_1x1(h) + x, rtol=1e-5, atol=1e-5)


def test_upsample_and_inverse_mbconv():
    up = _randomize(Upsample2d(3, 5), seed=9)
    x = torch.randn(1, 3, 4, 4)
    nearest = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    torch.testing.assert_close(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1))

    blk = _randomize(InvMbConvBlock(8, 4, stride=2), seed=10)
    x = torch.randn(1, 8, 4, 4)
    h = F.gelu(blk.conv1_1x1(blk.pre_norm(x)))  # pre-LN2d, 1x1 expand, GELU
    h = blk.up(h)  # then nearest x2 + a full 3x3 conv at the mid width
    assert h.shape == (1, 16, 8, 8) and blk.up.conv.groups == 1
    h = F.gelu(blk.conv2_kxk(h))  # depthwise 3x3, GELU
    torch.testing.assert_close(blk(x), blk.conv3_1x1(h) + blk.shortcut(x), rtol=1e-5, atol=1e-5)
    assert isinstance(blk.shortcut, Upsample2d) and blk(x).shape == (1, 4, 8, 8)


def test_tokens_are_the_row_major_flattening_of_the_conv_map():
    embed = HybridEmbed(nn.Identity())
    m = torch.randn(2, 3, 4, 5)
    tokens = embed(m)
    assert tokens.shape == (2, 20, 3)
    for t in (0, 4, 5, 19):
        assert torch.equal(tokens[:, t], m[:, :, t // 5, t % 5])
