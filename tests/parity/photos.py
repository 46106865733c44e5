"""The real photos the parity fixtures were made from (scikit-image's bundled samples, no download).

Chosen to exercise the preprocessing quirks: astronaut is 512 x 512 (the clipb BOX-halving step applies),
coffee and rocket are landscape of different aspect, chelsea's short side (300) is close to 256.
"""

from __future__ import annotations

from PIL import Image

PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket")


def photo(name: str) -> Image.Image:
    """A scikit-image sample photo as an RGB PIL image."""
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"unknown parity photo {name!r}; known: {PHOTOS}")
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
