"""The tokenize stage: a callable class for a Ray Data actor pool, holding one `tokenflow.Tokenizer`.

Reads the `pixels` column (uint8 S x S x 3 bytes, null for rejected rows and text-only llava conversations) and
writes `tokens` (the flattened scale-major indices as bytes of `token_dtype`, null where `pixels` is: the model never
sees those rows); drops `pixels`. On a GPU (precision
"auto") the model runs in bf16 except the quantizer, which always runs in fp32 (a bf16 argmin flips tokens);
precision "fp32" on a GPU turns TF32 off, so its tokens are the CPU's up to near-ties.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pyarrow as pa
import torch

from pipelines.cpu_allocator import keep_large_buffers
from tokenflow import Tokenizer
from tokenflow.config import PRESETS


def load_tokenizer(spec: str, *, storage_options: dict | None = None) -> Tokenizer:
    """`preset:NAME` (random weights, for smoke tests) or a saved tokenizer directory (path or URI)."""
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} in --tokenizer {spec}; known: {sorted(PRESETS)}")
        warnings.warn(
            f"--tokenizer {spec}: RANDOMLY INITIALISED weights (seed 0). The tokens are meaningless; use a trained "
            "tokenizer directory for real data.",
            stacklevel=2,
        )
        torch.manual_seed(0)
        return Tokenizer.from_preset(name).eval()
    return Tokenizer.from_pretrained(spec, storage_options=storage_options).eval()


def token_dtype(codebook_size: int) -> np.dtype:
    """uint16 when every index fits (K <= 65,536), else int32."""
    return np.dtype(np.uint16) if codebook_size <= 65_536 else np.dtype(np.int32)


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA when this actor was given a GPU, else CPU; anything else as named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pixels_to_tensor(pixels: list[bytes], size: int, device: torch.device) -> torch.Tensor:
    """Stage-column pixels (uint8 size x size x 3 bytes each) -> float32 (B, 3, size, size) in [0, 1]."""
    arr = np.stack([np.frombuffer(p, dtype=np.uint8) for p in pixels]).reshape(len(pixels), size, size, 3)
    # contiguous NCHW like tokenflow.image.to_tensor: a channels-last view selects other conv kernels, whose bf16
    # rounding flipped 17% of a tiny model's tokens against the same values in NCHW
    return torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).contiguous().float().div(255.0)


class TokenizeStage:
    """Ray Data actor: pixels -> tokens for a batch (dict of numpy arrays)."""

    def __init__(
        self,
        tokenizer: str,
        *,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        storage_options: dict | None = None,
    ):
        self.device = resolve_device(device)
        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        if self.device.type == "cpu":
            # the actor owns its process: keep the forward's freed activation buffers in the heap (with
            # CPU_WORKER_ENV, which the job gives CPU tokenize actors; Ray calls the actor in a thread of its own)
            keep_large_buffers()
            if threads:
                # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1); a model-bound CPU stage wants the node's cores
                torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        if self.device.type == "cuda" and not self.bf16:
            # fp32 on a GPU means fp32: cuDNN runs fp32 convolutions in TF32 by default (a 10-bit mantissa),
            # far coarser than the 1e-5 near-tie margin of token parity. The actor owns its process.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.tok = load_tokenizer(tokenizer, storage_options=storage_options).to(self.device)
        if self.bf16:
            self.tok.model.to(torch.bfloat16)
            self.tok.model.quantizer.float()  # codebooks stay fp32; the quantizer casts its input to fp32 too
        self.size = self.tok.config.image_size
        self.dtype = token_dtype(self.tok.codebook_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels = batch["pixels"].to_pylist()
        tokens: list[bytes | None] = [None] * len(pixels)
        keep = [i for i, p in enumerate(pixels) if p is not None]
        if keep:
            x = pixels_to_tensor([pixels[i] for i in keep], self.size, self.device)
            x = x.mul(2.0).sub(1.0)  # the same arithmetic as tokenflow.image.to_tensor
            if self.bf16:
                x = x.to(torch.bfloat16)
            ids = self.tok.encode(x).reshape(len(keep), -1).cpu().numpy().astype(self.dtype)
            for j, i in enumerate(keep):
                tokens[i] = ids[j].tobytes()
        batch = batch.drop_columns(["pixels"])
        return batch.append_column("tokens", pa.array(tokens, pa.binary()))
