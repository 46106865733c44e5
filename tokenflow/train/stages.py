"""Training stages: which weights train, and (enhanced_decoder) which decoder exists (ref §2.4).

- full: every weight except the frozen teacher (never part of the tokenizer) and the tower parts the semantic
  encoder never uses (SigLIP's last block, final norm and head, frozen when the tower is built);
- decoder: only the pixel decoder (UniTok: the decoder) trains; everything before it is frozen and, in
  `TrainStep`, run without gradients;
- enhanced_decoder: as decoder, after replacing the TokenFlow pixel decoder with a 2x wide, 2x deep one
  (ch x 2, num_res_blocks x 2: the released clipb_256 decoder), initialised from scratch.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from tokenflow.encoders.pixel import PixelDecoder
from tokenflow.tokenizer import Tokenizer
from tokenflow.train.config import STAGES


def decoder_of(tok: Tokenizer) -> nn.Module:
    """The module that decodes the code map to pixels: TokenFlow's pixel decoder, UniTok's decoder."""
    return tok.model.pixel_decoder if tok.config.kind == "tokenflow" else tok.model.decoder


def prepare_stage(tok: Tokenizer, stage: str) -> Tokenizer:
    """Set up `tok` (in place) for a training stage and return it."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "full":
        return tok
    if stage == "enhanced_decoder":
        if tok.config.kind != "tokenflow":
            raise ValueError("the enhanced decoder is a TokenFlow pixel decoder; use stage 'decoder' for UniTok")
        old = tok.config.pixel_decoder
        enhanced = replace(old, ch=2 * old.ch, num_res_blocks=2 * old.num_res_blocks)
        tok.config = replace(tok.config, pixel_decoder=enhanced)
        tok.model.cfg = tok.config
        tok.model.pixel_decoder = PixelDecoder(enhanced).to(next(tok.parameters()).device)
    tok.requires_grad_(False)
    decoder_of(tok).requires_grad_(True)
    return tok
