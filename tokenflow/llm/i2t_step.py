"""One optimiser step of the understanding model, for DeepSpeed and for a plain PyTorch loop alike.

    step = I2TStep(engine, tokenizer.features, image_tokens=729, code_dim=40, world_size=ws)
    sums = step(micro_batches, global_count)     # micro-batches from pipelines.i2t_data.I2TBatches.take()

The features are computed here from the token indices (`Tokenizer.features`: no vision tower, no gradient). The
loss is cross-entropy summed over the supervised tokens of all micro-batches on all workers, divided by their
global count (`global_count`, all-reduced by the caller): the same whatever the split into micro-batches and
workers. The engine divides each backward by the accumulation steps and averages gradients over the workers; the
scale undoes both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor


class I2TStep:
    def __init__(
        self,
        engine,
        features: Callable[[Tensor], Tensor],
        *,
        image_tokens: int,
        code_dim: int,
        grad_accum: int = 1,
        world_size: int = 1,
        amp=None,
    ):
        self.engine, self.features = engine, features
        self.image_tokens, self.code_dim = image_tokens, code_dim
        self.grad_accum, self.world_size, self.amp = grad_accum, world_size, amp

    def inputs(self, batch: dict, device) -> dict:
        """The model's forward arguments: features for the samples with an image (an empty tensor when none,
        so the projector still runs: ZeRO-3)."""
        tokens = batch["tokens"].to(device)
        if tokens.shape[0]:
            with torch.no_grad():  # the image tokenizer is frozen
                features = self.features(tokens).float()
        else:
            features = torch.zeros(0, self.image_tokens, self.code_dim, device=device)
        return dict(
            input_ids=batch["input_ids"].to(device),
            labels=batch["labels"].to(device),
            lengths=batch["lengths"].to(device),
            image_index=batch["image_index"].to(device),
            features=features,
        )

    def __call__(self, micro_batches: list[dict], global_count: float, device="cpu") -> dict[str, Tensor]:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"expected {self.grad_accum} micro-batches, got {len(micro_batches)}")
        if global_count <= 0:
            raise ValueError("no supervised token in the step on any worker")
        scale = self.grad_accum * self.world_size / global_count
        sums: dict[str, Tensor] = {}
        for batch in micro_batches:
            kwargs = self.inputs(batch, device)
            autocast = (
                torch.autocast(torch.device(device).type, dtype=self.amp)
                if self.amp is not None
                else contextlib.nullcontext()
            )
            with autocast:
                out = self.engine(**kwargs)
            self.engine.backward(out.loss_sum * scale)
            self.engine.step()
            rows = int(batch["lengths"].sum()) + self.image_tokens * int(batch["tokens"].shape[0])
            values = {
                "loss_sum": out.loss_sum.detach().float(),
                "count": out.count.float(),
                "correct": out.correct.float(),
                "sequence_tokens": torch.tensor(float(rows)),
                "samples": torch.tensor(float(batch["lengths"].shape[0])),
            }
            for k, v in values.items():
                v = v.detach().cpu()
                sums[k] = sums[k] + v if k in sums else v
        return sums
