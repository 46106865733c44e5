"""UniTok: a ViT encoder, UniTok's multi-codebook quantizer, and a ViT decoder (ref A1).

    x -> patch embed (stride p) -> encoder blocks -> LN -> quant_proj (width -> 64)
      -> 8 sub-codebooks x 4,096 codes of 8 dims (cosine, straight-through)
      -> post_quant_proj (64 -> width) -> decoder blocks -> LN -> linear unpatchify to pixels

The quantizer and the token layout are UniTok's exactly ((B, T, M) = the transpose of the official (B, M, T)).
The encoder and decoder are plain pre-norm ViTs without position embeddings, as UniTok's are (positions come
from the patch convolution); the released checkpoint's ViTamin-L hybrid stem, GeGLU MLPs, attention
projections and conv upsampler are not reproduced here yet, so released UniTok weights do not load into this
preset until its converter exists.
"""

from __future__ import annotations

from torch import Tensor, nn

from tokenflow.config import TokenizerConfig
from tokenflow.encoders.vit import Block, init_vit_
from tokenflow.models.tokenflow import TokenizerOutput
from tokenflow.quantize import MultiScaleQuantizer


class UniTokModel(nn.Module):
    def __init__(self, cfg: TokenizerConfig, *, pretrained: str | None = None):
        super().__init__()
        if pretrained is not None:
            raise ValueError(
                "the unitok preset has no separate pretrained encoder; load a converted tokenizer "
                "directory with Tokenizer.from_pretrained instead"
            )
        self.cfg = cfg
        u, code_dim = cfg.unitok, cfg.quantizer.code_dim
        self.patch_embed = nn.Conv2d(3, u.width, u.patch_size, stride=u.patch_size)
        self.encoder = nn.ModuleList(Block(u.width, u.heads, u.mlp_ratio) for _ in range(u.encoder_layers))
        self.encoder_norm = nn.LayerNorm(u.width, eps=1e-6)
        self.quant_proj = nn.Linear(u.width, code_dim)
        self.quantizer = MultiScaleQuantizer(cfg.quantizer)
        self.post_quant_proj = nn.Linear(code_dim, u.width)
        self.decoder = nn.ModuleList(Block(u.width, u.heads, u.mlp_ratio) for _ in range(u.decoder_layers))
        self.decoder_norm = nn.LayerNorm(u.width, eps=1e-6)
        self.to_pixels = nn.Linear(u.width, 3 * u.patch_size**2)
        init_vit_(self.encoder, self.encoder_norm, self.quant_proj)
        init_vit_(self.decoder, self.decoder_norm, self.post_quant_proj, self.to_pixels)

    @property
    def last_layer(self) -> Tensor:
        return self.to_pixels.weight

    def encode_latent(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, code_dim, g, g)."""
        h = self.patch_embed(x)  # (B, W, g, g)
        b, _, g, _ = h.shape
        h = h.flatten(2).transpose(1, 2)  # (B, g*g, W), row-major
        for blk in self.encoder:
            h = blk(h)
        z = self.quant_proj(self.encoder_norm(h))  # (B, g*g, 64)
        return z.transpose(1, 2).reshape(b, -1, g, g)

    def decode_pixels(self, f: Tensor) -> Tensor:
        b, _, g, _ = f.shape
        p = self.cfg.unitok.patch_size
        h = self.post_quant_proj(f.flatten(2).transpose(1, 2))
        for blk in self.decoder:
            h = blk(h)
        patches = self.to_pixels(self.decoder_norm(h))  # (B, g*g, 3*p*p)
        patches = patches.view(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(b, 3, g * p, g * p)

    def decode_latent(self, f: Tensor) -> tuple[Tensor, None]:
        return self.decode_pixels(f), None

    def forward(self, x: Tensor) -> TokenizerOutput:
        quant = self.quantizer(self.encode_latent(x))
        return TokenizerOutput(self.decode_pixels(quant.quantized), None, quant)


__all__ = ["UniTokModel"]
