"""ViTamin pieces in plain PyTorch: UniTok's encoder, attention projections and decoder (ref A1.2, A1.3, A1.5).

A mirror of the released UniTok tokenizer (official `models/vitamin.py`, `models/vqvae.py`, `models/unitok.py`,
built on timm 1.0.8). Every module and parameter name equals the official one, so the official state dict loads
key for key (`model.` + official key). No timm: timm 1.0.31 can no longer build UniTok's GeGluMlp.

    encoder.patch_embed.backbone    stem (3x3 s2 conv, LN2d + GELU, 3x3 conv) -> stages.{0,1} (MBConv, the first
                                    block of each stride 2) -> pool (LN2d, 3x3 s2 conv to the ViT width)
    encoder.blocks.{i}, .norm       pre-norm ViT blocks with a GeGLU MLP, no position embedding, no class token
    quant_proj / post_quant_proj    AttnProjection (width <-> code_dim)
    decoder.blocks.{i}, .norm       the same ViT blocks
    decoder.up_conv1..4             nearest x2 + conv, inverted MBConv stages, InvStem to RGB

Numerics that matter for token parity, all as in the official code: LayerNorm eps 1e-6 everywhere except in
AttnProjection (`nn.LayerNorm` default 1e-5); exact GELU in the conv blocks, tanh GELU in the GeGLU MLPs; SDPA
with the default 1/sqrt(head_dim) scale and no mask.

Not registered (the converter drops them): the official `encoder.pos_embed` (a frozen (1, 1, width) zero table
added to every token, a no-op), `attn.zero_k_bias` (a zero buffer: the key bias is built as zeros at run time).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU of a fresh tensor (a convolution's, a Linear's or a normalisation's output), in place when no gradient
    is recorded: not allocating a second activation map saves its page faults and memory traffic with
    bit-identical values (the same kernel writes the same numbers). With autograd on, GELU keeps its input."""
    if torch.is_grad_enabled():
        return F.gelu(x, approximate=approximate)
    return torch.ops.aten.gelu_(x, approximate=approximate)


def make_divisible(v: float, divisor: int = 8) -> int:
    """timm's `make_divisible` (round to the nearest multiple of 8, never more than 10% down): the MBConv
    expansion width, 4 x 160 = 640 and 4 x 320 = 1280 in ViTamin-L."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample (timm `DropPath`): zero a residual branch with probability p, scale by 1/(1-p)."""
    if p <= 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


# --------------------------------------------------------------------------------------------------------------
# convolutional pieces


class LayerNorm2d(nn.LayerNorm):
    """timm `LayerNorm2d` / `LayerNormAct2d(apply_act=False)`: LayerNorm over the channels of an NCHW map
    (permute to NHWC, normalise the last dim, permute back), eps 1e-6 in ViTamin."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerNormGelu2d(LayerNorm2d):
    """timm `LayerNormAct2d` with act 'gelu': `LayerNorm2d` then exact GELU (the stem's and InvStem's `norm1`)."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(super().forward(x))


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """timm `create_conv2d(cin, cout, 3, stride)` with default padding: static symmetric padding 1, bias."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups)


class Stem(nn.Module):
    """Official `Stem`: conv 3x3 stride 2 (3 -> stem width), LayerNorm2d + GELU, conv 3x3."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride=2)
        self.norm1 = LayerNormGelu2d(cout)
        self.conv2 = conv3x3(cout, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class Downsample2d(nn.Module):
    """Official `Downsample2d`, the shortcut of a stride-2 MBConv block: AvgPool2d(3, stride 2, padding 1,
    count_include_pad=False), then a 1x1 conv `expand` when the channel count changes (else no parameters)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=False)
        self.expand = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.expand(self.pool(x))


class MbConvBlock(nn.Module):
    """Official `MbConvLNBlock`: shortcut + [pre-LayerNorm2d (no activation) -> 1x1 expand to make_divisible(
    cout * expand) -> GELU -> depthwise 3x3 (stride 1 or 2) -> GELU -> 1x1 project]. The shortcut is
    `Downsample2d` at stride 2, a 1x1 conv when only the width changes, else the identity."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand_ratio: float = 4.0):
        super().__init__()
        mid = make_divisible(cout * expand_ratio)
        if stride == 2:
            self.shortcut: nn.Module = Downsample2d(cin, cout)
        elif cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(cin)
        self.conv1_1x1 = nn.Conv2d(cin, mid, 1)
        self.conv2_kxk = conv3x3(mid, mid, stride=stride, groups=mid)
        self.conv3_1x1 = nn.Conv2d(mid, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = gelu(self.conv1_1x1(self.pre_norm(x)))
        h = gelu(self.conv2_kxk(h))
        return self.conv3_1x1(h).add_(self.shortcut(x))  # a fresh conv output: autograd-safe, same values


class StridedConv(nn.Module):
    """Official `StridedConv` (the backbone's `pool`): LayerNorm2d, then conv 3x3 stride 2 (padding 1) to the
    ViT width. `stride` 1 is this project's option for tiny presets only."""

    def __init__(self, cin: int, cout: int, stride: int = 2):
        super().__init__()
        self.norm = LayerNorm2d(cin)
        self.proj = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


class ConvStem(nn.Module):
    """Official `MbConvStages` (the hybrid backbone): `stem`, `stages.{s}.{d}` (MBConv, the first block of each
    stage strided), `pool`. (B, 3, H, W) -> (B, width, H / stride, W / stride), stride 16 in ViTamin-L."""

    def __init__(
        self,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        out_dim: int,
        expand_ratio: float = 4.0,
        pool_stride: int = 2,
    ):
        super().__init__()
        self.stem = Stem(3, widths[0])
        stages, cin = [], widths[0]
        for width, depth in zip(widths, depths):
            blocks = [MbConvBlock(cin if d == 0 else width, width, 1 if d else 2, expand_ratio) for d in range(depth)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.pool = StridedConv(cin, out_dim, stride=pool_stride)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.pool(x)


class HybridEmbed(nn.Module):
    """Official `HybridEmbed` with patch size 1: the conv backbone's map flattened row-major to tokens
    (B, h * w, width); its `proj` is the identity and holds no parameters."""

    def __init__(self, backbone: ConvStem):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------
# transformer pieces


class GeGluMlp(nn.Module):
    """Official `GeGluMlp`: its own LayerNorm (eps 1e-6), then w2(gelu_tanh(w0 x) * w1 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        h = gelu(self.w0(x), approximate="tanh")
        return self.w2(h * self.w1(x) if torch.is_grad_enabled() else h.mul_(self.w1(x)))


class Attention(nn.Module):
    """timm 1.0.8 `Attention` as ViTamin builds it: qkv Linear with a full bias packed [q; k; v], heads of
    width // heads, SDPA (no mask), output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must divide by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """timm 1.0.8 ViT `Block` with UniTok's `mlp_layer=GeGluMlp`: x + attn(norm1 x), then x + mlp(norm2 x), both
    norms LayerNorm eps 1e-6 (so the MLP input is normalised twice: `norm2`, then the GeGLU's own `norm`). No
    layer scale; optional stochastic depth (training only)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = GeGluMlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        # residuals added into the fresh branch output (a Linear's, or drop_path's scaled copy), never into x: no
        # backward needs those outputs, and addition commutes exactly, so the values are those of x + branch
        x = drop_path(self.attn(self.norm1(x)), self.drop_path, self.training).add_(x)
        return drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training).add_(x)


def make_blocks(depth: int, dim: int, heads: int, mlp_ratio: float, drop_path_rate: float) -> nn.ModuleList:
    """`depth` blocks with timm's stochastic-depth schedule: rates linearly spaced from 0 to drop_path_rate."""
    rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
    return nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in rates)


class ViTaminEncoder(nn.Module):
    """The official encoder (timm `VisionTransformer` built by `vitamin_large` with patch_size=1,
    pos_embed='none', class_token=False, reg_tokens=0, global_pool='', fc_norm=False): `patch_embed` (the conv
    backbone), `blocks`, final `norm` (LayerNorm 1e-6). (B, 3, H, W) -> tokens (B, (H/16) * (W/16), width).
    The official zero `pos_embed` and the identity `norm_pre` / `fc_norm` / `head` are left out."""

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        stem_widths: tuple[int, ...],
        stage_depths: tuple[int, ...],
        expand_ratio: float,
        pool_stride: int,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.patch_embed = HybridEmbed(ConvStem(stem_widths, stage_depths, width, expand_ratio, pool_stride))
        self.blocks = make_blocks(depth, width, heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------------------------
# attention projections


class PlainAttention(nn.Module):
    """Official `PlainAttention(in_dim, out_dim, heads)`: qkv Linear without bias, learned `q_bias` and `v_bias`,
    zero key bias; full (non-causal) SDPA, as in the 2025-04 checkpoint (the first release was causal).

    - down (in > out): heads of in_dim // heads; the head outputs are AVERAGED (B, N, in_dim // heads), then
      adaptive-average-pooled to out_dim if that differs (not in UniTok: 1024 / 16 = 64), then `proj` out -> out;
    - up (in <= out): heads of out_dim // heads, concatenated to out_dim, then `proj` out -> out.
    """

    def __init__(self, in_dim: int, out_dim: int, heads: int):
        super().__init__()
        inner = max(in_dim, out_dim)
        if inner % heads:
            raise ValueError(f"attention width {inner} must divide by heads {heads}")
        self.in_dim, self.out_dim, self.heads = in_dim, out_dim, heads
        self.head_dim = inner // heads
        self.qkv = nn.Linear(in_dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        if self.in_dim > self.out_dim:
            out = out.mean(dim=1)  # (B, N, head_dim)
            if self.head_dim != self.out_dim:
                out = F.adaptive_avg_pool1d(out, self.out_dim)
        else:
            out = out.transpose(1, 2).reshape(b, n, self.out_dim)
        return self.proj(out)


class AttnProjection(nn.Module):
    """Official `AttnProjection(in_dim, out_dim, heads)`: y = proj(norm3 x) + attn(norm1 x), then
    y + mlp(norm2 y) with a GeGLU of hidden mlp_ratio * out_dim. norm1/2/3 are `nn.LayerNorm` with the default
    eps 1e-5 (the GeGLU's own norm keeps 1e-6)."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        if out_dim % in_dim and in_dim % out_dim:
            raise ValueError(f"AttnProjection needs one of in_dim {in_dim} / out_dim {out_dim} to divide the other")
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = PlainAttention(in_dim, out_dim, heads)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = GeGluMlp(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(self.norm3(x)).add_(self.attn(self.norm1(x)))  # fresh Linear outputs, as in Block
        return self.mlp(self.norm2(x)).add_(x)


# --------------------------------------------------------------------------------------------------------------
# decoder


class Upsample2d(nn.Module):
    """Official `Upsample2d`: nearest x2, then conv 3x3 (padding 1). `scale` 1 (tiny presets only) skips the
    interpolation."""

    def __init__(self, cin: int, cout: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.conv = conv3x3(cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale != 1:
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.conv(x)


class InvMbConvBlock(nn.Module):
    """Official `InvMbConvLNBlock`: shortcut + [pre-LayerNorm2d -> 1x1 expand to make_divisible(cout * expand)
    -> GELU -> `up` (Upsample2d mid -> mid, a full 3x3 conv, at stride 2 only) -> depthwise 3x3 -> GELU -> 1x1
    project]. The shortcut is Upsample2d(cin, cout) at stride 2, a 1x1 conv when only the width changes, else the
    identity."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand_ratio: float = 4.0):
        super().__init__()
        mid = make_divisible(cout * expand_ratio)
        if stride == 2:
            self.shortcut: nn.Module = Upsample2d(cin, cout)
        elif cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(cin)
        self.conv1_1x1 = nn.Conv2d(cin, mid, 1)
        self.up = Upsample2d(mid, mid) if stride == 2 else nn.Identity()
        self.conv2_kxk = conv3x3(mid, mid, groups=mid)
        self.conv3_1x1 = nn.Conv2d(mid, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(gelu(self.conv1_1x1(self.pre_norm(x))))
        h = gelu(self.conv2_kxk(h))
        return self.conv3_1x1(h).add_(self.shortcut(x))  # a fresh conv output: autograd-safe, same values


class InvStem(nn.Module):
    """Official `InvStem`: `conv1` Upsample2d (nearest x2 + conv 3x3, cin -> cin), LayerNorm2d + GELU, conv 3x3
    to RGB."""

    def __init__(self, cin: int, cout: int = 3):
        super().__init__()
        self.conv1 = Upsample2d(cin, cin)
        self.norm1 = LayerNormGelu2d(cin)
        self.conv2 = conv3x3(cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class ViTaminDecoder(nn.Module):
    """Official `ViTaminDecoder` (num_query=0): `blocks`, `norm`, then the tokens reshaped row-major to
    (B, width, g, g) and upsampled: `up_conv1` (Upsample2d width -> w1), `up_conv2` (InvMBConv stage at w1, the
    first block x2), `up_conv3` (at w2, the first block x2), `up_conv4` (InvStem to RGB). Raw output, unclamped
    (the official code clamps to [-1, 1] only in `idx_to_img`)."""

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        up_widths: tuple[int, int],
        up_depths: tuple[int, int],
        expand_ratio: float,
        first_scale: int,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        w1, w2 = up_widths
        self.blocks = make_blocks(depth, width, heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.up_conv1 = Upsample2d(width, w1, scale=first_scale)
        self.up_conv2 = nn.Sequential(
            *(InvMbConvBlock(w1, w1, 2 if d == 0 else 1, expand_ratio) for d in range(up_depths[0]))
        )
        self.up_conv3 = nn.Sequential(
            *(InvMbConvBlock(w1 if d == 0 else w2, w2, 2 if d == 0 else 1, expand_ratio) for d in range(up_depths[1]))
        )
        self.up_conv4 = InvStem(w2, 3)

    @property
    def last_layer(self) -> Tensor:
        return self.up_conv4.conv2.weight

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        g = math.isqrt(n)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x).view(b, g, g, c).permute(0, 3, 1, 2)
        return self.up_conv4(self.up_conv3(self.up_conv2(self.up_conv1(x))))


# --------------------------------------------------------------------------------------------------------------
# initialisation


@torch.no_grad()
def init_vitamin_(encoder: nn.Module, *decoder_side: nn.Module) -> None:
    """Initialisation for training from scratch, following the official recipe.

    Everywhere: Linear trunc-normal(std 0.02) with zero bias (timm ViT init; UniTok's `init_weights`), LayerNorm
    weight 1 and bias 0, q/v biases 0. Convs of the encoder: normal(0, sqrt(2 / fan_out)) with
    fan_out = k * k * out_channels / groups and zero bias (ViTamin's `_init_conv`, which its stem and MBConv
    blocks apply). Convs of the decoder side (decoder, quant_proj, post_quant_proj): Xavier-normal with gain 0.5
    and zero bias (UniTok's `build_unitok`: `init_weights(..., vae_init=-0.5)`).
    """
    for root, encoder_side in [(encoder, True)] + [(m, False) for m in decoder_side]:
        for m in root.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                if encoder_side:
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                else:
                    nn.init.xavier_normal_(m.weight, gain=0.5)
                nn.init.zeros_(m.bias)
            elif isinstance(m, PlainAttention):
                nn.init.zeros_(m.q_bias)
                nn.init.zeros_(m.v_bias)


__all__ = [
    "AttnProjection",
    "Block",
    "ConvStem",
    "GeGluMlp",
    "InvMbConvBlock",
    "InvStem",
    "LayerNorm2d",
    "MbConvBlock",
    "PlainAttention",
    "Upsample2d",
    "ViTaminDecoder",
    "ViTaminEncoder",
    "init_vitamin_",
    "make_divisible",
]
