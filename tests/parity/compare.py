"""Token parity under the near-tie rule (shared/reference/tokenflow.md §8).

Distances are only reproducible to about 1e-6 across implementations (summation order, SDPA vs explicit
softmax, batch size), so a best and second-best code closer than that can legitimately swap. One swap then
changes the residual of every later scale. The fair comparison, per image: walk the scales coarse to fine with
the official tokens; scales before the first difference must be identical; in the first differing scale every
differing token must be a near-tie (its two candidates' distances within `tol`); later scales are not compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenflow.quantize import resize


@torch.no_grad()
def compare_tokens(tok, pixels: Tensor, official: Tensor, *, tol: float = 1e-5) -> dict:
    """Compare `tok`'s encoding of `pixels` (B, 3, S, S) with `official` tokens ((B, T) or (B, T, M)).

    Returns `agreement` (identical / compared tokens), `compared`, `identical`, `per_image` (index of the
    first differing scale or None), `near_ties_ok` (every difference is a near-tie), `max_gap` (largest
    distance gap among differing tokens, 0.0 when none) and `differing` (count)."""
    msq = tok.model.quantizer
    quantizer = msq.quantizer
    books = quantizer.normalized_codebooks()
    official = official.to(torch.long)
    compared = identical = differing = 0
    per_image, max_gap, ok = [], 0.0, True
    for i in range(pixels.shape[0]):
        h = tok.model.encode_latent(pixels[i : i + 1].to(tok.device)).float()
        g = msq.grid
        residual = h
        first_diff = None
        for k, (s, want) in enumerate(zip(msq.scales, msq.split_scales(official[i : i + 1]))):
            z = resize(residual, s, "area").permute(0, 2, 3, 1).reshape(s * s, -1)
            got = quantizer.lookup(z).view(want.shape)
            same = got == want
            compared += same.numel()
            identical += int(same.sum())
            if not bool(same.all()):
                first_diff = k
                gaps = _distance_gaps(quantizer, books, z, got[0], want[0], ~same[0])
                differing += int((~same).sum())
                max_gap = max(max_gap, float(gaps.max()))
                ok = ok and bool((gaps <= tol).all())
                break
            codes = quantizer.embed(want)  # (1, s*s, C): continue on the official codes
            residual = residual - resize(codes.transpose(1, 2).reshape(1, -1, s, s), g, "bicubic")
        per_image.append(first_diff)
    return {
        "agreement": identical / max(compared, 1),
        "compared": compared,
        "identical": identical,
        "differing": differing,
        "per_image": per_image,
        "near_ties_ok": ok,
        "max_gap": max_gap,
    }


def _distance_gaps(quantizer, books, z: Tensor, got: Tensor, want: Tensor, mask: Tensor) -> Tensor:
    """|d(z, e_got) - d(z, e_want)| for the differing positions (shared: the weighted sum over parts; multi:
    per sub-codebook)."""
    parts = [F.normalize(p.float(), dim=-1) for p in z.split(quantizer.dims, dim=-1)]
    if quantizer.cfg.kind == "shared":
        rows = mask.nonzero().squeeze(1)

        def dist(idx: Tensor) -> Tensor:
            terms = zip(quantizer.part_weights, parts, books)
            return sum(w * (p[rows] - b[idx[rows]]).pow(2).sum(-1) for w, p, b in terms)

        return (dist(got) - dist(want)).abs()
    gaps = []
    for m, (p, b) in enumerate(zip(parts, books)):
        rows = mask[:, m].nonzero().squeeze(1)
        d_got = (p[rows] - b[got[rows, m]]).pow(2).sum(-1)
        d_want = (p[rows] - b[want[rows, m]]).pow(2).sum(-1)
        gaps.append((d_got - d_want).abs())
    return torch.cat(gaps)
