import math

import pytest
import torch

from tokenflow.stats import CodebookStats


def test_hand_built_example_gives_exact_numbers():
    s = CodebookStats.empty(scales=(1, 2), codebook_size=4)
    s.update([torch.tensor([[0], [0]]), torch.tensor([[0, 1, 2, 2], [3, 3, 3, 3]])])
    assert s.counts[:, 0].tolist() == [[2, 0, 0, 0], [1, 1, 2, 4]]
    assert s.used().flatten().tolist() == [1, 4]
    assert s.usage().flatten().tolist() == [0.25, 1.0]
    assert s.dead().flatten().tolist() == [3, 0]
    assert s.perplexity()[0].item() == pytest.approx(1.0)
    p = torch.tensor([1, 1, 2, 4], dtype=torch.float64) / 8
    assert s.perplexity()[1].item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    # pooled over scales: counts [3, 1, 2, 4]
    pooled = torch.tensor([3, 1, 2, 4], dtype=torch.float64) / 10
    assert s.perplexity(all_scales=True).item() == pytest.approx(math.exp(-(pooled * pooled.log()).sum().item()))
    summary = s.summary()
    assert summary["usage/s1"] == 0.25 and summary["dead/s2"] == 0 and summary["usage/all"] == 1.0


def test_uniform_use_has_perplexity_k():
    s = CodebookStats.empty(scales=(2,), codebook_size=4).update([torch.arange(4).view(1, 4)])
    assert s.perplexity().item() == pytest.approx(4.0)


def test_merging_two_halves_equals_the_whole():
    torch.manual_seed(1)
    scales, k = (1, 2, 4), 50
    batches = [[torch.randint(0, k, (3, s * s)) for s in scales] for _ in range(6)]
    whole = CodebookStats.empty(scales, k)
    a, b = CodebookStats.empty(scales, k), CodebookStats.empty(scales, k)
    for i, batch in enumerate(batches):
        whole.update(batch)
        (a if i % 2 else b).update(batch)
    merged = a + b
    assert torch.equal(merged.counts, whole.counts)
    assert merged.summary() == whole.summary()


def test_multi_codebook_and_dropped_scales():
    s = CodebookStats.empty(scales=(1, 2), codebook_size=3, num_codebooks=2)
    s.update([torch.tensor([[[0, 2], [1, 2], [1, 2], [1, 0]]])], scales=(2,))
    assert s.counts[1].tolist() == [[1, 3, 0], [1, 0, 3]]
    assert s.counts[0].sum() == 0
    assert s.used()[1].tolist() == [2, 2]


def test_bad_input_is_rejected():
    s = CodebookStats.empty(scales=(1,), codebook_size=3)
    with pytest.raises(ValueError, match="out of range"):
        s.update([torch.tensor([[3]])])
    with pytest.raises(ValueError, match="2 index maps for 1 scales"):
        s.update([torch.tensor([[0]]), torch.tensor([[0]])])
    with pytest.raises(ValueError, match="cannot merge"):
        s.merge(CodebookStats.empty(scales=(2,), codebook_size=3))
