"""Plain ViT pieces: the BEiT-v2 style block, the semantic decoder, and position-table resizing.

The semantic decoder (ref 1.5) maps the 32-d semantic codes on a g x g grid back to the teacher's feature
space: a 1x1 conv "patch embed", a class token, a learned position table, `depth` pre-norm blocks with q/v
bias only, mean-pooling style final norm (`fc_norm`) over the patch tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenflow.config import SemanticDecoderConfig


def resize_pos_embed(pos: Tensor, grid: int, num_prefix: int = 1) -> Tensor:
    """Resize a (..., num_prefix + g0*g0, D) position table to a grid x grid one.

    Bicubic with scale_factor (grid + 0.1) / g0, the DeiT/BEiT convention the official code uses; calling
    interpolate with size=grid instead samples other points and changed 21% of tokens (ref 8)."""
    lead = pos.shape[:-2]
    pos = pos.reshape(-1, *pos.shape[-2:])
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    g0 = math.isqrt(patches.shape[1])
    if g0 == grid:
        return pos.reshape(*lead, *pos.shape[-2:])
    d = patches.shape[-1]
    patches = patches.reshape(-1, g0, g0, d).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / g0
    patches = F.interpolate(patches.float(), scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if patches.shape[-1] != grid:
        raise ValueError(f"position table resize from {g0} gave {patches.shape[-1]}, wanted {grid}")
    patches = patches.to(pos.dtype).permute(0, 2, 3, 1).reshape(pos.shape[0], grid * grid, d)
    return torch.cat([prefix, patches], dim=1).reshape(*lead, -1, d)


class Attention(nn.Module):
    """Multi-head self-attention; qkv without bias plus learned q and v biases (k bias fixed at 0)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_vit_(blocks: nn.ModuleList, *modules: nn.Module) -> None:
    """BEiT init: trunc-normal(0.02) linears, zero biases, unit LayerNorms, then attn.proj and fc2 weights
    divided by sqrt(2 * layer_id) so deeper residual branches start smaller."""
    for m in (*modules, blocks):
        for sub in m.modules():
            if isinstance(sub, nn.Linear):
                nn.init.trunc_normal_(sub.weight, std=0.02)
                if sub.bias is not None:
                    nn.init.zeros_(sub.bias)
            elif isinstance(sub, nn.LayerNorm):
                nn.init.ones_(sub.weight)
                nn.init.zeros_(sub.bias)
    with torch.no_grad():
        for layer_id, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


class SemanticDecoder(nn.Module):
    """(B, code_dim, g, g) semantic codes -> (B, g*g, width) tokens."""

    def __init__(self, cfg: SemanticDecoderConfig, in_dim: int):
        super().__init__()
        w = cfg.width
        self.patch_embed = nn.Conv2d(in_dim, w, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid * cfg.grid, w))
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(w, eps=1e-6)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_vit_(self.blocks, self.fc_norm)

    def forward(self, codes: Tensor) -> Tensor:
        b, _, g, _ = codes.shape
        x = self.patch_embed(codes).flatten(2).transpose(1, 2)  # (B, g*g, W)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + resize_pos_embed(self.pos_embed, g)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:])


def task_mlp(din: int, dout: int) -> nn.Sequential:
    """Linear -> Tanh -> Linear, trunc-normal(0.02) weights and zero biases (ref 1.5 task layers)."""
    mlp = nn.Sequential(nn.Linear(din, din), nn.Tanh(), nn.Linear(din, dout))
    for m in (mlp[0], mlp[2]):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    return mlp
