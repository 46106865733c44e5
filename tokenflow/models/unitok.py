"""UniTok: a ViTamin encoder, attention projections, UniTok's multi-codebook quantizer, a ViTamin decoder (ref A1).

    x (B, 3, 256, 256) -> encoder: conv stem (stride 16) -> 31 GeGLU blocks -> LN      (B, 256, 1024) tokens
      -> quant_proj (AttnProjection 1024 -> 64)                                       (B, 256, 64)
      -> quantizer: 8 sub-codebooks x 4,096 codes of 8 dims (cosine, straight-through)
      -> post_quant_proj (AttnProjection 64 -> 1024) -> decoder: 31 GeGLU blocks -> LN
      -> reshape row-major to (B, 1024, 16, 16) -> conv upsampler x16 -> (B, 3, 256, 256), unclamped

An exact plain-PyTorch mirror of the released tokenizer (official `models/unitok.py` with `models/vitamin.py`,
`models/vqvae.py`, `models/quant.py`; pieces in `tokenflow.encoders.vitamin`). The module names are the official
ones, so converting the official `trainer.unitok` state dict is `"model." + key` for every tokenizer tensor, except
the codebooks: official `quantizer.codebooks.{k}.codebook.weight` (stored unnormalised, normalised at every use on
both sides) -> `model.quantizer.quantizer.codebooks.{k}.weight`. Not tokenizer weights, so dropped by the converter:
`encoder.pos_embed` (frozen zeros), `quant_proj.attn.zero_k_bias` / `post_quant_proj.attn.zero_k_bias` (zeros),
`quantizer.codebooks.{k}.vocab_usage` (usage statistics), and the CLIP branch (`text_encoder.*`, `fc_norm`,
`projection`, `logit_scale`).

Latent and token layout. Token t is grid position (t // g, t % g), row-major, on both sides (the official
`HybridEmbed` flattens the conv map with flatten(2).transpose(1, 2); its decoder reshapes back with
view(B, g, g, C)). The 64-d latent is split into contiguous chunks of 8: sub-codebook m reads channels
[8m, 8m + 8) (official `VectorQuantizerM.f_to_idx`: features.split(64 // 8, dim=-1), chunk m -> codebook m), which
is `QuantizerConfig.dims = (8,) * 8` here. The official indices are (B, M, T) = torch.stack(per-codebook (B, T),
dim=1); this project's are (B, T, M) with

    ours[b, t, m] == official[b, m, t]        i.e. ours = official.transpose(1, 2), official = ours.transpose(1, 2)

(a transpose, never a reshape: reshaping (B, 8, 256) to (B, 256, 8) scrambles the tokens).

Precision: as in the official training forward, the two projections run with autocast off (in the dtype of their
weights: fp32 unless the whole model was cast); the quantizer always runs in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenflow.config import TokenizerConfig
from tokenflow.encoders.vitamin import AttnProjection, ViTaminDecoder, ViTaminEncoder, init_vitamin_
from tokenflow.models.tokenflow import TokenizerOutput
from tokenflow.quantize import MultiScaleQuantizer


class UniTokModel(nn.Module):
    """Submodules `encoder`, `quant_proj`, `quantizer`, `post_quant_proj`, `decoder`, named as in the official
    `UniTok` (the quantizer is this project's `MultiScaleQuantizer` with one scale)."""

    def __init__(self, cfg: TokenizerConfig, *, pretrained: str | None = None):
        super().__init__()
        if pretrained is not None:
            raise ValueError(
                "the unitok preset has no separate pretrained encoder; load a converted tokenizer "
                "directory with Tokenizer.from_pretrained instead"
            )
        self.cfg = cfg
        u, code_dim = cfg.unitok, cfg.quantizer.code_dim
        self.encoder = ViTaminEncoder(
            width=u.width,
            depth=u.encoder_layers,
            heads=u.heads,
            mlp_ratio=u.mlp_ratio,
            stem_widths=u.stem_widths,
            stage_depths=u.stage_depths,
            expand_ratio=u.expand_ratio,
            pool_stride=u.pool_stride,
            drop_path_rate=u.drop_path,
        )
        self.quant_proj = AttnProjection(u.width, code_dim, u.proj_heads, u.proj_mlp_ratio)
        self.quantizer = MultiScaleQuantizer(cfg.quantizer)
        self.post_quant_proj = AttnProjection(code_dim, u.width, u.proj_heads, u.proj_mlp_ratio)
        self.decoder = ViTaminDecoder(
            width=u.width,
            depth=u.decoder_layers,
            heads=u.heads,
            mlp_ratio=u.mlp_ratio,
            up_widths=u.upsampler_widths,
            up_depths=u.upsampler_depths,
            expand_ratio=u.expand_ratio,
            first_scale=u.pool_stride,
            drop_path_rate=u.drop_path,
        )
        init_vitamin_(self.encoder, self.quant_proj, self.post_quant_proj, self.decoder)

    @property
    def last_layer(self) -> Tensor:
        """The final conv weight (`decoder.up_conv4.conv2.weight`), for the adaptive GAN weight."""
        return self.decoder.last_layer

    def encode_latent(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> the continuous latent (B, code_dim, g, g) before quantization, positions row-major."""
        h = self.encoder(x)  # (B, g*g, width)
        z = _project(self.quant_proj, h)  # (B, g*g, code_dim)
        b, n, c = z.shape
        g = self.cfg.grid
        if n != g * g:
            raise ValueError(f"the encoder made {n} tokens, expected a {g} x {g} grid")
        return z.transpose(1, 2).reshape(b, c, g, g)

    def decode_pixels(self, f: Tensor) -> Tensor:
        """Continuous code map (B, code_dim, g, g) -> raw reconstruction (B, 3, H, W), unclamped."""
        h = _project(self.post_quant_proj, f.flatten(2).transpose(1, 2))  # (B, g*g, width)
        return self.decoder(h)

    def decode_latent(self, f: Tensor) -> tuple[Tensor, None]:
        return self.decode_pixels(f), None

    def forward(self, x: Tensor) -> TokenizerOutput:
        quant = self.quantizer(self.encode_latent(x))
        return TokenizerOutput(self.decode_pixels(quant.quantized), None, quant)


def _project(proj: AttnProjection, x: Tensor) -> Tensor:
    """Run an attention projection with autocast off, in the dtype of its weights (official `UniTok.forward`)."""
    x = x.to(proj.proj.weight.dtype)
    if not torch.amp.is_autocast_available(x.device.type):  # the meta device (shape checks)
        return proj(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return proj(x)


__all__ = ["UniTokModel"]
