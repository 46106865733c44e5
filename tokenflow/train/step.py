"""One training step of an image tokenizer: the generator update, then the discriminator update.

    step = TrainStep(tok, loss_fn, gen_engine, disc_engine, teacher=tok.make_teacher(), stage="full")
    metrics = step(pixels, global_step)      # pixels (B, 3, S, S) in [-1, 1]; a dict of floats

The engines are DeepSpeed engines on a cluster or `LocalEngine`s in one process (the same interface). The
generator engine wraps the tokenizer, the discriminator engine wraps `loss_fn.discriminator`.

- The generator's GAN term runs the discriminator with its parameters frozen, so the generator's backward
  leaves no gradient on them (under ZeRO-2/3 such gradients would be reduced into the discriminator's
  partitions by hooks); the discriminator then gets its own forward on detached reconstructions.
- Decoder stages run encoder and quantizer under no_grad and compute only the pixel losses (reconstruction,
  perceptual, GAN): no teacher forward, no semantic decoder, no VQ loss, as the stage trains nothing else.
  The quantizer's random scale drop stays on in training mode, as in the official decoder fine-tuning.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenflow.losses import TokenizerLoss
from tokenflow.tokenizer import Tokenizer
from tokenflow.train.config import STAGES


class TrainStep:
    def __init__(
        self,
        tok: Tokenizer,
        loss_fn: TokenizerLoss,
        gen,
        disc,
        *,
        teacher: nn.Module | None = None,
        stage: str = "full",
        amp_dtype: torch.dtype | None = None,
    ):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        semantic = tok.config.kind == "tokenflow" and loss_fn.cfg.semantic_weight > 0
        if stage == "full" and semantic and teacher is None:
            raise ValueError("the full stage of a TokenFlow tokenizer needs its semantic teacher (tok.make_teacher())")
        self.tok, self.loss_fn, self.gen, self.disc = tok, loss_fn, gen, disc
        self.teacher = teacher if stage == "full" else None
        self.stage = stage
        self.amp_dtype = amp_dtype
        self.last_quant = None
        """The quantizer output of the last call (indices per scale, scales used, sem/pix distances)."""
        self.last_reconstruction: Tensor | None = None
        """The reconstruction of the last call, detached."""

    def __call__(self, pixels: Tensor, step: int) -> dict[str, float]:
        model = self.tok.model
        self.tok.train()
        self.loss_fn.train()  # the discriminator's BatchNorm; LPIPS stays in eval mode on its own
        disc = self.loss_fn.discriminator
        disc.requires_grad_(False)
        try:
            with self._autocast(pixels):
                x_hat, g_loss, log = self._generator(pixels, step, model)
        finally:
            disc.requires_grad_(True)
        self.gen.backward(g_loss)
        self.gen.step()
        self.last_reconstruction = x_hat.detach()

        with self._autocast(pixels):
            d_loss, d_log = self.loss_fn.discriminator_loss(pixels, x_hat, step)
        if self.loss_fn.gan_weight_at(step) > 0:  # before disc_start D neither runs nor steps (its schedule
            self.disc.backward(d_loss)  # and accumulation start at its first real update, on a step boundary)
            self.disc.step()

        metrics = {f"loss/{k}": v for k, v in log.items() if k != "gan_weight"}
        metrics.update({f"disc/{k}": v for k, v in d_log.items() if k != "gan_weight"})
        metrics["gan_weight"] = log["gan_weight"]
        metrics["lr"] = self.gen.get_lr()[0]
        return metrics

    def _autocast(self, pixels: Tensor):
        """Mixed precision for the forward passes (weights, gradients and optimiser states stay fp32; the
        quantizer's search opts out of autocast on its own)."""
        enabled = self.amp_dtype is not None
        return torch.autocast(pixels.device.type, dtype=self.amp_dtype, enabled=enabled)

    def _generator(self, pixels: Tensor, step: int, model: nn.Module) -> tuple[Tensor, Tensor, dict[str, float]]:
        if self.stage == "full":
            out = self.tok(pixels)
            self.last_quant = out.quant
            target = None
            if self.teacher is not None and out.semantic is not None:
                target = self.teacher(pixels)
            loss, log = self.loss_fn.generator_loss(
                pixels,
                out.reconstruction,
                step,
                quant_losses=out.quant.losses,
                sem_pred=out.semantic,
                sem_target=target,
                last_layer=model.last_layer,
            )
            return out.reconstruction, loss, log
        with torch.no_grad():
            self.last_quant = model.quantizer(model.encode_latent(pixels))
            codes = self.last_quant.quantized
        x_hat = model.decode_pixels(codes)
        loss, log = self.loss_fn.generator_loss(pixels, x_hat, step, last_layer=model.last_layer)
        return x_hat, loss, log
