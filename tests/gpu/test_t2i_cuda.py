"""The text-to-image model's GPU paths: FlexAttention compiled on CUDA against SDPA (forward and backward, at the
released layout), a bf16-autocast training step that learns, and cached sampling on CUDA giving the recompute
loop's tokens.

Skipped without CUDA (the suite never needs a GPU). On a GPU machine: `python -m pytest -q tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.t2i_builders import layout, training_batch
from tokenflow.config import QuantizerConfig
from tokenflow.llm.sampling import SamplingConfig, T2ISampler, seeded_generators
from tokenflow.llm.t2i import T2IConfig, T2IModel, decoder_config
from tokenflow.llm.t2i_step import T2IStep, supervised_count
from tokenflow.quantize import MultiScaleQuantizer
from tokenflow.train import LocalEngine, OptimizerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
RELEASED_SCALES = (1, 2, 4, 6, 8, 10, 12, 14, 16)  # 817 image tokens: 947 positions, a partial last flex block
CODES = 1024


def build(attention="sdpa", scales=RELEASED_SCALES, seed=0):
    torch.manual_seed(seed)
    llm = decoder_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    cfg = T2IConfig(llm=llm, scales=scales, codebook_size=CODES, code_dim=40)
    q = MultiScaleQuantizer(QuantizerConfig(codebook_size=CODES, scales=scales)).eval().to(CUDA)
    return T2IModel(cfg, attention=attention).to(CUDA), q


def batch(q, scales=RELEASED_SCALES, seed=0):
    lay = layout(max_text_tokens=128, scales=scales)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CODES, (3, sum(s * s for s in scales)), generator=g).to(CUDA)
    captions = [[10, 11, 12], [13] * 60, [14] * 127]  # left padding of three lengths
    return lay, {
        k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in training_batch(lay, captions, tokens, q).items()
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_equals_sdpa_forward_and_backward(dtype):
    sdpa, q = build("sdpa")
    flex, _ = build("flex")
    flex.load_state_dict(sdpa.state_dict())
    _, kwargs = batch(q)
    results = []
    for m in (sdpa, flex):
        m.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = m(**kwargs)
        (out.loss_sum / out.count).backward()
        grads = {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((float(out.loss_sum / out.count), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(loss_a - loss_b) <= tol * abs(loss_a)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        scale = grads_a[n].abs().max().clamp_min(1e-6)
        assert ((grads_a[n] - grads_b[n]).abs().max() / scale) <= (1e-3 if dtype == torch.float32 else 5e-2), n


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_a_bf16_step_learns_a_fixed_batch(attention):
    m, q = build(attention, scales=(1, 2, 4, 6))
    lay, _ = batch(q, scales=(1, 2, 4, 6))
    g = torch.Generator().manual_seed(1)
    ids, valid = type(lay).stack([lay.prefix([10 + i] * (3 + i)) for i in range(4)])
    data = {
        "prefix_ids": ids,
        "prefix_valid": valid,
        "tokens": torch.randint(0, CODES, (4, lay.image_tokens), generator=g),
    }
    opt = OptimizerConfig(lr=3e-3, warmup_steps=1, decoupled_weight_decay=True, max_grad_norm=1.0)
    step = T2IStep(LocalEngine(m.train(), opt, max_steps=100), q, lay, amp=torch.bfloat16)
    count = float(supervised_count(data, lay))
    losses = [float(step([data], count, CUDA)["loss_sum"]) / count for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_cached_sampling_on_cuda_gives_the_recompute_tokens(amp):
    m, q = build("sdpa")
    m.eval()
    lay = layout(max_text_tokens=128)
    ids, valid = type(lay).stack([lay.prefix([10, 11, 12]), lay.prefix([13] * 40)])
    sampler = T2ISampler(m, q, lay)
    config = SamplingConfig.preset(3, 3.0)
    tokens = []
    for use_cache in (True, False):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp is not None):
            out = sampler.sample(
                ids.to(CUDA), valid.to(CUDA), config, seeded_generators([0, 1], CUDA), use_cache=use_cache
            )
        tokens.append(out.cpu())
    if amp is None:
        assert torch.equal(tokens[0], tokens[1])
    else:  # bf16 rounds the cached and recomputed paths differently: most tokens still agree
        assert (tokens[0] == tokens[1]).float().mean() > 0.5
