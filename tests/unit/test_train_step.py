"""The tokenizer training step on the tiny presets, in one process (`LocalEngine`): schedules, gradient
accumulation, stages, the GAN gate and the discriminator's isolation from the generator's backward."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from tokenflow import Tokenizer
from tokenflow.config import preset
from tokenflow.losses import LossConfig, TokenizerLoss
from tokenflow.train import LocalEngine, OptimizerConfig, TrainStep, lr_factor, prepare_stage
from tokenflow.train.stages import decoder_of


def tiny(kind: str = "tiny", seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    cfg = preset(kind)
    cfg = replace(cfg, quantizer=replace(cfg.quantizer, scale_drop_prob=0.0))  # deterministic forward
    return Tokenizer(cfg)


def make_step(tok, *, stage="full", disc_start=10_000, lr=1e-3, grad_accum=1, teacher=True, disc_engine=None):
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0.0, disc_start=disc_start))
    opt = OptimizerConfig(lr=lr)
    gen = LocalEngine(tok, opt, max_steps=100, grad_accum=grad_accum)
    disc = disc_engine or LocalEngine(loss_fn.discriminator, opt, max_steps=100, grad_accum=grad_accum)
    t = tok.make_teacher() if teacher and stage == "full" else None
    return TrainStep(tok, loss_fn, gen, disc, teacher=t, stage=stage), gen, disc


def batch(n: int = 4, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lr_schedule_warmup_constant_and_cosine():
    warm = OptimizerConfig(warmup_steps=4)
    assert [lr_factor(s, warm, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = OptimizerConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, cos, 110) == pytest.approx(1.0)
    assert lr_factor(60, cos, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cos, 110) == pytest.approx(0.1)
    assert lr_factor(500, cos, 110) == pytest.approx(0.1)


def test_loss_decreases_on_a_fixed_batch():
    tok = tiny()
    step, _, _ = make_step(tok)
    x = batch()
    totals = [step(x, s)["loss/total"] for s in range(25)]
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.75 * totals[0] and sum(totals[-5:]) < sum(totals[5:10]) < sum(totals[:5]), totals


def test_gradient_accumulation_matches_one_big_batch():
    x = batch(4)
    a, b = tiny(seed=3), tiny(seed=3)
    step_a, gen_a, _ = make_step(a, grad_accum=2)
    step_b, gen_b, _ = make_step(b, grad_accum=1)
    step_a.teacher = step_b.teacher = copy.deepcopy(step_a.teacher)  # one teacher for both
    for engine in (gen_a, gen_b):  # plain SGD: Adam's first steps turn float noise in ~0 gradients into +-lr
        engine.optimizer = torch.optim.SGD(engine.params, lr=0.1)
        engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda s: 1.0)
    for s in range(2):
        step_a(x[:2], s)
        step_a(x[2:], s)
        step_b(x, s)
    assert gen_a.global_steps == gen_b.global_steps == 2
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)


def test_clipping_and_grad_norm_are_reported():
    tok = tiny()
    step, gen, _ = make_step(tok)
    gen.cfg = replace(gen.cfg, max_grad_norm=1e-3)
    step(batch(), 0)
    assert gen.grad_norm is not None and gen.grad_norm > 1e-3  # the norm before clipping is reported


def test_full_stage_of_a_tokenflow_tokenizer_needs_its_teacher():
    with pytest.raises(ValueError, match="needs its semantic teacher"):
        make_step(tiny(), teacher=False)


class Exploding(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the teacher must not run in a decoder stage")


@pytest.mark.parametrize("kind", ["tiny", "tiny_unitok"])
def test_decoder_stage_trains_and_computes_only_the_decoder(kind):
    tok = prepare_stage(tiny(kind), "decoder")
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    step, _, _ = make_step(tok, stage="decoder", teacher=False)
    step.teacher = Exploding()
    for s in range(3):
        metrics = step(batch(), s)
    assert "loss/semantic" not in metrics and "loss/vq" not in metrics and "loss/rec" in metrics
    prefix = "model.pixel_decoder" if kind == "tiny" else "model.decoder"
    decoder = {n for n, _ in decoder_of(tok).named_parameters(prefix=prefix)}
    changed = {k for k, v in tok.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= decoder


def test_enhanced_decoder_stage_replaces_the_pixel_decoder():
    tok = prepare_stage(tiny(), "enhanced_decoder")
    pd = tok.config.pixel_decoder
    assert (pd.ch, pd.num_res_blocks) == (32, 2)  # tiny: 16 -> 32 channels, 1 -> 2 blocks
    assert tok.model.pixel_decoder.conv_out.weight.shape[1] == 32
    step, _, _ = make_step(tok, stage="enhanced_decoder", teacher=False)
    assert step(batch(), 0)["loss/rec"] > 0
    assert tok.decode(tok.encode(batch(2))).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="use stage 'decoder' for UniTok"):
        prepare_stage(tiny("tiny_unitok"), "enhanced_decoder")


class CheckingEngine(LocalEngine):
    """A discriminator engine asserting that the generator's backward left no gradient on its parameters."""

    def backward(self, loss):
        assert all(p.grad is None for p in self.params), "generator backward reached the discriminator"
        super().backward(loss)


def test_gan_starts_at_disc_start_and_discriminator_is_isolated():
    tok = tiny()
    loss_probe = TokenizerLoss(LossConfig(perceptual_weight=0.0))
    disc_engine = CheckingEngine(loss_probe.discriminator, OptimizerConfig(lr=1e-3), max_steps=10)
    step, _, _ = make_step(tok, disc_start=2, disc_engine=disc_engine)
    step.loss_fn.discriminator = loss_probe.discriminator  # the engine's module is the loss's discriminator
    d0 = copy.deepcopy(loss_probe.discriminator.state_dict())
    m0, m1 = step(batch(), 0), step(batch(), 1)
    assert m0["gan_weight"] == m1["gan_weight"] == 0.0 and "loss/g_adv" not in m1
    same = loss_probe.discriminator.state_dict()
    assert all(torch.equal(same[k], d0[k]) for k in d0 if "running" not in k and "num_batches" not in k)
    m2 = step(batch(), 2)
    assert m2["gan_weight"] == 0.5 and "loss/g_adv" in m2 and m2["disc/d_loss"] > 0
    assert any(not torch.equal(p, d0[k]) for k, p in loss_probe.discriminator.state_dict().items() if "weight" in k)
    assert all(p.requires_grad for p in loss_probe.discriminator.parameters())


def test_step_exposes_its_quantizer_output_and_reconstruction_for_statistics():
    tok = tiny()
    step, _, _ = make_step(tok)
    x = batch(2)
    step(x, 0)
    q = step.last_quant
    assert q.scales == tok.scales and [i.shape for i in q.per_scale_indices] == [(2, s * s) for s in tok.scales]
    assert q.part_distances.shape == (2,)  # semantic and pixel parts
    assert step.last_reconstruction.shape == x.shape and not step.last_reconstruction.requires_grad


def test_bf16_autocast_keeps_weights_and_gradients_fp32():
    tok = tiny()
    step, gen, _ = make_step(tok)
    step.amp_dtype = torch.bfloat16  # autocast on the CPU here; the training job uses it on CUDA
    metrics = step(batch(2), 0)
    assert math.isfinite(metrics["loss/total"])
    assert all(p.dtype == torch.float32 for p in tok.parameters())
    assert step.last_reconstruction.dtype == torch.bfloat16  # the decoder ran under autocast
