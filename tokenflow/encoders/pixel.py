"""The pixel branch: a VQGAN-style CNN encoder and decoder (taming/LlamaGen layout, ref 1.4).

Encoder: conv_in, per level `num_res_blocks` ResBlocks (single-head attention after each at the deepest
level) and a stride-2 downsample between levels, middle Res-Attn-Res, GroupNorm-Swish-conv to z_channels.
Decoder: the mirror, with num_res_blocks + 1 ResBlocks per level and nearest-x2 + conv upsampling.
Module names follow the taming layout so checkpoints map one-to-one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenflow.config import PixelCNNConfig


def swish(x: Tensor) -> Tensor:
    """SiLU of a fresh normalisation output, in place when no gradient is recorded: the 256 px activations are
    0.27 GB per 8 images, and not allocating a second one each time saves ~8% of an encode (bench/parity.py)
    with bit-identical values. With autograd on, SiLU must keep its input for the backward pass."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return h.add_(self.nin_shortcut(x))  # in place on a fresh conv output: autograd-safe, same values


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1 q/k/v/proj, scale c^-1/2."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q(n), self.k(n), self.v(n)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, hw, C)
        return self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)).add_(x)


class Downsample(nn.Module):
    """3x3 stride-2 conv after zero padding of one pixel on the right and bottom only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # nearest upsampling is not implemented for bf16 on some backends; the cast costs nothing on fp32
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class _Level(nn.Module):
    """One resolution level: ResBlocks, optional attention after each, optional resampling."""

    def __init__(self, cin: int, cout: int, n: int, attn: bool, groups: int, dropout: float, resample=None):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups, dropout) for i in range(n))
        self.attn = nn.ModuleList(AttnBlock(cout, groups) for _ in range(n)) if attn else nn.ModuleList()
        if resample is not None:
            setattr(self, resample.__name__.lower(), resample(cout))

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class PixelEncoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, z_channels, H / stride, W / stride)."""

    def __init__(self, cfg: PixelCNNConfig):
        super().__init__()
        g, levels = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
        self.conv_blocks = nn.ModuleList(
            _Level(
                widths[i],
                widths[i + 1],
                cfg.num_res_blocks,
                attn=i == levels - 1,
                groups=g,
                dropout=cfg.dropout,
                resample=Downsample if i != levels - 1 else None,
            )
            for i in range(levels)
        )
        top = widths[-1]
        self.mid = nn.ModuleList(
            [ResnetBlock(top, top, g, cfg.dropout), AttnBlock(top, g), ResnetBlock(top, top, g, cfg.dropout)]
        )
        self.norm_out = _norm(top, g)
        self.conv_out = nn.Conv2d(top, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class PixelDecoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h * stride, w * stride), unbounded (clamp when saving)."""

    def __init__(self, cfg: PixelCNNConfig):
        super().__init__()
        g, levels = cfg.norm_groups, len(cfg.ch_mult)
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = nn.ModuleList(
            [ResnetBlock(top, top, g, cfg.dropout), AttnBlock(top, g), ResnetBlock(top, top, g, cfg.dropout)]
        )
        blocks, cin = [], top
        for i in reversed(range(levels)):  # deepest level first
            cout = cfg.ch * cfg.ch_mult[i]
            blocks.append(
                _Level(
                    cin,
                    cout,
                    cfg.num_res_blocks + 1,
                    attn=i == levels - 1,
                    groups=g,
                    dropout=cfg.dropout,
                    resample=Upsample if i != 0 else None,
                )
            )
            cin = cout
        self.conv_blocks = nn.ModuleList(blocks)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """The final conv weight, for the adaptive GAN weight."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["PixelEncoder", "PixelDecoder", "ResnetBlock", "AttnBlock", "count_parameters"]
