"""One optimiser step of the text-to-image model, written once for DeepSpeed and for a plain PyTorch loop.

    step = T2IStep(engine, quantizer, layout, world_size=ws)       # engine: deepspeed.initialize(...)[0] or
    metrics = step(micro_batches, global_count)                    # tokenflow.train.engine.LocalEngine

The loss is cross-entropy summed over every supervised token (image tokens, `</img>`, EOS) of all micro-batches
on all workers, divided by their global count (`global_count`, all-reduced by the caller before the step): the
same normalisation whatever the split into micro-batches and workers. The engine divides each backward by the
accumulation steps and averages gradients over workers; the scale below undoes both.
"""

from __future__ import annotations

import contextlib

import torch

from tokenflow.llm.layout import T2ILayout


def supervised_count(batch: dict, layout: T2ILayout) -> int:
    """Supervised tokens of a batch: every sample's image tokens, `</img>` and EOS."""
    return batch["tokens"].shape[0] * (layout.image_tokens + len(layout.suffix))


class T2IStep:
    def __init__(self, engine, quantizer, layout: T2ILayout, *, grad_accum: int = 1, world_size: int = 1, amp=None):
        self.engine, self.quantizer, self.layout = engine, quantizer, layout
        self.grad_accum, self.world_size, self.amp = grad_accum, world_size, amp

    def inputs(self, batch: dict, device) -> dict:
        """The model's forward arguments for a batch from `T2IBatches.take()`."""
        ids, valid = batch["prefix_ids"].to(device), batch["prefix_valid"].to(device)
        tokens = batch["tokens"].to(device)
        with torch.no_grad():  # the image tokenizer is frozen
            image_inputs = self.quantizer.teacher_forcing_inputs(tokens)
        return dict(
            input_ids=self.layout.sequence_ids(ids),
            key_valid=self.layout.key_valid(valid),
            image_tokens=tokens,
            image_inputs=image_inputs,
            image_start=self.layout.prefix_len,
            text_labels=self.layout.text_targets(ids, valid),
        )

    def __call__(self, micro_batches: list[dict], global_count: float, device="cpu") -> dict[str, torch.Tensor]:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"expected {self.grad_accum} micro-batches, got {len(micro_batches)}")
        scale = self.grad_accum * self.world_size / global_count
        sums: dict[str, torch.Tensor] = {}
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
            values = {
                "loss_sum": out.loss_sum.detach().float(),
                "count": out.count,
                "image_loss_sum": out.image_loss_sum,
                "image_count": out.image_count,
                "text_loss_sum": out.text_loss_sum,
                "text_count": out.text_count,
                "correct_per_scale": out.correct_per_scale,
                "tokens_per_scale": out.tokens_per_scale,
                "sequence_tokens": torch.tensor(float(kwargs["input_ids"].numel())),
            }
            for k, v in values.items():
                sums[k] = sums[k] + v.detach().cpu() if k in sums else v.detach().cpu()
        return sums
