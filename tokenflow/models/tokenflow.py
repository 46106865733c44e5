"""TokenFlow: a semantic ViT branch and a pixel CNN branch quantized over one index space (ref 1.1).

x in [-1, 1] -> semantic encoder -> encode task MLP -> 32-d g x g ┐
             -> pixel encoder -> quant_conv -> 8-d g x g          ┴ concat 40-d -> multi-scale quantizer -> f
f[:32] -> semantic decoder -> decode task MLP -> semantic features (regressed onto the frozen teacher)
f[32:] -> post_quant_conv -> pixel decoder -> reconstruction
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenflow.config import TokenizerConfig
from tokenflow.encoders.pixel import PixelDecoder, PixelEncoder
from tokenflow.encoders.semantic import SemanticEncoder
from tokenflow.encoders.vit import SemanticDecoder, task_mlp
from tokenflow.quantize import MultiScaleOutput, MultiScaleQuantizer


@dataclass
class TokenizerOutput:
    reconstruction: Tensor
    """(B, 3, H, W), unbounded (the official code clamps only when saving)."""
    semantic: Tensor | None
    """(B, g*g, teacher_dim) decoded semantic features; None for models without a semantic branch."""
    quant: MultiScaleOutput


class TokenFlowModel(nn.Module):
    def __init__(self, cfg: TokenizerConfig, *, pretrained: str | None = None):
        super().__init__()
        self.cfg = cfg
        sem_dim, pix_dim = cfg.quantizer.dims
        self.semantic_encoder = SemanticEncoder(cfg.semantic_encoder, pretrained=pretrained)
        self.encode_task_layer = task_mlp(cfg.semantic_encoder.width, sem_dim)
        self.pixel_encoder = PixelEncoder(cfg.pixel_encoder)
        self.quant_conv = nn.Conv2d(cfg.pixel_encoder.z_channels, pix_dim, 1)
        self.quantizer = MultiScaleQuantizer(cfg.quantizer)
        self.semantic_decoder = SemanticDecoder(cfg.semantic_decoder, sem_dim)
        self.decode_task_layer = task_mlp(cfg.semantic_decoder.width, cfg.semantic_encoder.teacher_dim)
        self.post_quant_conv = nn.Conv2d(pix_dim, cfg.pixel_decoder.z_channels, 1)
        self.pixel_decoder = PixelDecoder(cfg.pixel_decoder)

    @property
    def last_layer(self) -> Tensor:
        return self.pixel_decoder.last_layer

    def encode_latent(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> the continuous 40-d map h (B, 40, g, g) before quantization."""
        g = self.cfg.grid
        sem = self.encode_task_layer(self.semantic_encoder(x))  # (B, g*g, 32)
        sem = sem.transpose(1, 2).reshape(x.shape[0], -1, g, g)
        size = self.cfg.pixel_input_size
        xp = x if size is None else F.interpolate(x, size=(size, size), mode="bicubic")
        pix = self.quant_conv(self.pixel_encoder(xp))  # (B, 8, g, g)
        return torch.cat([sem, pix.to(sem.dtype)], dim=1)

    def decode_latent(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """Continuous code map (B, 40, g, g) -> (reconstruction (B, 3, H, W), semantic (B, g*g, teacher_dim))."""
        return self.decode_pixels(f), self.decode_semantic(f)

    def decode_semantic(self, f: Tensor) -> Tensor:
        sem_dim = self.cfg.quantizer.dims[0]
        return self.decode_task_layer(self.semantic_decoder(f[:, :sem_dim]))

    def decode_pixels(self, f: Tensor) -> Tensor:
        """The pixel branch only: all that decoding indices to images needs."""
        sem_dim = self.cfg.quantizer.dims[0]
        image = self.pixel_decoder(self.post_quant_conv(f[:, sem_dim:]))
        if self.cfg.pixel_input_size is not None:
            size = self.cfg.image_size
            image = F.interpolate(image, size=(size, size), mode="bicubic")
        return image

    def forward(self, x: Tensor) -> TokenizerOutput:
        quant = self.quantizer(self.encode_latent(x))
        image, semantic = self.decode_latent(quant.quantized)
        return TokenizerOutput(image, semantic, quant)
