"""Quantizers: TokenFlow's dual codebook with shared mapping, UniTok's multi-codebook, and the multi-scale loop.

Both quantizers are cosine quantizers over groups of channels: the input's channels are split into parts, each
part and each codebook row is l2-normalised, and the code is chosen by inner product.

- shared mapping (TokenFlow, ref 1.6): two tables (semantic 32-d, pixel 8-d) over ONE index space;
  index = argmin_i d_sem,i + w * d_pix,i on normalised halves. Since d = |a - b|^2 = 2 - 2 cos for unit
  vectors, that is argmax_i cos_sem,i + w * cos_pix,i = argmax_i <[z_sem ; w z_pix], [e_sem,i ; e_pix,i]>:
  ONE inner-product search on concatenated vectors, done in row blocks so memory stays bounded.
- multi-codebook (UniTok, ref A1.4): M tables, one independent index per table.

The multi-scale residual loop (ref 1.7) quantizes area-downsampled residuals coarse to fine and accumulates
bicubic upsamples at the final grid. Token layout: scale-major, each scale's map row-major.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenflow.config import QuantizerConfig

# --------------------------------------------------------------------------------------------------------------
# the nearest-code search


@torch.no_grad()
def nearest_codes(query: Tensor, keys: Tensor, block: int = 1 << 21) -> Tensor:
    """Index of the largest inner product: argmax_k <query[n], keys[k]> for every row n.

    query: (N, D), keys: (K, D). Scores are computed for block // K rows at a time into one reused buffer, so
    extra memory is about `block` floats whatever N is, and no N x K matrix or one-hot is ever built. Ties go
    to the lowest index, as torch.argmin does in the explicit formula.
    """
    n, k = query.shape[0], keys.shape[0]
    out = torch.empty(n, dtype=torch.long, device=query.device)
    if n == 0:
        return out
    keys_t = keys.t().contiguous()  # (D, K): one transpose, reused by every block
    rows = max(1, min(block // k, n))
    buf = torch.empty(rows, k, dtype=query.dtype, device=query.device)
    group = _argmax_group(k) if query.device.type == "cpu" else 0
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        scores = buf[: stop - start]
        torch.mm(query[start:stop], keys_t, out=scores)  # (rows, K)
        out[start:stop] = _row_argmax(scores, group)
    return out


def _argmax_group(k: int) -> int:
    """A group width dividing K for the two-level argmax, or 0 for plain argmax."""
    return next((g for g in (256, 128, 64, 32, 16) if k % g == 0 and k // g >= 2), 0)


def _row_argmax(scores: Tensor, group: int) -> Tensor:
    """argmax over dim 1 with torch.argmax's tie rule (first maximum). On CPU torch.argmax is ~20x slower
    than the vectorised amax, so with `group` > 0: the max of each group of `group` columns, the first group
    holding the row max, then the first maximum inside that group. The first group reaching the max contains
    the first column reaching it, so the result is identical to torch.argmax."""
    if not group:
        return scores.argmax(dim=1)
    r, k = scores.shape
    grouped = scores.view(r, k // group, group)
    best_group = grouped.amax(dim=2).argmax(dim=1)  # (rows,)
    inside = grouped[torch.arange(r, device=scores.device), best_group].argmax(dim=1)  # (rows,)
    return best_group * group + inside


def explicit_shared_mapping(
    z_sem: Tensor, z_pix: Tensor, e_sem: Tensor, e_pix: Tensor, pixel_weight: float = 1.0
) -> Tensor:
    """The official formula, written out: two full N x K squared-distance matrices on l2-normalised vectors,
    argmin of d_sem + w * d_pix. Memory O(N K); kept as the reference the fast path is tested against."""
    z_sem, z_pix = F.normalize(z_sem, dim=-1), F.normalize(z_pix, dim=-1)
    e_sem, e_pix = F.normalize(e_sem, dim=-1), F.normalize(e_pix, dim=-1)
    d_sem = (z_sem**2).sum(1, keepdim=True) + (e_sem**2).sum(1) - 2 * z_sem @ e_sem.t()
    d_pix = (z_pix**2).sum(1, keepdim=True) + (e_pix**2).sum(1) - 2 * z_pix @ e_pix.t()
    return torch.argmin(d_sem + pixel_weight * d_pix, dim=1)


# --------------------------------------------------------------------------------------------------------------
# one quantizer call


@dataclass
class QuantizerOutput:
    quantized: Tensor
    """(B, C, h, w) straight-through output: forward value = the chosen normalised codes."""
    indices: Tensor
    """(B, h*w) for a shared-mapping quantizer, (B, h*w, M) for a multi-codebook one; row-major positions."""
    losses: dict[str, Tensor]
    """codebook, commitment (beta included) and, when `entropy_loss` is on, entropy (unweighted)."""
    part_distances: Tensor
    """(P,) mean squared distance of each normalised code part to its chosen code (the sem/pix balance)."""


class Codebook(nn.Module):
    """A (K, d) table of codes; calling it gives the l2-normalised rows in fp32, which is how every lookup
    reads it. A module call rather than a bare `.weight` read, so that ZeRO-3 gathers the partitioned table
    around it in forward and backward."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dim))
        nn.init.normal_(self.weight)  # what nn.Embedding drew first: keeps seeded random inits unchanged
        # ref 1.6: uniform(-1/K, 1/K), then each row l2-normalised; rows are renormalised at every use.
        nn.init.uniform_(self.weight, -1.0 / size, 1.0 / size)
        with torch.no_grad():
            self.weight.copy_(F.normalize(self.weight, dim=-1))

    def forward(self) -> Tensor:
        return F.normalize(self.weight.float(), dim=-1)


class CosineQuantizer(nn.Module):
    """Cosine quantizer over channel groups; `kind` "shared" = TokenFlow shared mapping, "multi" = UniTok."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.dims = tuple(cfg.dims)
        self.codebooks = nn.ModuleList(Codebook(cfg.codebook_size, d) for d in self.dims)
        # Weights of the parts in the shared search: (1, w) for (semantic, pixel).
        self.part_weights = (1.0, cfg.pixel_weight) if cfg.kind == "shared" else (1.0,) * len(self.dims)

    @property
    def code_dim(self) -> int:
        return sum(self.dims)

    def normalized_codebooks(self) -> list[Tensor]:
        return [book() for book in self.codebooks]

    def lookup(self, z: Tensor) -> Tensor:
        """Indices for raw (unnormalised) vectors z: (N, C) -> (N,) shared or (N, M) multi."""
        parts = [F.normalize(p.float(), dim=-1) for p in z.split(self.dims, dim=-1)]
        books = [b.detach() for b in self.normalized_codebooks()]
        return self._search(parts, books)

    def _search(self, parts: list[Tensor], books: list[Tensor]) -> Tensor:
        block = self.cfg.search_block
        if self.cfg.kind == "shared":
            query = torch.cat([w * p for w, p in zip(self.part_weights, parts)], dim=-1)
            return nearest_codes(query.detach(), torch.cat(books, dim=-1), block)
        return torch.stack([nearest_codes(p.detach(), b, block) for p, b in zip(parts, books)], dim=-1)

    def embed(self, indices: Tensor) -> Tensor:
        """Normalised code vectors for indices: (...,) shared or (..., M) multi -> (..., C)."""
        books = self.normalized_codebooks()
        if self.cfg.kind == "shared":
            return torch.cat([b[indices] for b in books], dim=-1)
        if indices.shape[-1] != len(books):
            raise ValueError(f"multi-codebook indices need a last dim of {len(books)}, got {tuple(indices.shape)}")
        return torch.cat([b[indices[..., j]] for j, b in enumerate(books)], dim=-1)

    def forward(self, x: Tensor) -> QuantizerOutput:
        b, c, h, w = x.shape
        if c != self.code_dim:
            raise ValueError(f"quantizer expects {self.code_dim} channels, got {c}")
        with torch.autocast(device_type=x.device.type, enabled=False):  # lookups in fp32: bf16 flips argmins
            z = x.float().permute(0, 2, 3, 1).reshape(-1, c)  # (N, C), N = B*h*w, row-major positions
            parts = [F.normalize(p, dim=-1) for p in z.split(self.dims, dim=-1)]
            z_hat = torch.cat(parts, dim=-1)
            books = self.normalized_codebooks()
            idx = self._search(parts, [bk.detach() for bk in books])
            if self.cfg.kind == "shared":
                q = torch.cat([bk[idx] for bk in books], dim=-1)
            else:
                q = torch.cat([bk[idx[:, j]] for j, bk in enumerate(books)], dim=-1)
            losses = {
                "codebook": F.mse_loss(q, z_hat.detach()),
                "commitment": self.cfg.beta * F.mse_loss(q.detach(), z_hat),
            }
            if self.cfg.entropy_loss:
                losses["entropy"] = self._entropy_loss(parts, books)
            with torch.no_grad():
                err = (q - z_hat).pow(2).split(self.dims, dim=-1)
                part_distances = torch.stack([e.sum(-1).mean() for e in err])
            st = z_hat + (q - z_hat).detach()  # straight-through: value q, gradient to z_hat
        quantized = st.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        shape = (b, h * w) if self.cfg.kind == "shared" else (b, h * w, len(self.dims))
        return QuantizerOutput(quantized.to(x.dtype), idx.view(shape), losses, part_distances)

    def _entropy_loss(self, parts: list[Tensor], books: list[Tensor]) -> Tensor:
        """Mean per-sample entropy minus entropy of the batch-mean assignment, softmax(-d / T) (ref 1.6).
        Materialises N x K, which is why it runs only when enabled."""
        t = self.cfg.entropy_temperature

        def one(logits: Tensor) -> Tensor:
            p = logits.softmax(-1)
            sample = -(p * logits.log_softmax(-1)).sum(-1).mean()
            avg = p.mean(0)
            return sample + (avg * torch.log(avg + 1e-10)).sum()

        if self.cfg.kind == "shared":
            score = sum(w * p @ bk.t() for w, p, bk in zip(self.part_weights, parts, books))
            d = 2 * sum(self.part_weights) - 2 * score
            return one(-d / t)
        return torch.stack([one(-(2 - 2 * p @ bk.t()) / t) for p, bk in zip(parts, books)]).mean()


# --------------------------------------------------------------------------------------------------------------
# the multi-scale residual loop


def resize(x: Tensor, size: int, mode: str) -> Tensor:
    """Resize a (B, C, h, w) map to size x size; the identity when already that size (bit-exact either way)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode=mode)


@dataclass
class MultiScaleOutput:
    quantized: Tensor
    """(B, C, g, g): sum over scales of each scale's codes bicubic-upsampled to the final grid."""
    indices: Tensor
    """(B, T) or (B, T, M): scale-major concatenation of each scale's row-major indices."""
    scales: tuple[int, ...]
    """Scales used (one may be missing in training, see scale drop)."""
    losses: dict[str, Tensor] = field(default_factory=dict)
    """Each loss averaged over scales."""
    per_scale_indices: list[Tensor] = field(default_factory=list)
    part_distances: Tensor | None = None
    """(P,) sem/pix distance to the chosen codes, averaged over scales."""


class MultiScaleQuantizer(nn.Module):
    """VAR-style residual quantization over `cfg.scales` with one shared `CosineQuantizer` (ref 1.7)."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.quantizer = CosineQuantizer(cfg)
        self.scales = tuple(cfg.scales)

    @property
    def grid(self) -> int:
        return self.scales[-1]

    @property
    def tokens_per_image(self) -> int:
        return sum(s * s for s in self.scales)

    def sample_scales(self, drop_scales: bool) -> tuple[int, ...]:
        """Scales for this batch: with drop_scales, with probability p one scale among 2..K' is dropped."""
        if not drop_scales or len(self.scales) < 2 or self.cfg.scale_drop_prob <= 0:
            return self.scales
        if torch.rand(()).item() >= self.cfg.scale_drop_prob:
            return self.scales
        drop = 1 + int(torch.randint(len(self.scales) - 1, ()).item())
        return self.scales[:drop] + self.scales[drop + 1 :]

    def forward(self, h: Tensor, drop_scales: bool | None = None) -> MultiScaleOutput:
        """Quantize h (B, C, g, g). drop_scales defaults to self.training (random scale drop, ref 1.7)."""
        g = self.grid
        if h.shape[-1] != g or h.shape[-2] != g:
            raise ValueError(f"expected a {g}x{g} feature map, got {tuple(h.shape[-2:])}")
        scales = self.sample_scales(self.training if drop_scales is None else drop_scales)
        residual, f = h.float(), torch.zeros_like(h, dtype=torch.float32)
        per_scale, losses, dists = [], {}, []
        for s in scales:
            out = self.quantizer(resize(residual, s, "area"))
            u = resize(out.quantized, g, "bicubic")
            f = f + u
            residual = residual - u.detach()  # the residual update is detached; gradients flow through u
            per_scale.append(out.indices)
            dists.append(out.part_distances)
            for k, v in out.losses.items():
                losses[k] = losses.get(k, 0.0) + v / len(scales)
        return MultiScaleOutput(
            quantized=f.to(h.dtype),
            indices=torch.cat(per_scale, dim=1),
            scales=scales,
            losses=losses,
            per_scale_indices=per_scale,
            part_distances=torch.stack(dists).mean(0),
        )

    def split_scales(self, indices: Tensor) -> list[Tensor]:
        """Split a (B, T[, M]) sequence into per-scale (B, s*s[, M]) maps; T must be a prefix of whole scales."""
        t = indices.shape[1]
        bounds, total = [], 0
        for s in self.scales:
            total += s * s
            bounds.append(total)
            if total >= t:
                break
        if total != t:
            valid = [sum(s * s for s in self.scales[: i + 1]) for i in range(len(self.scales))]
            raise ValueError(f"{t} tokens is not a prefix of whole scales {self.scales}; valid lengths are {valid}")
        return list(indices.split([s * s for s in self.scales[: len(bounds)]], dim=1))

    def features(self, indices: Tensor) -> Tensor:
        """Continuous code map (B, C, g, g) for any prefix of whole scales: each scale's normalised codes
        bicubic-upsampled to the final grid and summed, exactly as in encoding (ref 1.9)."""
        f = None
        for s, part in zip(self.scales, self.split_scales(indices)):
            codes = self.quantizer.embed(part)  # (B, s*s, C)
            codes = codes.transpose(1, 2).reshape(codes.shape[0], -1, s, s)
            u = resize(codes, self.grid, "bicubic")
            f = u if f is None else f + u
        return f

    def cumulative_features(self, indices: Tensor) -> list[Tensor]:
        """The LLMs' cascaded partial sums (ref 4.3) for any prefix of whole scales: one (B, C, s_k, s_k) map per
        scale, g_0 = E_0 and g_k = bicubic(g_{k-1}, s_k) + E_k, where E_k is scale k's normalised code map.

        This is NOT the tokenizer's own accumulation (`features`, which upsamples every scale straight to the final
        grid); the text-to-image model was trained on this cascade, so both live here, side by side. Scale k's
        teacher-forcing input is bicubic(g_{k-1}, s_k) (`next_scale_input`); a refinement pass re-reads scale k
        with g_k, the partial sum that includes its own draft."""
        out: list[Tensor] = []
        for s, part in zip(self.scales, self.split_scales(indices)):
            codes = self.quantizer.embed(part)  # (B, s*s, C)
            codes = codes.transpose(1, 2).reshape(codes.shape[0], -1, s, s)
            out.append(codes if not out else self.next_scale_input(out[-1], s) + codes)
        return out

    @staticmethod
    def next_scale_input(partial: Tensor, size: int) -> Tensor:
        """The input map of the next scale: the partial sum so far, bicubic-resized to that scale's side."""
        return F.interpolate(partial, size=(size, size), mode="bicubic")

    def teacher_forcing_inputs(self, indices: Tensor) -> Tensor:
        """(B, T - s_0^2, C): the inputs of scales 1..K-1 for a whole image's (B, T) indices, scale-major and
        row-major, each scale k's rows being bicubic(g_{k-1}, s_k) (see `cumulative_features`)."""
        partial = self.cumulative_features(indices)
        if len(partial) != len(self.scales):
            raise ValueError(f"teacher forcing needs all {self.tokens_per_image} tokens, got {indices.shape[1]}")
        maps = [self.next_scale_input(g, s) for g, s in zip(partial[:-1], self.scales[1:])]
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
