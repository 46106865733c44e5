"""The semantic branch's encoder and its frozen teacher, on open_clip vision towers (ref 1.3).

Two tower families are supported:
- open_clip's own `VisionTransformer` (OpenAI CLIP ViT-B/16 for clipb, or a small "custom" one for tests);
- open_clip's timm wrapper (`ViT-SO400M-14-SigLIP-384` for TokenFlow-XL).

The forward is written here rather than calling the tower's, because TokenFlow needs what the tower does not
return: patch tokens at a chosen depth, position tables interpolated to other grids, and per-branch input
normalisation. Weights come from open_clip (a pretrained tag when online, a local file path always) or stay
random (`pretrained=None`).
"""

from __future__ import annotations

import copy
import os

import open_clip
import torch
from torch import Tensor, nn

from tokenflow.config import SemanticEncoderConfig
from tokenflow.encoders.vit import resize_pos_embed

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_input(x: Tensor, kind: str) -> Tensor:
    """Map a [-1, 1] image to a tower's input convention: "none" keeps it, "clip"/"siglip" go through
    [0, 1] ((x + 1) * 127.5 clamped to [0, 255], / 255) and then (x - mean) / std."""
    if kind == "none":
        return x
    x = ((x + 1.0) * 127.5).clamp(0.0, 255.0) / 255.0
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else ((0.5,) * 3, (0.5,) * 3)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def build_tower(cfg: SemanticEncoderConfig, pretrained: str | None) -> nn.Module:
    """The open_clip vision tower of `cfg`, with weights from `pretrained` (tag or path) or random."""
    if cfg.arch == "custom":
        act = open_clip.transformer.QuickGELU if cfg.quick_gelu else _gelu(cfg.gelu_tanh)
        tower = open_clip.transformer.VisionTransformer(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.width,
            layers=cfg.layers,
            heads=cfg.heads,
            mlp_ratio=4.0,
            output_dim=cfg.output_dim,
            act_layer=act,
        )
        if pretrained is not None:
            tower.load_state_dict(_load_tensors(pretrained), strict=True)
        return tower
    if pretrained is not None and not os.path.exists(pretrained) and "://" not in pretrained:
        tags = open_clip.list_pretrained_tags_by_model(cfg.arch)
        if pretrained not in tags:
            raise ValueError(
                f"pretrained={pretrained!r} is neither a local file nor an open_clip tag of {cfg.arch} ({tags})"
            )
    model = open_clip.create_model(
        cfg.arch, pretrained=pretrained, force_quick_gelu=cfg.quick_gelu, device=torch.get_default_device()
    )
    if cfg.gelu_tanh:
        _set_gelu_tanh(model.visual)
    return model.visual


def _gelu(tanh: bool) -> type[nn.Module]:
    return GELUTanh if tanh else nn.GELU


class GELUTanh(nn.GELU):
    def __init__(self) -> None:
        super().__init__(approximate="tanh")


def _set_gelu_tanh(tower: nn.Module) -> None:
    """Swap every exact GELU of a tower for the tanh approximation (no weights change)."""
    swapped = 0
    for module in list(tower.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.GELU) and child.approximate == "none":
                setattr(module, name, GELUTanh())
                swapped += 1
    if not swapped:
        raise ValueError("gelu_tanh=True but the tower has no exact GELU to replace")


def _load_tensors(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class SemanticEncoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, g*g, width) patch tokens at `cfg.feature_layer`."""

    def __init__(self, cfg: SemanticEncoderConfig, *, pretrained: str | None = None, keep_proj: bool = False):
        super().__init__()
        self.cfg = cfg
        self.visual = build_tower(cfg, pretrained)
        self.is_timm = hasattr(self.visual, "trunk")
        if not keep_proj:
            self._drop_unused_head()

    def _drop_unused_head(self) -> None:
        """The trainable encoder never uses the CLIP projection (ref 1.3: `proj` deleted)."""
        if self.is_timm:
            self.visual.head = nn.Identity()
            if self.cfg.feature_layer == -2:
                # The last block, final norm and pooling head are unused when reading block -2; freeze them as the
                # official code does so optimisers hold no state for them.
                trunk = self.visual.trunk
                for mod in (trunk.blocks[-1], trunk.norm, getattr(trunk, "attn_pool", None), trunk.fc_norm):
                    if isinstance(mod, nn.Module):
                        mod.requires_grad_(False)
        else:
            self.visual.proj = None

    @property
    def width(self) -> int:
        return self.cfg.width

    def forward(self, x: Tensor, norm: str | None = None) -> Tensor:
        x = normalize_input(x, self.cfg.input_norm if norm is None else norm)
        return self._timm_tokens(x) if self.is_timm else self._clip_tokens(x)

    def _clip_tokens(self, x: Tensor) -> Tensor:
        v = self.visual
        x = v.conv1(x)  # (B, W, g, g)
        g = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + resize_pos_embed(v.positional_embedding, g).to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        blocks = v.transformer.resblocks
        if self.cfg.feature_layer == -1:
            for blk in blocks:
                x = blk(x)
            x = v.ln_post(x)
        else:
            for blk in blocks[:-1]:
                x = blk(x)
        return x[:, 1:]  # drop the class token

    def _timm_tokens(self, x: Tensor) -> Tensor:
        t = self.visual.trunk
        x = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x))))
        blocks = t.blocks if self.cfg.feature_layer == -1 else t.blocks[:-1]
        for blk in blocks:
            x = blk(x)
        if self.cfg.feature_layer == -1:
            x = t.norm(x)
        return x[:, t.num_prefix_tokens :]


class SemanticTeacher(nn.Module):
    """A frozen copy of the pretrained tower producing the semantic targets (ref 1.3 "teacher target").

    It is built from the pretrained weights, never from a trained encoder, and is not part of a saved tokenizer.
    clipb: final tokens after ln_post times the CLIP projection (512-d) on CLIP-normalised input.
    """

    def __init__(
        self,
        cfg: SemanticEncoderConfig,
        *,
        pretrained: str | None = None,
        encoder: SemanticEncoder | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        if encoder is not None:  # copy an untrained encoder (tests, random init) instead of building twice
            self.encoder = copy.deepcopy(encoder)
        else:
            self.encoder = SemanticEncoder(cfg, pretrained=pretrained, keep_proj=True)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SemanticTeacher:
        return super().train(False)  # always frozen, always in eval mode

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        tokens = self.encoder(x, norm=self.cfg.teacher_norm)
        proj = getattr(self.encoder.visual, "proj", None)
        if self.cfg.teacher_proj:
            if proj is None:
                raise ValueError("teacher_proj=True but the tower has no projection")
            tokens = tokens @ proj
        return tokens
