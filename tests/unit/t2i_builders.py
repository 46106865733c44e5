"""Tiny text-to-image models for the unit tests: 3 scales (1, 2, 3 -> 14 tokens), 64 codes, a 2-layer decoder."""

from __future__ import annotations

import torch

from tokenflow.config import QuantizerConfig
from tokenflow.llm.layout import T2ILayout
from tokenflow.llm.t2i import T2IConfig, T2IModel, decoder_config
from tokenflow.quantize import MultiScaleQuantizer

SCALES = (1, 2, 3)
CODES = 64
T = 14


def quantizer(codes: int = CODES, scales=SCALES) -> MultiScaleQuantizer:
    return MultiScaleQuantizer(QuantizerConfig(codebook_size=codes, scales=scales)).eval()


def layout(max_text_tokens: int = 8, scales=SCALES) -> T2ILayout:
    # ids of a 512-word text vocabulary: BOS 1, EOS 2, pad 0, "<img>" = (5, 6), "</img>" = (7, 8)
    return T2ILayout(
        scales=scales,
        eos_id=2,
        pad_id=0,
        image_open=(5, 6),
        image_close=(7, 8),
        bos_id=1,
        max_text_tokens=max_text_tokens,
    )


def model(head: str = "image", codes: int = CODES, scales=SCALES, **llm) -> T2IModel:
    cfg = T2IConfig(llm=decoder_config(**llm), scales=scales, codebook_size=codes, code_dim=40, head=head)
    return T2IModel(cfg).eval()


def training_batch(lay: T2ILayout, captions: list[list[int]], image_tokens: torch.Tensor, q: MultiScaleQuantizer):
    """The arguments of `T2IModel.forward` for caption ids and image tokens."""
    ids, valid = T2ILayout.stack([lay.prefix(c) for c in captions])
    with torch.no_grad():  # the image tokenizer is frozen
        inputs = q.teacher_forcing_inputs(image_tokens)
    return dict(
        input_ids=lay.sequence_ids(ids),
        key_valid=lay.key_valid(valid),
        image_tokens=image_tokens,
        image_inputs=inputs,
        image_start=lay.prefix_len,
        text_labels=lay.text_targets(ids, valid),
    )
