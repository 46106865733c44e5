"""`CodeFeatures`: the part of a saved image tokenizer that the LLMs read, its multi-scale quantizer (the codebooks),
loaded without the encoders and decoders.

    codes = CodeFeatures.from_pretrained("s3://bucket/tokenizer")   # or CodeFeatures.of(tokenizer)
    feats = codes.features(ids)          # (B, g*g, 40): equal to Tokenizer.features(ids)
    codes.fingerprint()                  # equal to Tokenizer.fingerprint() of the same directory

The training workers of the LLMs hold this rather than the whole tokenizer: no vision tower or pixel decoder in
memory (TokenFlow-XL's SigLIP tower alone is 0.4 B parameters) and no open_clip import. The fingerprint hashes the
whole saved tokenizer, as `Tokenizer.fingerprint` does, so token shards are still checked against it.
This module also reads the saved format (`read_saved`), checks weights against a config (`check_state_dict`)
and hashes them (`fingerprint_of`) for `Tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os

import fsspec
import torch
from torch import Tensor, nn

from tokenflow import safetensors_io
from tokenflow.config import TokenizerConfig
from tokenflow.quantize import MultiScaleQuantizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
QUANTIZER_PREFIX = "model.quantizer."


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def read_saved(path: str, storage_options: dict | None = None) -> tuple[TokenizerConfig, dict[str, Tensor]]:
    """The config and every weight of a directory written by `Tokenizer.save_pretrained` (local or fsspec URI)."""
    opts = storage_options or {}
    with fsspec.open(join(path, CONFIG_NAME), "r", **opts) as fh:
        data = json.load(fh)
    if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer tokenflow (format {data['format_version']})")
    config = TokenizerConfig.from_dict(data["config"])
    with fsspec.open(join(path, WEIGHTS_NAME), "rb", **opts) as fh:
        state = safetensors_io.read(fh)
    return config, state


def fingerprint_of(config: TokenizerConfig, state: dict[str, Tensor]) -> str:
    """A short id of one exact tokenizer: sha256 over its config and every weight (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def check_indices(indices: Tensor, config: TokenizerConfig, device: torch.device) -> Tensor:
    """`indices` as a long tensor on `device`, after checking their layout and range against `config`."""
    q = config.quantizer
    want = 2 if q.num_codebooks == 1 else 3
    if indices.ndim != want or (want == 3 and indices.shape[-1] != q.num_codebooks):
        layout = "(B, T)" if want == 2 else f"(B, T, {q.num_codebooks})"
        raise ValueError(f"expected indices of shape {layout}, got {tuple(indices.shape)}")
    if indices.is_floating_point():
        raise TypeError("indices must be an integer tensor")
    if indices.numel() and (indices.min() < 0 or indices.max() >= q.codebook_size):
        raise ValueError(f"indices out of range [0, {q.codebook_size})")
    return indices.to(device, torch.long)


def check_state_dict(expected: dict[str, Tensor], found: dict[str, Tensor], *, source: str) -> None:
    """Fail, naming every offending tensor, unless `found` has exactly the keys and shapes of `expected`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if found[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong))
        if missing:
            parts.append(f"missing: {missing}")
        if unexpected:
            parts.append(f"unexpected: {unexpected}")
        raise ValueError(f"{source} does not match its config: " + " | ".join(parts))


class CodeFeatures(nn.Module):
    """A tokenizer's quantizer with its config and fingerprint. Build it with `from_pretrained` or `of`."""

    def __init__(self, config: TokenizerConfig, quantizer: MultiScaleQuantizer, fingerprint: str):
        super().__init__()
        self.config = config
        self.quantizer = quantizer
        self._fingerprint = fingerprint

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", storage_options: dict | None = None
    ) -> CodeFeatures:
        """The quantizer of a saved tokenizer (local path or fsspec URI); the rest of its weights are read only
        to compute the fingerprint."""
        path = os.fspath(path)
        config, state = read_saved(path, storage_options)
        fingerprint = fingerprint_of(config, state)
        weights = {k: v for k, v in state.items() if k.startswith(QUANTIZER_PREFIX)}
        del state
        with torch.device("meta"):
            quantizer = MultiScaleQuantizer(config.quantizer)
        expected = {QUANTIZER_PREFIX + k: v for k, v in quantizer.state_dict().items()}
        check_state_dict(expected, weights, source=join(path, WEIGHTS_NAME))
        quantizer.load_state_dict({k[len(QUANTIZER_PREFIX) :]: v for k, v in weights.items()}, assign=True)
        return cls(config, quantizer.to(device).eval(), fingerprint)

    @classmethod
    def of(cls, tokenizer) -> CodeFeatures:
        """The codes of a `Tokenizer` already in memory (sharing its quantizer)."""
        return cls(tokenizer.config, tokenizer.model.quantizer, tokenizer.fingerprint())

    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def scales(self) -> tuple[int, ...]:
        return self.config.quantizer.scales

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def code_dim(self) -> int:
        return self.config.quantizer.code_dim

    @torch.no_grad()
    def features(self, indices: Tensor) -> Tensor:
        """(B, T) indices -> (B, g*g, code_dim), exactly `Tokenizer.features`."""
        device = next(self.quantizer.parameters()).device
        f = self.quantizer.features(check_indices(indices, self.config, device))
        return f.flatten(2).transpose(1, 2)
