"""Next-scale sampling: the cached sampler against the recompute-everything loop, CFG, the null prompt, filters."""

import pytest
import torch

from tests.unit.t2i_builders import CODES, T, layout, model, quantizer, training_batch
from tokenflow.llm.layout import T2ILayout
from tokenflow.llm.sampling import (
    PRESETS,
    SamplingConfig,
    T2ISampler,
    filter_top_k_top_p,
    guidance,
    seeded_generators,
)

CAPTIONS = [[10, 11, 12], [13] * 12, [40, 41]]


def setup(head="image"):
    m, q, lay = model(head=head), quantizer(), layout()
    ids, valid = T2ILayout.stack([lay.prefix(c) for c in CAPTIONS])
    return T2ISampler(m, q, lay), ids, valid


def run(sampler, ids, valid, config, seed=0, use_cache=True):
    return sampler.sample(ids, valid, config, torch.Generator().manual_seed(seed), use_cache=use_cache)


@pytest.mark.parametrize("head", ["image", "unified"])
@pytest.mark.parametrize("loop,cfg", [(1, 3.0), (3, 7.5), (2, 0.0)])
def test_cached_sampling_gives_the_tokens_of_a_full_recompute(head, loop, cfg):
    sampler, ids, valid = setup(head)
    config = SamplingConfig.preset(loop, cfg=cfg)
    cached = run(sampler, ids, valid, config)
    full = run(sampler, ids, valid, config, use_cache=False)
    assert cached.shape == (3, T) and cached.dtype == torch.long
    assert torch.equal(cached, full)
    assert 0 <= cached.min() and cached.max() < CODES
    assert torch.equal(run(sampler, ids, valid, config), cached)  # seeded: reproducible
    assert not torch.equal(run(sampler, ids, valid, config, seed=1), cached)


def test_per_image_seeds_make_an_image_independent_of_its_batch_mates():
    sampler, ids, valid = setup()
    config = SamplingConfig.preset(1, cfg=3.0)
    together = sampler.sample(ids, valid, config, seeded_generators([7, 8, 9]))
    swapped = sampler.sample(ids[[2, 0, 1]], valid[[2, 0, 1]], config, seeded_generators([9, 7, 8]))
    assert torch.equal(swapped, together[[2, 0, 1]])
    other_seed = sampler.sample(ids, valid, config, seeded_generators([7, 8, 10]))
    assert torch.equal(other_seed[:2], together[:2]) and not torch.equal(other_seed[2], together[2])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sampler.sample(ids, valid, config, seeded_generators([1, 2]))


def test_greedy_cfg0_samples_are_the_conditional_models_argmax():
    """cfg = 0 gives the conditional model's samples: teacher-forcing the greedy tokens reproduces each of them as
    the argmax at its position (the unconditional branch has no say)."""
    sampler, ids, valid = setup()
    tokens = run(sampler, ids, valid, SamplingConfig(cfg=0.0, top_k=(1,), top_p=(0.0,)))
    b = training_batch(sampler.layout, CAPTIONS, tokens, sampler.quantizer)
    s = b["image_start"]
    with torch.no_grad():
        m = sampler.model
        x = m.embed_sequence(b["input_ids"], b["image_inputs"], s)
        from tokenflow.llm.mask import t2i_attention_mask

        mask = t2i_attention_mask(b["key_valid"], s, sampler.scales)
        h = m.backbone(x, mask, torch.arange(x.shape[1]).unsqueeze(0))
        argmax = m.image_logits(h[:, s - 1 : s - 1 + T]).argmax(-1)
    assert torch.equal(argmax, tokens)


def test_cfg0_ignores_the_unconditional_branch_and_cfg_uses_it(monkeypatch):
    sampler, ids, valid = setup()
    config0, config3 = SamplingConfig.preset(1, cfg=0.0), SamplingConfig.preset(1, cfg=3.0)
    base0, base3 = run(sampler, ids, valid, config0), run(sampler, ids, valid, config3)
    other = T2ILayout.stack([sampler.layout.prefix([99, 98, 97])] * 3)
    monkeypatch.setattr(sampler, "null_prompts", lambda b, device: other)
    assert torch.equal(run(sampler, ids, valid, config0), base0)
    assert not torch.equal(run(sampler, ids, valid, config3), base3)


def test_the_unconditional_branch_sees_exactly_the_null_prompt(monkeypatch):
    sampler, ids, valid = setup()
    seen = []
    original = sampler.model.embed_prefix
    monkeypatch.setattr(sampler.model, "embed_prefix", lambda x: seen.append(x.clone()) or original(x))
    run(sampler, ids, valid, SamplingConfig.preset(1))
    (prefix,) = seen
    null_ids, _ = sampler.layout.null_prompt()
    assert torch.equal(prefix[:3], ids)
    assert prefix[3:].tolist() == [null_ids] * 3
    # the same ids a dropped caption gets in training: the empty caption under the same padding
    assert null_ids == sampler.layout.prefix([])[0] == [0] * 7 + [1, 5, 6]


def test_unified_head_never_samples_text_or_pad():
    sampler, ids, valid = setup("unified")
    with torch.no_grad():  # make every text id and [PAD] far more likely than any code
        sampler.model.llm.lm_head.weight[: 512 + 1] *= 1000
    tokens = run(sampler, ids, valid, SamplingConfig.preset(1, cfg=3.0))
    assert 0 <= tokens.min() and tokens.max() < CODES


def test_prompts_must_be_laid_out():
    sampler, ids, valid = setup()
    with pytest.raises(ValueError, match="laid out to 10 ids"):
        sampler.sample(ids[:, 1:], valid[:, 1:], SamplingConfig.preset(1))


# ---- filters, guidance, presets ---------------------------------------------------------------------------------


def brute_force_filter(row: list[float], top_k: int, top_p: float) -> list[bool]:
    """Kept entries, from the definitions: top-k keeps every value >= the k-th largest; top-p then keeps, in
    order of decreasing probability, entries until the kept mass reaches p (ties by the sort order)."""
    keep = [True] * len(row)
    if top_k > 0:
        kth = sorted(row, reverse=True)[min(top_k, len(row)) - 1]
        keep = [v >= kth for v in row]
    if top_p > 0:
        vals = torch.tensor([v if k else -float("inf") for v, k in zip(row, keep)])
        probs = vals.softmax(0).tolist()
        order = sorted(range(len(row)), key=lambda i: probs[i])  # ascending, as the official sort
        cumulative = torch.tensor([probs[i] for i in order]).cumsum(0).tolist()
        kept = {i for pos, i in enumerate(order) if cumulative[pos] > 1 - top_p or pos == len(order) - 1}
        keep = [k and i in kept for i, k in enumerate(keep)]
    return keep


@pytest.mark.parametrize("top_k,top_p", [(3, 0.0), (0, 0.5), (5, 0.8), (1, 0.0), (0, 0.0), (100, 0.9)])
def test_filter_matches_the_definitions(top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(4, 3, 10, generator=g)
    logits[0, 0, :3] = 5.0  # ties at the top
    out = filter_top_k_top_p(logits, top_k, top_p)
    for b in range(4):
        for n in range(3):
            want = brute_force_filter(logits[b, n].tolist(), top_k, top_p)
            assert (out[b, n] > -float("inf")).tolist() == want
    kept = out > -float("inf")
    torch.testing.assert_close(out[kept], logits[kept])
    if top_k == 3:
        assert kept[0, 0].sum() == 3  # the three tied maxima all stay


def test_guidance_and_presets():
    cond, uncond = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    torch.testing.assert_close(guidance(cond, uncond, 0.0), cond)
    torch.testing.assert_close(guidance(cond, uncond, 2.0), 3 * cond - 2 * uncond)
    assert SamplingConfig.preset(3).passes == 3 and PRESETS[3] == ((1200, 100, 1), (0.8, 0.8, 0.0))
    with pytest.raises(ValueError, match="--loop must be one of"):
        SamplingConfig.preset(4)
    with pytest.raises(ValueError, match="one entry per pass"):
        SamplingConfig(top_k=(1, 2), top_p=(0.5,))
