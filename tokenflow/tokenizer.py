"""`Tokenizer`: the user-facing image tokenizer (preprocess, encode, decode, features, save and load).

    tok = Tokenizer.from_preset("tiny")                       # or from_pretrained("s3://bucket/tokenizer")
    pixels = tok.preprocess([Image.open("cat.jpg")])          # (B, 3, H, W) in [-1, 1]
    ids = tok.encode(pixels)                                  # (B, T) scale-major, row-major; (B, T, M) for UniTok
    images = tok.decode(ids)                                  # (B, 3, H, W) in [0, 1]; any prefix of whole scales
    feats = tok.features(ids)                                 # (B, g*g, 40): what the understanding LLM reads

A saved tokenizer is a directory (local or any fsspec URI such as s3://) holding `config.json` (the full
`TokenizerConfig`) and `model.safetensors` (every weight; no pickle anywhere).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import fsspec
import torch
from PIL import Image
from torch import Tensor, nn

from tokenflow import safetensors_io
from tokenflow.codes import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    check_indices,
    check_state_dict,
    fingerprint_of,
    read_saved,
)
from tokenflow.codes import join as _join
from tokenflow.config import TokenizerConfig, preset
from tokenflow.encoders.semantic import SemanticTeacher
from tokenflow.image import Preprocess, to_tensor
from tokenflow.models import TokenFlowModel, TokenizerOutput, UniTokModel


class Tokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig, *, pretrained: str | None = None):
        """Build with random weights, except the semantic encoder when `pretrained` (an open_clip tag or a local
        checkpoint path) is given. Use `from_preset` / `from_pretrained` rather than calling this directly."""
        super().__init__()
        self.config = config
        model_cls = TokenFlowModel if config.kind == "tokenflow" else UniTokModel
        self.model = model_cls(config, pretrained=pretrained)
        self.preprocessor = preprocess_of(config)
        """The decode + resize + crop convention; the pretokenize pipeline uses this same object."""

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, *, pretrained: str | None = None) -> Tokenizer:
        """A preset (`tiny`, `clipb_224`, `clipb_256`, `siglip_384`, `unitok`, ...) with random weights, except
        the semantic encoder when `pretrained` names an open_clip tag (downloads when online) or a local file."""
        cfg = preset(name)
        cfg.semantic_encoder.pretrained = pretrained
        return cls(cfg, pretrained=pretrained)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        storage_options: dict | None = None,
    ) -> Tokenizer:
        """Load a directory written by `save_pretrained` (local path or fsspec URI; `storage_options` go to the
        filesystem, e.g. {"endpoint_url": ...} for an S3-compatible store). Fails, naming every offending
        tensor, when the weights do not match the config exactly."""
        path = os.fspath(path)
        config, state = read_saved(path, storage_options)
        with torch.device("meta"):  # no random init and no download: every weight comes from the file
            tok = cls(config, pretrained=None)
        check_state_dict(tok.state_dict(), state, source=_join(path, WEIGHTS_NAME))
        tok.load_state_dict(state, strict=True, assign=True)
        return tok.to(device).eval()

    def save_pretrained(
        self, path: str | os.PathLike, *, storage_options: dict | None = None, provenance: dict | None = None
    ) -> None:
        """Write `config.json` and `model.safetensors` to a local directory or fsspec URI. `provenance` (plain
        values, e.g. the official checkpoint a converted tokenizer came from) is recorded in `config.json`."""
        path, opts = os.fspath(path), storage_options or {}
        fs, root = fsspec.core.url_to_fs(path, **opts)
        fs.makedirs(root, exist_ok=True)
        state = self.state_dict()  # the writer moves one tensor at a time to the CPU
        payload = {"format_version": FORMAT_VERSION, "config": self.config.to_dict()}
        if provenance:
            payload["provenance"] = provenance
        # weights first, config last: a directory with a config.json is complete
        with fs.open(_join(root, WEIGHTS_NAME), "wb") as fh:
            safetensors_io.write(fh, state, metadata={"format": "pt", "tokenflow_format": str(FORMAT_VERSION)})
        with fs.open(_join(root, CONFIG_NAME), "w") as fh:
            json.dump(payload, fh, indent=2)

    def fingerprint(self) -> str:
        """A short id of this exact tokenizer: sha256 over its config and every weight (names, dtypes, shapes,
        bytes). Token shards record it so consumers can check they decode with the tokenizer that made them."""
        return fingerprint_of(self.config, self.state_dict())

    def make_teacher(self) -> SemanticTeacher:
        """The frozen semantic teacher for training, from the pretrained weights named in the config (a random
        copy of the current encoder when there are none)."""
        if self.config.kind != "tokenflow":
            raise ValueError("only TokenFlow tokenizers have a semantic teacher")
        cfg = self.config.semantic_encoder
        if cfg.pretrained is None:
            return SemanticTeacher(cfg, encoder=_with_proj(self.model.semantic_encoder))
        return SemanticTeacher(cfg, pretrained=cfg.pretrained)

    # ---- properties ---------------------------------------------------------------------------------------------

    @property
    def scales(self) -> tuple[int, ...]:
        return self.config.quantizer.scales

    @property
    def tokens_per_image(self) -> int:
        return self.config.quantizer.tokens_per_image

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def num_codebooks(self) -> int:
        return self.config.quantizer.num_codebooks

    @property
    def code_dim(self) -> int:
        return self.config.quantizer.code_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- the API ------------------------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image | bytes | str]) -> Tensor:
        """PIL images (any mode, EXIF-rotated), encoded bytes or paths -> (B, 3, S, S) float32 in [-1, 1],
        resized and cropped with this tokenizer's convention."""
        return to_tensor([self.preprocessor.load(im)[0] for im in images])

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> indices (B, T) (shared mapping) or (B, T, M) (multi-codebook), all scales,
        scale-major and row-major within a scale. Scale drop never applies here."""
        self._check_pixels(pixels)
        h = self.model.encode_latent(pixels.to(self.device))
        return self.model.quantizer(h, drop_scales=False).indices

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """Indices of any prefix of whole scales -> images (B, 3, S, S) in [0, 1]."""
        f = self.model.quantizer.features(self._check_indices(indices))
        return ((self.model.decode_pixels(f) + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def features(self, indices: Tensor) -> Tensor:
        """The continuous code features (B, g*g, code_dim): every scale's normalised codes bicubic-upsampled to
        the final grid and summed, positions row-major. A pure function of the indices and the codebooks."""
        f = self.model.quantizer.features(self._check_indices(indices))
        return f.flatten(2).transpose(1, 2)

    def forward(self, pixels: Tensor) -> TokenizerOutput:
        """Training forward: reconstruction, decoded semantic features, quantizer output with losses."""
        return self.model(pixels)

    def _check_pixels(self, pixels: Tensor) -> None:
        s = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (s, s):
            raise ValueError(f"expected pixels of shape (B, 3, {s}, {s}), got {tuple(pixels.shape)}")

    def _check_indices(self, indices: Tensor) -> Tensor:
        return check_indices(indices, self.config, self.device)


def preprocess_of(config: TokenizerConfig) -> Preprocess:
    """The input convention of a tokenizer config (no weights needed)."""
    pp = config.preprocess
    return Preprocess(size=config.image_size, mode=pp.mode, resize_to=pp.resize_to, draft=pp.draft)


def _with_proj(encoder):
    """The encoder with its projection restored (random), for a teacher of a randomly initialised model."""
    import copy

    enc = copy.deepcopy(encoder)
    visual = enc.visual
    if not hasattr(visual, "trunk") and visual.proj is None:
        cfg = enc.cfg
        visual.proj = nn.Parameter(cfg.width**-0.5 * torch.randn(cfg.width, cfg.output_dim))
    return enc
