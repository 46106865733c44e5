"""Exact codebook statistics that merge by addition.

The official code estimates usage from a per-GPU FIFO of recent indices, which is biased for large codebooks
(ref 3). Here the state is an exact count of every code per scale (and per sub-codebook for UniTok); counts
from different steps or workers merge by adding the tensors (`merge`, or an all-reduce SUM of `counts`), and
every statistic is a function of the counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CodebookStats:
    counts: Tensor
    """(S, M, K) int64: how often each code of each (sub-)codebook was chosen at each scale."""
    scales: tuple[int, ...]

    @classmethod
    def empty(cls, scales: Sequence[int], codebook_size: int, num_codebooks: int = 1) -> CodebookStats:
        return cls(torch.zeros(len(scales), num_codebooks, codebook_size, dtype=torch.long), tuple(scales))

    @property
    def codebook_size(self) -> int:
        return self.counts.shape[-1]

    def update(self, per_scale_indices: Sequence[Tensor], scales: Sequence[int] | None = None) -> CodebookStats:
        """Add one batch: per_scale_indices[i] holds scale `scales[i]`'s indices, (B, s*s) or (B, s*s, M).
        `scales` defaults to all scales; pass the used ones when a scale was dropped in training."""
        scales = tuple(self.scales if scales is None else scales)
        if len(scales) != len(per_scale_indices):
            raise ValueError(f"{len(per_scale_indices)} index maps for {len(scales)} scales")
        k, m = self.codebook_size, self.counts.shape[1]
        for s, idx in zip(scales, per_scale_indices):
            row = self.scales.index(s)
            idx = idx.detach().to("cpu", torch.long).reshape(-1, m)  # (N, M)
            if idx.numel() and (idx.min() < 0 or idx.max() >= k):
                raise ValueError(f"indices out of range [0, {k})")
            offsets = torch.arange(m) * k
            self.counts[row] += torch.bincount((idx + offsets).reshape(-1), minlength=m * k).view(m, k)
        return self

    def merge(self, other: CodebookStats) -> CodebookStats:
        """Counts of both, as if one had seen all the data."""
        if other.scales != self.scales or other.counts.shape != self.counts.shape:
            raise ValueError("cannot merge statistics of different scales or codebook shapes")
        return CodebookStats(self.counts + other.counts, self.scales)

    __add__ = merge

    # ---- statistics: (S, M) tensors per scale, or pooled over all scales with all_scales=True ------------------

    def _counts(self, all_scales: bool) -> Tensor:
        return self.counts.sum(0, keepdim=True) if all_scales else self.counts

    def used(self, all_scales: bool = False) -> Tensor:
        """Number of distinct codes chosen at least once."""
        return (self._counts(all_scales) > 0).sum(-1)

    def usage(self, all_scales: bool = False) -> Tensor:
        """Fraction of the codebook chosen at least once."""
        return self.used(all_scales).double() / self.codebook_size

    def dead(self, all_scales: bool = False) -> Tensor:
        """Number of codes never chosen."""
        return self.codebook_size - self.used(all_scales)

    def entropy(self, all_scales: bool = False) -> Tensor:
        """Entropy (nats) of the empirical code distribution; 0 where nothing was counted."""
        c = self._counts(all_scales).double()
        total = c.sum(-1, keepdim=True)
        p = c / total.clamp(min=1)
        return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)

    def perplexity(self, all_scales: bool = False) -> Tensor:
        """exp(entropy): the effective number of codes in use (K for uniform use, 1 for a single code)."""
        return self.entropy(all_scales).exp()

    def summary(self) -> dict[str, float]:
        """Flat metrics for logging: per scale `usage/s{side}`, `perplexity/s{side}`, `dead/s{side}`, and pooled."""
        out: dict[str, float] = {}
        for name, fn in (("usage", self.usage), ("perplexity", self.perplexity), ("dead", self.dead)):
            per_scale, pooled = fn(), fn(all_scales=True)
            for i, s in enumerate(self.scales):
                out[f"{name}/s{s}"] = float(per_scale[i].double().mean())
            out[f"{name}/all"] = float(pooled[0].double().mean())
        return out
