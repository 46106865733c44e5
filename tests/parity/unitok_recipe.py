"""An official-shaped UniTok state dict from a fixed seed: the parity tests' stand-in for the released file.

`official_shapes()` lists exactly the tensors of the official `unitok_tokenizer.pth` at `ckpt["trainer"]["unitok"]`
(FoundationVision/UniTok @bb8012e, `models/unitok.py` with timm 1.0.8), under the official key names and in the
official `state_dict()` order: 1,335 tensors, 820,333,508 values. That covers the ViTamin-L encoder, the two
attention projections, the 8 sub-codebooks, the ViT + conv decoder, the CLIP text tower and image head, and the
buffers `zero_k_bias`, `vocab_usage` and the frozen zero `encoder.pos_embed`. (Non-persistent buffers, such as the
text tower's `attn_mask`, are not in a state dict.)

`official_state_dict(seed)` fills them with deterministic values at scales that keep every activation finite and
far from degenerate. The official code and this project can then run on the same weights and be compared token for
token. The fixture `tests/fixtures/parity/unitok.npz` was made from `official_state_dict(seed=0)` with the official
code, by `bench/parity.py --preset unitok --write-fixture` (through `bench/official/unitok.py`).
"""

from __future__ import annotations

import math

import torch

from tokenflow.config import QuantizerConfig, TokenizerConfig, UniTokConfig, preset
from tokenflow.encoders.vitamin import make_divisible

Shapes = dict[str, tuple[int, ...]]

# The CLIP half of UniTok (not part of the tokenizer; fixed sizes: open_clip text tower, 768-d joint space).
CLIP_DIM = 768
TEXT_WIDTH, TEXT_LAYERS, TEXT_VOCAB, TEXT_CONTEXT = 768, 12, 49_408, 77


def _norm(o: Shapes, p: str, c: int) -> None:
    o[p + ".weight"] = (c,)
    o[p + ".bias"] = (c,)


def _linear(o: Shapes, p: str, din: int, dout: int) -> None:
    o[p + ".weight"] = (dout, din)
    o[p + ".bias"] = (dout,)


def _conv(o: Shapes, p: str, cin: int, cout: int, k: int, groups: int = 1) -> None:
    o[p + ".weight"] = (cout, cin // groups, k, k)
    o[p + ".bias"] = (cout,)


def geglu_mlp(o: Shapes, p: str, d: int, hidden: int) -> None:
    """`GeGluMlp`: its own LayerNorm, then w2(gelu_tanh(w0 x) * w1 x)."""
    _norm(o, p + ".norm", d)
    _linear(o, p + ".w0", d, hidden)
    _linear(o, p + ".w1", d, hidden)
    _linear(o, p + ".w2", hidden, d)


def vit_block(o: Shapes, p: str, u: UniTokConfig) -> None:
    """A timm 1.0.8 `Block` with packed qkv (full bias) and the GeGLU MLP."""
    _norm(o, p + ".norm1", u.width)
    _linear(o, p + ".attn.qkv", u.width, 3 * u.width)
    _linear(o, p + ".attn.proj", u.width, u.width)
    _norm(o, p + ".norm2", u.width)
    geglu_mlp(o, p + ".mlp", u.width, int(u.width * u.mlp_ratio))


def mbconv(o: Shapes, p: str, cin: int, cout: int, stride: int, u: UniTokConfig) -> None:
    """`MbConvLNBlock`: a stride-2 block's shortcut is avg-pool (+ 1x1 `expand` when the width changes)."""
    mid = make_divisible(cout * u.expand_ratio)
    if stride == 2 and cin != cout:
        _conv(o, p + ".shortcut.expand", cin, cout, 1)
    elif stride == 1 and cin != cout:
        _conv(o, p + ".shortcut", cin, cout, 1)
    _norm(o, p + ".pre_norm", cin)
    _conv(o, p + ".conv1_1x1", cin, mid, 1)
    _conv(o, p + ".conv2_kxk", mid, mid, 3, groups=mid)
    _conv(o, p + ".conv3_1x1", mid, cout, 1)


def inv_mbconv(o: Shapes, p: str, cin: int, cout: int, stride: int, u: UniTokConfig) -> None:
    """`InvMbConvLNBlock`: a stride-2 block upsamples in the shortcut and in `up` (nearest x2 + 3x3 conv)."""
    mid = make_divisible(cout * u.expand_ratio)
    if stride == 2:
        _conv(o, p + ".shortcut.conv", cin, cout, 3)
    elif cin != cout:
        _conv(o, p + ".shortcut", cin, cout, 1)
    _norm(o, p + ".pre_norm", cin)
    _conv(o, p + ".conv1_1x1", cin, mid, 1)
    if stride == 2:
        _conv(o, p + ".up.conv", mid, mid, 3)
    _conv(o, p + ".conv2_kxk", mid, mid, 3, groups=mid)
    _conv(o, p + ".conv3_1x1", mid, cout, 1)


def encoder(o: Shapes, u: UniTokConfig) -> None:
    """timm `VisionTransformer` over the ViTamin conv stem (`patch_embed.backbone`), with UniTok's zero
    `pos_embed` and the final `norm`."""
    stem = u.stem_widths
    o["encoder.pos_embed"] = (1, 1, u.width)
    b = "encoder.patch_embed.backbone"
    _conv(o, b + ".stem.conv1", 3, stem[0], 3)
    _norm(o, b + ".stem.norm1", stem[0])
    _conv(o, b + ".stem.conv2", stem[0], stem[0], 3)
    cin = stem[0]
    for s, (width, depth) in enumerate(zip(stem, u.stage_depths)):
        for d in range(depth):
            mbconv(o, f"{b}.stages.{s}.{d}", cin, width, 2 if d == 0 else 1, u)
            cin = width
    _conv(o, b + ".pool.proj", stem[1], u.width, 3)  # StridedConv registers proj before norm
    _norm(o, b + ".pool.norm", stem[1])
    for i in range(u.encoder_layers):
        vit_block(o, f"encoder.blocks.{i}", u)
    _norm(o, "encoder.norm", u.width)


def attn_projection(o: Shapes, p: str, din: int, dout: int, u: UniTokConfig) -> None:
    """`AttnProjection(din, dout, heads)`: proj(norm3 x) + attn(norm1 x), then + GeGLU(norm2 .). The attention
    has a bias-free qkv of width 3 * max(din, dout), learned q/v biases and a zero k bias buffer."""
    big = max(din, dout)
    _norm(o, p + ".norm1", din)
    o[p + ".attn.q_bias"] = (big,)
    o[p + ".attn.v_bias"] = (big,)
    o[p + ".attn.zero_k_bias"] = (big,)
    o[p + ".attn.qkv.weight"] = (3 * big, din)
    _linear(o, p + ".attn.proj", dout, dout)
    _linear(o, p + ".proj", din, dout)
    _norm(o, p + ".norm3", din)
    _norm(o, p + ".norm2", dout)
    geglu_mlp(o, p + ".mlp", dout, int(dout * u.proj_mlp_ratio))


def quantizer(o: Shapes, q: QuantizerConfig) -> None:
    """`VectorQuantizerM`: per sub-codebook a usage buffer and the unnormalised codebook."""
    for k, dim in enumerate(q.dims):
        o[f"quantizer.codebooks.{k}.vocab_usage"] = (q.codebook_size,)
        o[f"quantizer.codebooks.{k}.codebook.weight"] = (q.codebook_size, dim)


def decoder(o: Shapes, u: UniTokConfig) -> None:
    """`ViTaminDecoder`: the blocks + norm, then the conv upsampler (16 -> 256 px for the released model)."""
    for i in range(u.decoder_layers):
        vit_block(o, f"decoder.blocks.{i}", u)
    _norm(o, "decoder.norm", u.width)
    (w1, w2), stem = u.upsampler_widths, u.stem_widths[0]
    _conv(o, "decoder.up_conv1.conv", u.width, w1, 3)
    cin = w1
    for s, (width, depth) in enumerate(zip(u.upsampler_widths, u.upsampler_depths), start=2):
        for d in range(depth):
            inv_mbconv(o, f"decoder.up_conv{s}.{d}", cin, width, 2 if d == 0 else 1, u)
            cin = width
    _conv(o, "decoder.up_conv4.conv1.conv", w2, stem, 3)  # InvStem
    _norm(o, "decoder.up_conv4.norm1", stem)
    _conv(o, "decoder.up_conv4.conv2", stem, 3, 3)


def text_tower(o: Shapes) -> None:
    """open_clip `TextTransformer` (the local copy in the UniTok repo), 12 layers of width 768."""
    p = "text_encoder."
    o[p + "text_projection"] = (TEXT_WIDTH, CLIP_DIM)
    o[p + "positional_embedding"] = (TEXT_CONTEXT, TEXT_WIDTH)
    o[p + "token_embedding.weight"] = (TEXT_VOCAB, TEXT_WIDTH)
    for i in range(TEXT_LAYERS):
        b = f"{p}transformer.resblocks.{i}."
        _norm(o, b + "ln_1", TEXT_WIDTH)
        o[b + "attn.in_proj_weight"] = (3 * TEXT_WIDTH, TEXT_WIDTH)
        o[b + "attn.in_proj_bias"] = (3 * TEXT_WIDTH,)
        _linear(o, b + "attn.out_proj", TEXT_WIDTH, TEXT_WIDTH)
        _norm(o, b + "ln_2", TEXT_WIDTH)
        _linear(o, b + "mlp.c_fc", TEXT_WIDTH, 4 * TEXT_WIDTH)
        _linear(o, b + "mlp.c_proj", 4 * TEXT_WIDTH, TEXT_WIDTH)
    _norm(o, p + "ln_final", TEXT_WIDTH)


def official_shapes(cfg: TokenizerConfig | None = None) -> Shapes:
    """Key -> shape of the official `trainer.unitok` state dict, in the official `state_dict()` order, for the
    released model (default) or the same layout at the sizes of another unitok config (e.g. `tiny_unitok`)."""
    cfg = cfg or preset("unitok")
    u, q = cfg.unitok, cfg.quantizer
    o: Shapes = {"logit_scale": ()}
    encoder(o, u)
    attn_projection(o, "quant_proj", u.width, q.code_dim, u)
    quantizer(o, q)
    attn_projection(o, "post_quant_proj", q.code_dim, u.width, u)
    decoder(o, u)
    text_tower(o)
    _norm(o, "fc_norm", u.width)
    _linear(o, "projection", u.width, CLIP_DIM)
    return o


_ZEROS = ("encoder.pos_embed", "zero_k_bias", "vocab_usage")  # constants of the official model
_EMBEDDINGS = ("positional_embedding", "token_embedding.weight")
_BLOCKS = ("encoder.blocks.", "decoder.blocks.")
_RESIDUAL_OUT = (".attn.proj.weight", ".mlp.w2.weight")  # the last layer of each residual branch of a block
RESIDUAL_GAIN = 1 / math.sqrt(2 * 31)  # 31 blocks on each side of the released model


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic fp32 values for every official tensor (one generator, keys in `official_shapes` order):

    - constants, no draw: `encoder.pos_embed`, `zero_k_bias`, `vocab_usage` zero; `logit_scale` = log(1 / 0.07);
    - codebooks N(0, 1) (both sides normalise rows at use); text token/position tables 0.02 N(0, 1);
    - LayerNorm gains 1 + 0.02 N(0, 1); every bias (q/v biases included) 0.02 N(0, 1);
    - every other weight N(0, 1) / sqrt(fan_in), fan_in = prod(shape[1:]) (in / groups * kh * kw for convs),
      times RESIDUAL_GAIN = 1 / sqrt(2 * 31) for the residual-branch outputs of the 62 transformer blocks
      (`attn.proj`, `mlp.w2`; GPT-2's scaling). Without it the 31-block stack (full attention, no position
      embedding) washes out the per-position differences: on the first two photos the mean cosine between
      token latents goes from 0.58 after the stem to 0.92 at the encoder output (0.65 with it), and a
      sub-codebook uses 9-79 distinct codes over the 256 positions (53-117 with it).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in official_shapes().items():
        if key == "logit_scale":
            out[key] = torch.tensor(math.log(1 / 0.07))
            continue
        if key.endswith(_ZEROS):
            out[key] = torch.zeros(shape)
            continue
        noise = torch.randn(shape, generator=gen)
        if key.endswith(".codebook.weight"):
            out[key] = noise
        elif key.endswith(_EMBEDDINGS):
            out[key] = 0.02 * noise
        elif len(shape) == 1 and key.endswith(".weight"):  # every 1-D weight of UniTok is a LayerNorm gain
            out[key] = 1.0 + 0.02 * noise
        elif len(shape) == 1:
            out[key] = 0.02 * noise
        else:
            gain = RESIDUAL_GAIN if key.startswith(_BLOCKS) and key.endswith(_RESIDUAL_OUT) else 1.0
            out[key] = noise * (gain / math.sqrt(math.prod(shape[1:])))
    return out
