"""The attention mask of the text-to-image model (shared/reference/tokenflow.md §4.4).

A training sequence is `[PAD]* BOS caption <img> x_0 .. x_{T-1} </img> EOS`, the text left-padded to a fixed
length, so the image starts at the same index `image_start` in every row. The image position p (0 <= p < T)
holds the input that predicts image token p + 1; the position before the image (the last token of `<img>`)
predicts token 0. So the T positions `image_start - 1 .. image_start + T - 2` form the image block, each labelled
with the scale of the token it predicts. The rule:

- causal everywhere, except inside the image block, where query q may attend key k iff scale(q) >= scale(k):
  causal across scales, bidirectional within one (a scale's tokens are predicted together);
- the image block sees the whole text prefix; `</img>` and EOS see everything before them;
- padding is masked as keys, by position (`key_valid`), never by token id. A padding query attends only itself, so
  no row is empty (an empty row is NaN under SDPA); its output is never supervised.

The rule is one `mask_mod(b, h, q, kv)` function: broadcast over index grids it gives the dense 4-D boolean mask
for SDPA (`dense_mask`), and FlexAttention's `create_block_mask` takes the same function on GPU. Eager attention
must never get this mask: it adds a boolean mask as 1/0 instead of masking (shared/reference/llm.md §1.2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def scale_index(scales: Sequence[int]) -> Tensor:
    """(T,) long: the 0-based scale of each image token, scale-major (T = sum of s^2)."""
    if not scales or any(s < 1 for s in scales):
        raise ValueError(f"scales must be positive side lengths, got {tuple(scales)}")
    return torch.tensor([k for k, s in enumerate(scales) for _ in range(s * s)], dtype=torch.long)


def t2i_mask_mod(key_valid: Tensor, image_start: int, scales: Sequence[int]) -> MaskMod:
    """The rule above as `mask_mod(b, h, q, kv) -> bool` for sequences of length L = key_valid.shape[1].

    key_valid: (B, L) bool, False at padding. image_start: index of the first image position (>= 1)."""
    if key_valid.ndim != 2 or key_valid.dtype != torch.bool:
        raise ValueError(f"key_valid must be a (B, L) bool tensor, got {tuple(key_valid.shape)} {key_valid.dtype}")
    level = scale_index(scales).to(key_valid.device)
    length, start = key_valid.shape[1], image_start - 1
    if image_start < 1 or start + level.numel() > length:
        raise ValueError(
            f"an image block of {level.numel()} positions from index {start} does not fit sequences of {length}"
        )
    # the scale each position predicts, -1 outside the image block
    predicts = torch.full((length,), -1, dtype=torch.long, device=key_valid.device)
    predicts[start : start + level.numel()] = level

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        lq, lk = predicts[q], predicts[kv]
        allowed = torch.where((lq >= 0) & (lk >= 0), lq >= lk, kv <= q)
        return (allowed & key_valid[b, kv]) | (q == kv)

    return mask_mod


def dense_mask(
    mask_mod: MaskMod, batch: int, length: int, device: torch.device | str = "cpu", first_row: int = 0
) -> Tensor:
    """(B, 1, length - first_row, length) bool, True = may attend: the rows of queries first_row .. length - 1
    against keys 0 .. length - 1. The whole square is the training mask; a block of rows is the mask of one
    cached step (its queries against the cache and themselves). Transformers and SDPA take it as is."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    q = torch.arange(first_row, length, device=device).view(1, 1, -1, 1)
    kv = torch.arange(length, device=device).view(1, 1, 1, -1)
    return mask_mod(b, torch.zeros_like(b), q, kv).expand(batch, 1, length - first_row, length)


def t2i_attention_mask(key_valid: Tensor, image_start: int, scales: Sequence[int]) -> Tensor:
    """The dense training mask: (B, 1, L, L) bool for `key_valid` (B, L)."""
    batch, length = key_valid.shape
    return dense_mask(t2i_mask_mod(key_valid, image_start, scales), batch, length, key_valid.device)
