"""Decode, validate and filter one sample: the CPU stage before deduplication and tokenization.

Input rows follow the reader contract of `pipelines.sources` (key, source, image bytes, caption bytes, meta JSON,
reason, detail; llava rows also `conversations`). `filter_sample` returns the row with its verdict and what later
stages need:

    reason, detail   None for a kept sample, else one of REJECT_REASONS and a human-readable detail
    caption          the caption as str (None when it could not be decoded)
    width, height    original size as displayed (EXIF orientation applied); None when not decodable
    image_sha256     hex digest of the encoded image bytes (exact-duplicate key); None without an image
    pixels           uint8 (S, S, 3) array in the tokenizer's input convention for kept samples, else None

Checks run cheapest first (source faults, caption, metadata, then the image decode), and the first failing
check names the reason, so every rejected sample has exactly one reason. Nothing here raises for bad data.

Conversation rows (llava: `conversations` is set) have no caption: the caption checks do not apply to them (their
turns were checked for shape by the reader, the rest is the training job's chat template). One without an image is
a text-only sample, kept without pixels (so without tokens); one with an image is decoded and checked as any other.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

from tokenflow.image import MAX_PIXELS_DEFAULT, ImageError, Preprocess

# The closed set of reject reasons, in the order checks run; documented in the README. `clip_score` and
# `duplicate` are decided by later stages.
REJECT_REASONS = (
    "shard_error",  # the input shard could not be read (past this point); one row per fault
    # llava: an annotation entry that is not an object with a non-empty list of {from, value} string turns (or a
    # JSON Lines line that is not JSON); turn order and roles are checked later, by the training job's template
    "conversations_invalid",
    "image_missing",  # no image in the sample
    "caption_missing",
    "caption_encoding",  # caption bytes are not valid UTF-8
    "caption_empty",  # only whitespace
    "caption_too_short",
    "caption_too_long",
    "metadata_filter",  # a metadata threshold failed (e.g. punsafe, pwatermark, similarity)
    "decode_error",  # corrupt or unidentifiable image data
    "truncated",  # image data ends early
    "decompression_bomb",  # more pixels than max_pixels
    "too_small",  # shorter side below min_side
    "aspect_ratio",  # long side / short side above max_aspect_ratio
    "clip_score",  # below the CLIP-score threshold (optional stage)
    "duplicate",  # same image bytes as a kept sample (kept: the first committed; within a shard the smallest key)
)

_IMAGE_REASONS = {
    "decode_error": "decode_error",
    "empty": "decode_error",
    "truncated": "truncated",
    "too_large": "decompression_bomb",
}  # tokenflow.image.ImageError.reason -> reject reason


@dataclass(kw_only=True)
class FilterConfig:
    """Quality filters; every check can be switched off (None / False / empty)."""

    min_side: int | None = 64
    """Reject images whose shorter side (original size) is below this; None disables."""
    max_aspect_ratio: float | None = 3.0
    """Reject images whose long/short side ratio is above this; None disables."""
    require_caption: bool = True
    """Reject samples without a caption, or whose caption is not UTF-8 or only whitespace."""
    caption_min_chars: int = 1
    """Minimum caption length in characters after stripping (with require_caption)."""
    caption_max_chars: int | None = 2000
    """Maximum caption length in characters after stripping; None disables."""
    metadata_min: dict[str, float] = field(default_factory=dict)
    """Lower bounds on numeric metadata fields, applied when a sample has the field (e.g. similarity: 0.28)."""
    metadata_max: dict[str, float] = field(default_factory=dict)
    """Upper bounds on numeric metadata fields, applied when present (e.g. punsafe: 0.5, pwatermark: 0.8)."""
    max_pixels: int = MAX_PIXELS_DEFAULT
    """Decompression-bomb guard: images with more pixels are rejected before decoding."""

    def __post_init__(self) -> None:
        if self.min_side is not None and self.min_side < 1:
            raise ValueError("min_side must be >= 1 or None")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError("max_aspect_ratio must be >= 1 or None")
        if self.caption_max_chars is not None and self.caption_max_chars < self.caption_min_chars:
            raise ValueError("caption_max_chars must be >= caption_min_chars")


def filter_sample(row: dict, cfg: FilterConfig, preprocess: Preprocess) -> dict:
    """The verdict for one reader row, with the fields listed in the module docstring."""
    out = dict(row)
    out.update(caption=None, width=None, height=None, image_sha256=None, pixels=None)
    image = row.get("image")
    if image is not None:
        out["image_sha256"] = hashlib.sha256(image).hexdigest()
    if row.get("reason"):  # already a rejection from the reader (shard_error, image_missing)
        return out

    conversation = row.get("conversations") is not None
    if conversation:  # llava: the turns are the text; a caption is neither needed nor read
        caption, reason, detail = None, None, None
    else:
        caption, reason, detail = _check_caption(row.get("caption"), cfg)
    out["caption"] = caption
    if reason is None:
        reason, detail = _check_metadata(row.get("meta") or "{}", cfg)
    if reason is None and image is None:
        if conversation:
            return out  # a text-only conversation: kept, no pixels
        reason, detail = "image_missing", "no image bytes"
    if reason is not None:
        return _reject(out, reason, detail)

    try:
        pixels, (w, h) = preprocess.load(image, max_pixels=cfg.max_pixels)
    except ImageError as e:
        return _reject(out, _IMAGE_REASONS[e.reason], str(e))
    out["width"], out["height"] = w, h
    short, long = min(w, h), max(w, h)
    if cfg.min_side is not None and short < cfg.min_side:
        return _reject(out, "too_small", f"{w}x{h}: shorter side {short} < {cfg.min_side}")
    if cfg.max_aspect_ratio is not None and long / short > cfg.max_aspect_ratio:
        return _reject(out, "aspect_ratio", f"{w}x{h}: aspect ratio {long / short:.2f} > {cfg.max_aspect_ratio}")
    out["pixels"] = np.asarray(pixels, dtype=np.uint8)
    return out


def _reject(out: dict, reason: str, detail: str) -> dict:
    out["reason"], out["detail"] = reason, detail
    return out


def _check_caption(raw: bytes | str | None, cfg: FilterConfig) -> tuple[str | None, str | None, str | None]:
    """(decoded caption, reason, detail)."""
    if raw is None:
        return (None, "caption_missing", "no caption") if cfg.require_caption else (None, None, None)
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            if cfg.require_caption:
                return None, "caption_encoding", f"caption is not valid UTF-8: {e}"
            return None, None, None
    text = text.strip()
    if not cfg.require_caption:
        return text, None, None
    if not text:
        return text, "caption_empty", "caption is empty after stripping whitespace"
    if len(text) < cfg.caption_min_chars:
        return text, "caption_too_short", f"{len(text)} characters < {cfg.caption_min_chars}"
    if cfg.caption_max_chars is not None and len(text) > cfg.caption_max_chars:
        return text, "caption_too_long", f"{len(text)} characters > {cfg.caption_max_chars}"
    return text, None, None


def _check_metadata(meta_json: str, cfg: FilterConfig) -> tuple[str | None, str | None]:
    if not (cfg.metadata_min or cfg.metadata_max):
        return None, None
    try:
        meta = json.loads(meta_json)
    except ValueError:
        meta = {}
    for name, bound in cfg.metadata_min.items():
        value = _number(meta.get(name))
        if value is not None and value < bound:
            return "metadata_filter", f"{name}={value} < {bound}"
    for name, bound in cfg.metadata_max.items():
        value = _number(meta.get(name))
        if value is not None and value > bound:
            return "metadata_filter", f"{name}={value} > {bound}"
    return None, None


def _number(value) -> float | None:
    """A finite float from a metadata value, or None when absent, not numeric or NaN: an unknown value does not
    fail a threshold (LAION has nulls in punsafe/pwatermark)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
