"""A tiny text-to-image model learns a caption -> tokens mapping, and greedy sampling reproduces it."""

import torch

from tests.unit.t2i_builders import CODES, T, layout, model, quantizer, training_batch
from tokenflow.llm.layout import T2ILayout
from tokenflow.llm.sampling import SamplingConfig, T2ISampler

CAPTIONS = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34], [40]]


def test_a_tiny_model_learns_captions_to_images_and_greedy_sampling_reproduces_them():
    torch.manual_seed(0)
    m, q, lay = model(), quantizer(), layout()
    targets = torch.randint(0, CODES, (len(CAPTIONS), T), generator=torch.Generator().manual_seed(5))
    batch = training_batch(lay, CAPTIONS, targets, q)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    m.train()
    for _ in range(300):
        out = m(**batch)
        loss = out.loss_sum / out.count
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    assert out.correct_per_scale.sum() == out.tokens_per_scale.sum()  # teacher-forced: every token right
    ids, valid = T2ILayout.stack([lay.prefix(c) for c in CAPTIONS])
    sampler = T2ISampler(m, q, lay)
    greedy = sampler.sample(ids, valid, SamplingConfig(cfg=0.0, top_k=(1,), top_p=(0.0,)))
    assert torch.equal(greedy, targets)
