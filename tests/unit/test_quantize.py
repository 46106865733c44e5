import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenflow.config import QuantizerConfig
from tokenflow.quantize import (
    CosineQuantizer,
    MultiScaleQuantizer,
    explicit_shared_mapping,
    nearest_codes,
)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(2, 700),
    w=st.sampled_from([1.0, 0.25, 2.5, 0.0]),
    block=st.sampled_from([1, 7, 1000, 1 << 22]),
    seed=st.integers(0, 2**31 - 1),
)
def test_shared_mapping_lookup_equals_explicit_formula(n, k, w, block, seed):
    g = torch.Generator().manual_seed(seed)
    # float64 so the two formulas cannot disagree by rounding: any difference is a real bug
    z_sem, z_pix = (
        torch.randn(n, 32, generator=g, dtype=torch.float64),
        torch.randn(n, 8, generator=g, dtype=torch.float64),
    )
    e_sem, e_pix = (
        torch.randn(k, 32, generator=g, dtype=torch.float64),
        torch.randn(k, 8, generator=g, dtype=torch.float64),
    )
    q = CosineQuantizer(QuantizerConfig(codebook_size=k, pixel_weight=w, search_block=block))
    with torch.no_grad():
        q.codebooks[0].weight.data = e_sem
        q.codebooks[1].weight.data = e_pix
    parts = [F.normalize(z_sem, dim=-1), F.normalize(z_pix, dim=-1)]
    books = [F.normalize(e_sem, dim=-1), F.normalize(e_pix, dim=-1)]
    fast = q._search(parts, books)
    assert torch.equal(fast, explicit_shared_mapping(z_sem, z_pix, e_sem, e_pix, w))


def test_float32_lookup_differs_only_on_near_ties():
    n, k = 4000, 4096
    z_sem, z_pix, e_sem, e_pix = torch.randn(n, 32), torch.randn(n, 8), torch.randn(k, 32), torch.randn(k, 8)
    q = CosineQuantizer(QuantizerConfig(codebook_size=k))
    with torch.no_grad():
        q.codebooks[0].weight.copy_(e_sem)
        q.codebooks[1].weight.copy_(e_pix)
    fast = q.lookup(torch.cat([z_sem, z_pix], dim=1))
    ref = explicit_shared_mapping(z_sem.double(), z_pix.double(), e_sem.double(), e_pix.double())
    diff = (fast != ref).nonzero().flatten()
    d = 4 - 2 * (
        F.normalize(z_sem.double(), dim=-1) @ F.normalize(e_sem.double(), dim=-1).t()
        + F.normalize(z_pix.double(), dim=-1) @ F.normalize(e_pix.double(), dim=-1).t()
    )
    for i in diff:
        assert abs(d[i, fast[i]] - d[i, ref[i]]) < 1e-5
    assert len(diff) <= n // 1000


def test_nearest_codes_ties_go_to_lowest_index_and_empty_input():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert nearest_codes(torch.tensor([[1.0, 0.0]]), keys, block=1).tolist() == [0]
    assert nearest_codes(torch.empty(0, 2), keys).shape == (0,)


def test_multi_codebook_lookup_is_per_sub_codebook_cosine_argmax():
    cfg = QuantizerConfig(kind="multi", codebook_size=50, dims=(8, 8, 8), scales=(4,), scale_drop_prob=0)
    q = CosineQuantizer(cfg)
    z = torch.randn(30, 24)
    idx = q.lookup(z)
    assert idx.shape == (30, 3)
    for j in range(3):
        sims = F.normalize(z[:, 8 * j : 8 * j + 8], dim=-1) @ F.normalize(q.codebooks[j].weight, dim=-1).t()
        assert torch.equal(idx[:, j], sims.argmax(1))
    # quantizing codebook vectors returns them (idempotence), every chunk is unit norm
    out = q(torch.randn(2, 24, 4, 4))
    chunks = out.quantized.permute(0, 2, 3, 1).reshape(-1, 3, 8)
    assert torch.allclose(chunks.norm(dim=-1), torch.ones(32, 3), atol=1e-6)
    again = q(out.quantized)
    assert torch.equal(again.indices, out.indices)


def test_straight_through_forward_value_losses_and_gradients():
    cfg = QuantizerConfig(codebook_size=64, scales=(4,), scale_drop_prob=0)
    q = CosineQuantizer(cfg)
    x = torch.randn(2, 40, 4, 4, requires_grad=True)
    out = q(x)
    codes = q.embed(out.indices)  # (B, 16, 40) normalised rows
    assert torch.allclose(out.quantized.permute(0, 2, 3, 1).reshape(2, 16, 40), codes, atol=1e-6)
    z = x.detach().permute(0, 2, 3, 1).reshape(-1, 40)
    z_hat = torch.cat([F.normalize(z[:, :32], dim=-1), F.normalize(z[:, 32:], dim=-1)], dim=-1)
    mse = ((codes.reshape(-1, 40) - z_hat) ** 2).mean()
    assert torch.allclose(out.losses["codebook"], mse, atol=1e-6)
    assert torch.allclose(out.losses["commitment"], 0.25 * mse, atol=1e-6)
    assert "entropy" not in out.losses  # off by default: not computed at all
    (out.quantized.sum() + out.losses["codebook"] + out.losses["commitment"]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(cb.weight.grad.abs().sum() > 0 for cb in q.codebooks)


def test_entropy_loss_when_enabled():
    q = CosineQuantizer(QuantizerConfig(codebook_size=16, scales=(2,), entropy_loss=True))
    out = q(torch.randn(3, 40, 2, 2))
    assert out.losses["entropy"].ndim == 0 and torch.isfinite(out.losses["entropy"])


def _manual_multiscale(q: MultiScaleQuantizer, h: torch.Tensor):
    g = q.grid
    r, f, ids = h.clone(), torch.zeros_like(h), []
    for s in q.scales:
        xk = F.adaptive_avg_pool2d(r, s)
        out = q.quantizer(xk)
        u = F.interpolate(out.quantized, size=(g, g), mode="bicubic")
        f, r = f + u, r - u
        ids.append(out.indices)
    return f, torch.cat(ids, dim=1)


def test_multiscale_loop_matches_the_reference_recipe_and_layout():
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=128, scales=(1, 2, 3, 5)))
    q.eval()
    h = torch.randn(2, 40, 5, 5)
    out = q(h)
    f, ids = _manual_multiscale(q, h)
    assert torch.equal(out.indices, ids)
    assert torch.allclose(out.quantized, f, atol=1e-5)
    assert out.indices.shape == (2, 1 + 4 + 9 + 25)
    # scale-major, row-major: the scale-2 block is the 2x2 map read row by row
    per = q.split_scales(out.indices)
    assert [p.shape[1] for p in per] == [1, 4, 9, 25]
    assert torch.equal(per[1].view(2, 2, 2), out.per_scale_indices[1].view(2, 2, 2))
    # features from the indices equal the quantized map of the forward pass
    assert torch.allclose(q.features(out.indices), out.quantized, atol=1e-5)


def test_every_scale_prefix_is_accepted_and_other_lengths_are_rejected():
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=32, scales=(1, 2, 4)))
    ids = torch.randint(0, 32, (1, 21))
    for t in (1, 5, 21):
        assert q.features(ids[:, :t]).shape == (1, 40, 4, 4)
    with pytest.raises(ValueError, match=r"valid lengths are \[1, 5, 21\]"):
        q.features(ids[:, :6])
    with pytest.raises(ValueError, match="not a prefix"):
        q.features(torch.randint(0, 32, (1, 22)))


def test_scale_drop_in_training_only_and_never_the_first_scale():
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=32, scales=(1, 2, 4, 6), scale_drop_prob=1.0))
    q.train()
    seen = set()
    for _ in range(60):
        scales = q.sample_scales(drop_scales=True)
        assert len(scales) == 3 and scales[0] == 1
        seen.add(scales)
    assert seen == {(1, 4, 6), (1, 2, 6), (1, 2, 4)}  # each of scales 2..K' can go, the last included
    h = torch.randn(1, 40, 6, 6)
    assert q(h).indices.shape[1] < q.tokens_per_image
    assert q(h, drop_scales=False).indices.shape[1] == q.tokens_per_image
    q.eval()
    assert q(h).indices.shape[1] == q.tokens_per_image


def test_quantizer_runs_fp32_under_autocast():
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=64, scales=(1, 2)))
    q.eval()
    h = torch.randn(2, 40, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = q(h.bfloat16()).indices
    assert torch.equal(a, q(h.bfloat16().float()).indices)


def test_entropy_loss_exact_value_on_confident_distinct_assignments():
    # two orthogonal codes, each position sitting exactly on one: per-sample entropy ~0, the batch-mean
    # assignment is uniform over 2 codes, so the loss is 0 - log(2)
    q = CosineQuantizer(QuantizerConfig(codebook_size=2, scales=(1,), entropy_loss=True))
    e = torch.zeros(2, 40)
    e[0, 0], e[0, 32], e[1, 1], e[1, 33] = 1, 1, 1, 1
    with torch.no_grad():
        q.codebooks[0].weight.copy_(e[:, :32])
        q.codebooks[1].weight.copy_(e[:, 32:])
    out = q(e.view(2, 40, 1, 1))
    assert out.indices.flatten().tolist() == [0, 1]
    assert out.losses["entropy"].item() == pytest.approx(-math.log(2), abs=1e-6)


@pytest.mark.parametrize("k", [4096, 96, 1000, 7])
def test_two_level_argmax_keeps_the_first_maximum(k):
    from tokenflow.quantize import _argmax_group, _row_argmax

    scores = torch.randint(0, 5, (50, k)).float()  # many exact ties
    scores[3] = 0.0  # a row that is all ties
    group = _argmax_group(k)
    assert torch.equal(_row_argmax(scores, group), scores.argmax(dim=1))
