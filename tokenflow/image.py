"""The one decode path: bytes / path / PIL image -> RGB -> tensor.

Every image that reaches a tokenizer goes through `load_image` (decode, guard, orient, convert to RGB), then a
`Preprocess` (the tokenizer's own resize/crop convention), then `to_tensor` (float32 in [-1, 1]). Decoding
an image is where most silent bugs live: 16-bit PNGs clipped to white, transparent pixels showing their
arbitrary hidden colour, EXIF-rotated phone photos fed sideways, decompression bombs eating all memory. Each
of those is handled here once, so the rest of the library can assume "an RGB image of a sane size".

Images that cannot be used raise `ImageError`, whose `reason` is a short machine-readable string, so a data
pipeline can count and skip bad samples by kind instead of parsing messages.

The preprocess modes reproduce the official code of the tokenizers we port pixel for pixel: token parity
with a published checkpoint depends on feeding it exactly the pixels it was trained on.
"""

from __future__ import annotations

import io
import math
import os
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageOps

ImageErrorReason = Literal["decode_error", "truncated", "too_large", "empty"]

# Pillow's own default for Image.MAX_IMAGE_PIXELS (~0.5 GiB of RGB). We compare against our own copy instead
# of reading or setting the global, which is process-wide and would race between threads.
MAX_PIXELS_DEFAULT = 178_956_970

# What Pillow raises for bad data: UnidentifiedImageError is an OSError; plugins also raise SyntaxError,
# ValueError, EOFError or struct.error on malformed headers.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

# Modes that carry an alpha channel; "a" is premultiplied alpha.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageError(ValueError):
    """An image that cannot be used; `reason` is one of `ImageErrorReason`."""

    def __init__(self, reason: ImageErrorReason, detail: str):
        if reason not in get_args(ImageErrorReason):
            raise ValueError(f"unknown ImageError reason {reason!r}")
        super().__init__(f"unusable image ({reason}): {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Default exception pickling re-calls cls(*self.args) with the formatted message only; keep both
        # fields so the error survives a trip from a DataLoader worker process.
        return type(self), (self.reason, self.detail)


# ------------------------------------------------------------------------------------------------------------
# decode


def load_image(
    source: bytes | str | os.PathLike | Image.Image,
    *,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode `source` into a fully loaded RGB image, upright per its EXIF orientation.

    - bytes and paths are opened with Pillow; a PIL image is used as given (its pixels are never modified,
      but it is rewound to frame 0 and loaded).
    - the pixel count in the header is checked against `max_pixels` before any pixel is decoded. Pillow's
      own global bomb check also runs inside Image.open, so `max_pixels` can tighten the limit for bytes and
      paths but not raise it past Image.MAX_IMAGE_PIXELS (which we never mutate).
    - `draft_size`: for JPEGs, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) that still keeps the
      short side >= draft_size. Much faster for big photos that will be resized down anyway.
    - animations (GIF, WEBP, APNG) give their first frame.
    - modes are converted to RGB as `to_rgb` documents (alpha on white, high bit depths scaled).

    Raises ImageError for unusable data. Errors reading a path (missing file, permissions) propagate
    unchanged: they are I/O problems, not image problems.
    """
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (str, os.PathLike)):
        # Read the whole file so no handle stays open on the returned (lazily decoded) image.
        img = open_image(source)
    else:
        img = open_image(source)
    try:
        _check_size(img.size, max_pixels)
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Only reached if a plugin runs Pillow's own global bomb check late, or warnings are errors.
        raise ImageError("too_large", str(e)) from e
    except _DECODE_ERRORS as e:
        raise _decode_error(e) from e


def open_image(source: bytes | str | os.PathLike) -> Image.Image:
    """Open (parse the header of) encoded bytes or a file, without decoding pixels; ImageError if unusable.

    Image.open only parses the header; pixels are decoded by load(). Pillow runs its global bomb check
    here, which we map to too_large like our own. A path is read into memory first so no file handle stays
    open on the returned lazily decoded image."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            source = f.read()
    data = source
    try:
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_large", str(e)) from e
    except _DECODE_ERRORS as e:
        raise _decode_error(e) from e


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, from the header alone: swapped when the EXIF orientation turns the
    image by 90 degrees (orientations 5-8)."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not a broken image; exif_transpose will ignore it too
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _decode_error(e: Exception) -> ImageError:
    # Pillow reports truncation only through the message ("image file is truncated (N bytes not processed)").
    # We never set ImageFile.LOAD_TRUNCATED_IMAGES: it is global, and half a photo is not a training sample.
    truncated = isinstance(e, OSError) and "truncated" in str(e).lower()
    return ImageError("truncated" if truncated else "decode_error", f"{type(e).__name__}: {e}")


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError("empty", f"image has zero size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError("too_large", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")


# ------------------------------------------------------------------------------------------------------------
# mode conversion


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without the usual silent losses.

    Alpha (an alpha band, or a palette / colour-key `transparency`) is composited onto white: fully
    transparent pixels have arbitrary colour (often black or garbage left by the editor), so dropping alpha
    would show it; white is what a viewer shows and what most datasets assume. 16/32-bit integer and float
    greyscale are rescaled to 8 bits rather than clipped (see `_gray_to_uint8`).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(img)).convert("RGB")
    if mode == "LAB":
        # Pillow's convert() only learned LAB in recent versions; ImageCms is the same transform everywhere.
        # Imported here: it needs Pillow built with littlecms, which nothing else requires.
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(img, lab_to_srgb)
    if _has_alpha(img):
        if mode == "La":
            img = img.convert("LA")  # Pillow has no direct La -> RGBA; this step un-premultiplies
        return _composite_on_white(img.convert("RGBA"))
    # 1, L, P, CMYK, YCbCr, HSV, RGBX: Pillow's conversions are exact for these.
    return img.convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    # Same test as Image.has_transparency_data (Pillow >= 10.1), spelled out for older Pillow.
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode.endswith("A")


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _gray_to_uint8(img: Image.Image) -> np.ndarray:
    """Rescale a high-bit-depth greyscale image to uint8 [H, W].

    Pillow's convert("L") clips: every I;16 value above 255 becomes white, so a 16-bit PNG turns into a
    near-binary mask. Instead:
    - I;16*: the full 0..65535 range maps linearly to 0..255 (x / 257, rounded; 257 * 255 == 65535).
    - I (int32): same 16-bit assumption if max <= 65535 (16-bit PNGs often open as I), else scale by the max.
    - F (float32): [0, 1] if max <= 1 (the usual float image convention), else clip to [0, 255].
    Negative values and NaNs become 0.
    """
    # float32 is exact for 16-bit integers, and x / 257 never lands near a .5 tie, so rounding is stable.
    x = np.asarray(img).astype(np.float32)
    x = np.maximum(np.nan_to_num(x, nan=0.0, neginf=0.0), 0.0)
    peak = float(x.max())
    if img.mode == "F":
        x = x * 255.0 if peak <= 1.0 else np.minimum(x, 255.0)
    else:
        x = x / 257.0 if peak <= 65535 else x * (255.0 / peak)
    return np.rint(x).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------------
# preprocess conventions


PreprocessMode = Literal["center_crop", "pad", "resize_crop"]


@dataclass(frozen=True)
class Preprocess:
    """The input convention of a tokenizer: how an RGB image of any size becomes a size x size square."""

    size: int
    """Side of the square output, e.g. 256."""
    mode: PreprocessMode = "center_crop"
    """center_crop (TokenFlow), pad (LLaVA expand2square), resize_crop (torchvision Resize + CenterCrop)."""
    resize_to: int | None = None
    """Short side before the center crop in mode resize_crop (None: size); e.g. UniTok uses 288 for 256."""
    pad_fill: tuple[int, int, int] = (127, 127, 127)
    """RGB colour of the padding in mode pad."""
    draft: bool = False
    """Let libjpeg decode JPEGs at a reduced scale (1/2, 1/4, 1/8) that keeps both sides >= the resize
    target. Much faster on large photos, but the pixels differ slightly from a full decode, so it is off for
    token parity with published checkpoints; the pipeline and `Tokenizer.preprocess` honour the same flag."""

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"Preprocess.size must be >= 1, got {self.size}")
        if self.mode not in get_args(PreprocessMode):
            raise ValueError(f"Preprocess.mode must be one of {get_args(PreprocessMode)}, got {self.mode!r}")
        if self.resize_to is not None and self.resize_to < self.size:
            raise ValueError(f"Preprocess.resize_to ({self.resize_to}) must be >= size ({self.size})")

    def load(
        self, source: bytes | str | os.PathLike | Image.Image, *, max_pixels: int = MAX_PIXELS_DEFAULT
    ) -> tuple[Image.Image, tuple[int, int]]:
        """The one decode path: decode `source` (see `load_image`) and apply this convention. Returns the
        size x size RGB image and the original (width, height) as displayed (EXIF orientation applied)."""
        img = source if isinstance(source, Image.Image) else open_image(source)
        original = oriented_size(img)
        draft = (self.resize_to or self.size) if self.draft else None
        return self.apply(load_image(img, max_pixels=max_pixels, draft_size=draft)), original

    def apply(self, img: Image.Image) -> Image.Image:
        """Return `img` as an RGB size x size image, following this convention."""
        img = to_rgb(img)
        if self.mode == "center_crop":
            return center_crop(img, self.size)
        if self.mode == "pad":
            return pad_to_square(img, self.size, self.pad_fill)
        return resize_center_crop(img, self.resize_to or self.size, self.size)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """TokenFlow's `center_crop_arr` (from ADM / LlamaGen), step for step."""
    img = resize_short_side(img, size)
    w, h = img.size
    top, left = (h - size) // 2, (w - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize_short_side(img: Image.Image, short: int) -> Image.Image:
    """ADM's resize, as TokenFlow uses it: halve with a box filter while the image is at least twice the
    target (cheap, alias-free downscaling), then one bicubic resize so the short side is `short`."""
    while min(img.size) >= 2 * short:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    # Written as `round(x * scale)` like the original (not `round(x * short / min)`): the float rounding at
    # exact .5 ties must match for token parity.
    scale = short / min(img.size)
    return img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)


def random_crop(
    img: Image.Image, size: int, rng: random.Random, min_crop_frac: float = 0.8, max_crop_frac: float = 1.0
) -> Image.Image:
    """TokenFlow's training augmentation (`random_crop_arr`, from ADM): resize so the short side is a random
    integer in [ceil(size / max_crop_frac), ceil(size / min_crop_frac)] (256..320 for 256 px), then take a
    random size x size crop. The draws come from `rng` in the official order (short side, top, left), so a
    seeded `random.Random` replays a run exactly, e.g. after resuming from a checkpoint."""
    if not 0.0 < min_crop_frac <= max_crop_frac <= 1.0:
        raise ValueError(f"need 0 < min_crop_frac <= max_crop_frac <= 1, got {min_crop_frac}, {max_crop_frac}")
    lo, hi = math.ceil(size / max_crop_frac), math.ceil(size / min_crop_frac)
    img = resize_short_side(img, rng.randrange(lo, hi + 1))
    w, h = img.size
    top, left = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
    return img.crop((left, top, left + size, top + size))


def random_flip(img: Image.Image, rng: random.Random, p: float = 0.5) -> Image.Image:
    """Mirror left-right with probability p (torchvision `RandomHorizontalFlip`, which the official training
    applies after `random_crop`)."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


def pad_to_square(img: Image.Image, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square` (centre on a square canvas of `fill`), then a bicubic resize to size x size."""
    w, h = img.size
    if w != h:
        side = max(w, h)
        canvas = Image.new(img.mode, (side, side), tuple(fill))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    return img.resize((size, size), resample=Image.BICUBIC)


def resize_center_crop(img: Image.Image, resize_to: int, size: int) -> Image.Image:
    """torchvision `Resize(resize_to)` + `CenterCrop(size)` on a PIL image (UniTok inference).

    torchvision's PIL path is `img.resize(..., Image.BILINEAR)`, which antialiases when downscaling.
    """
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = resize_to, int(resize_to * long / short)  # int() truncates, as torchvision does
    new_size = (new_short, new_long) if w <= h else (new_long, new_short)
    if new_size != img.size:
        img = img.resize(new_size, resample=Image.BILINEAR)
    w, h = img.size
    # torchvision's CenterCrop uses int(round(d / 2.0)): Python rounds ties to even, so this differs from
    # floor when h - size is odd (21.5 -> 22, but 20.5 -> 20).
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


# ------------------------------------------------------------------------------------------------------------
# tensors


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack same-size images into float32 [B, 3, H, W] in [-1, 1].

    x / 255 * 2 - 1 is bit-identical to torchvision ToTensor() + Normalize(0.5, 0.5) in float32 (scaling by
    2 commutes with rounding), which is what the tokenizers were trained on.
    """
    if len(images) == 0:
        raise ValueError("to_tensor needs at least one image")
    sizes = [img.size for img in images]
    if len(set(sizes)) != 1:
        raise ValueError(f"to_tensor needs images of one size, got (w, h) sizes {sorted(set(sizes))}")
    batch = np.stack([np.asarray(to_rgb(img), dtype=np.uint8) for img in images])  # [B, H, W, 3]
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32)
    return x.div(255.0).mul(2.0).sub(1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, 3, H, W] -> uint8 [B, H, W, 3], rounding as the official sampling scripts do.

    clamp(127.5 * x + 128, 0, 255) then truncation: the +128 (not +127.5) makes truncation round to
    nearest, so to_uint8(to_tensor(imgs)) gives back exactly the input pixels.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"to_uint8 expects a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
    x = torch.clamp(127.5 * images.detach().float() + 128.0, 0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] float [B, 3, H, W] -> list of RGB PIL images (see `to_uint8`)."""
    return [Image.fromarray(a) for a in to_uint8(images)]
