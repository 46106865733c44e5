"""Official-shaped TokenFlow state dicts from a fixed seed: the parity tests' stand-in for the released files.

`official_shapes(preset)` lists exactly the tensors of the official checkpoints, under the official key names
(ByteFlow-AI/TokenFlow @9812da0, `tokenflow/tokenizer/vq_model.py` and the towers it builds):

- "clipb_256" = `tokenflow_clipb_32k_enhanced.pt`: 649 tensors, 376,700,715 values;
- "siglip_384" = `tokenflow_siglip_32k.pt`: 848 tensors, 554,141,041 values.

`official_state_dict(preset, seed)` fills them with deterministic values at scales that keep every activation
finite and far from degenerate (unit-ish LayerNorm/GroupNorm gains, weights ~ N(0, 1/fan_in)), so that the
official code and this project can be run on the same weights and compared token for token. The fixtures in
`tests/fixtures/parity/` were made from `official_state_dict(preset, seed=0)` by `bench/parity.py`.
"""

from __future__ import annotations

import math

import torch

Shapes = dict[str, tuple[int, ...]]

CODEBOOK = 32_768


def _norm(o: Shapes, p: str, c: int) -> None:
    o[p + ".weight"] = (c,)
    o[p + ".bias"] = (c,)


def _conv(o: Shapes, p: str, cin: int, cout: int, k: int) -> None:
    o[p + ".weight"] = (cout, cin, k, k)
    o[p + ".bias"] = (cout,)


def _linear(o: Shapes, p: str, din: int, dout: int) -> None:
    o[p + ".weight"] = (dout, din)
    o[p + ".bias"] = (dout,)


def _resblock(o: Shapes, p: str, cin: int, cout: int) -> None:
    _norm(o, p + ".norm1", cin)
    _conv(o, p + ".conv1", cin, cout, 3)
    _norm(o, p + ".norm2", cout)
    _conv(o, p + ".conv2", cout, cout, 3)
    if cin != cout:
        _conv(o, p + ".nin_shortcut", cin, cout, 1)


def _attnblock(o: Shapes, p: str, c: int) -> None:
    _norm(o, p + ".norm", c)
    for name in ("q", "k", "v", "proj_out"):
        _conv(o, f"{p}.{name}", c, c, 1)


def pixel_encoder(p: str, ch: int = 128, mult=(1, 1, 2, 2, 4), blocks: int = 2, z: int = 256) -> Shapes:
    """The LlamaGen/taming encoder: `conv_blocks.{level}.{res,attn,downsample}`, attention at the last level."""
    o: Shapes = {}
    _conv(o, p + "conv_in", 3, ch, 3)
    widths = [ch] + [ch * m for m in mult]
    last = len(mult) - 1
    for level in range(len(mult)):
        cin = widths[level]
        for j in range(blocks):
            _resblock(o, f"{p}conv_blocks.{level}.res.{j}", cin, widths[level + 1])
            cin = widths[level + 1]
            if level == last:
                _attnblock(o, f"{p}conv_blocks.{level}.attn.{j}", cin)
        if level != last:
            _conv(o, f"{p}conv_blocks.{level}.downsample.conv", cin, cin, 3)
    top = widths[-1]
    _resblock(o, p + "mid.0", top, top)
    _attnblock(o, p + "mid.1", top)
    _resblock(o, p + "mid.2", top, top)
    _norm(o, p + "norm_out", top)
    _conv(o, p + "conv_out", top, z, 3)
    return o


def pixel_decoder(p: str, ch: int = 128, mult=(1, 1, 2, 2, 4), blocks: int = 2, z: int = 256) -> Shapes:
    """The decoder: `conv_blocks.0` is the deepest level; blocks + 1 ResBlocks per level, upsample on all but
    the last."""
    o: Shapes = {}
    top = ch * mult[-1]
    _conv(o, p + "conv_in", z, top, 3)
    _resblock(o, p + "mid.0", top, top)
    _attnblock(o, p + "mid.1", top)
    _resblock(o, p + "mid.2", top, top)
    cin = top
    for idx, level in enumerate(reversed(range(len(mult)))):
        cout = ch * mult[level]
        for j in range(blocks + 1):
            _resblock(o, f"{p}conv_blocks.{idx}.res.{j}", cin, cout)
            cin = cout
            if level == len(mult) - 1:
                _attnblock(o, f"{p}conv_blocks.{idx}.attn.{j}", cin)
        if level != 0:
            _conv(o, f"{p}conv_blocks.{idx}.upsample.conv", cin, cin, 3)
    _norm(o, p + "norm_out", cin)
    _conv(o, p + "conv_out", cin, 3, 3)
    return o


def semantic_decoder(p: str, d: int, grid: int, depth: int = 3, code_dim: int = 32) -> Shapes:
    """BEiT-v2 VQKD decoder: 1x1 patch embed, class token, position table, blocks with q/v bias, fc_norm."""
    o: Shapes = {}
    _conv(o, p + "patch_embed.proj", code_dim, d, 1)
    o[p + "cls_token"] = (1, 1, d)
    o[p + "pos_embed"] = (1, grid * grid + 1, d)
    for i in range(depth):
        b = f"{p}blocks.{i}."
        _norm(o, b + "norm1", d)
        o[b + "attn.q_bias"] = (d,)
        o[b + "attn.v_bias"] = (d,)
        o[b + "attn.qkv.weight"] = (3 * d, d)
        _linear(o, b + "attn.proj", d, d)
        _norm(o, b + "norm2", d)
        _linear(o, b + "mlp.fc1", d, 4 * d)
        _linear(o, b + "mlp.fc2", 4 * d, d)
    _norm(o, p + "fc_norm", d)
    return o


def _shared(d: int, grid: int, teacher_dim: int, enhanced: bool) -> Shapes:
    o = pixel_encoder("encoder.")
    o.update(pixel_decoder("decoder.", ch=256 if enhanced else 128, blocks=4 if enhanced else 2))
    o.update(semantic_decoder("decoder_vqkd.", d, grid))
    _conv(o, "quant_conv", 256, 8, 1)
    _conv(o, "post_quant_conv", 8, 256, 1)
    _linear(o, "encode_task_layer.0", d, d)
    _linear(o, "encode_task_layer.2", d, 32)
    _linear(o, "decode_task_layer.0", d, d)
    _linear(o, "decode_task_layer.2", d, teacher_dim)
    o["quantize.embedding_vqkd.weight"] = (CODEBOOK, 32)
    o["quantize.embedding_vqgan.weight"] = (CODEBOOK, 8)
    o["quantize.codebook_used"] = (4 * CODEBOOK,)
    return o


def openai_clip_vit_b16(p: str, width: int = 768, layers: int = 12, grid: int = 14) -> Shapes:
    """OpenAI CLIP ViT-B/16 visual tower without `proj` (the official loader deletes it)."""
    o: Shapes = {p + "conv1.weight": (width, 3, 16, 16), p + "class_embedding": (width,)}
    o[p + "positional_embedding"] = (grid * grid + 1, width)
    _norm(o, p + "ln_pre", width)
    for i in range(layers):
        b = f"{p}transformer.resblocks.{i}."
        o[b + "attn.in_proj_weight"] = (3 * width, width)
        o[b + "attn.in_proj_bias"] = (3 * width,)
        _linear(o, b + "attn.out_proj", width, width)
        _norm(o, b + "ln_1", width)
        _linear(o, b + "mlp.c_fc", width, 4 * width)
        _linear(o, b + "mlp.c_proj", 4 * width, width)
        _norm(o, b + "ln_2", width)
    _norm(o, p + "ln_post", width)
    return o


def hf_siglip_so400m(p: str, d: int = 1152, ff: int = 4304, layers: int = 27, grid: int = 27) -> Shapes:
    """transformers' SiglipVisionModel (SO400M-14-384), pooling head included (present, unused)."""
    o: Shapes = {}
    _conv(o, p + "embeddings.patch_embedding", 3, d, 14)
    o[p + "embeddings.position_embedding.weight"] = (grid * grid, d)
    for i in range(layers):
        b = f"{p}encoder.layers.{i}."
        _norm(o, b + "layer_norm1", d)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(o, b + "self_attn." + name, d, d)
        _norm(o, b + "layer_norm2", d)
        _linear(o, b + "mlp.fc1", d, ff)
        _linear(o, b + "mlp.fc2", ff, d)
    _norm(o, p + "post_layernorm", d)
    o[p + "head.probe"] = (1, 1, d)
    o[p + "head.attention.in_proj_weight"] = (3 * d, d)
    o[p + "head.attention.in_proj_bias"] = (3 * d,)
    _linear(o, p + "head.attention.out_proj", d, d)
    _norm(o, p + "head.layernorm", d)
    _linear(o, p + "head.mlp.fc1", d, ff)
    _linear(o, p + "head.mlp.fc2", ff, d)
    return o


def official_shapes(preset: str) -> Shapes:
    """Key -> shape of the official checkpoint behind `preset` ("clipb_256" or "siglip_384")."""
    if preset == "clipb_256":
        o = _shared(768, 14, 512, enhanced=True)
        o.update(openai_clip_vit_b16("encoder_vqkd."))
        return o
    if preset == "siglip_384":
        o = _shared(1152, 27, 1152, enhanced=False)
        o.update(hf_siglip_so400m("encoder_vqkd.vision_model."))
        o["scaling_layer.shift"] = (1, 3, 1, 1)
        o["scaling_layer.scale"] = (1, 3, 1, 1)
        return o
    raise ValueError(f"no official TokenFlow checkpoint for preset {preset!r}")


_NORMS = ("norm", "ln_", "layernorm")
_EMBEDDINGS = ("class_embedding", "positional_embedding", "position_embedding", "pos_embed", "cls_token", "probe")


def official_state_dict(preset: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic fp32 values for every official tensor (one generator, keys in `official_shapes` order):

    - LayerNorm/GroupNorm gains 1 + 0.02 N(0,1), every bias and q/v bias 0.02 N(0,1);
    - class tokens and position tables 0.02 N(0,1); codebooks N(0,1) (both sides normalise rows at use);
    - every other weight N(0,1) / sqrt(fan_in), fan_in = prod(shape[1:]);
    - statistics buffers zero (`codebook_used`), SigLIP's input scaling layer 0.5 (its fixed value).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in official_shapes(preset).items():
        leaf = key.rsplit(".", 2)
        owner = leaf[-2] if len(leaf) > 1 else ""
        if key == "quantize.codebook_used":
            out[key] = torch.zeros(shape)
            continue
        if key.startswith("scaling_layer."):
            out[key] = torch.full(shape, 0.5)
            continue
        noise = torch.randn(shape, generator=gen)
        if key.endswith(("embedding_vqkd.weight", "embedding_vqgan.weight")):
            out[key] = noise
        elif any(key.endswith(e) or key.endswith(e + ".weight") for e in _EMBEDDINGS):
            out[key] = 0.02 * noise
        elif len(shape) == 1 and key.endswith(".weight") and any(n in owner for n in _NORMS):
            out[key] = 1.0 + 0.02 * noise
        elif len(shape) == 1:
            out[key] = 0.02 * noise
        else:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
    return out
