import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipelines.filters import REJECT_REASONS, FilterConfig, filter_sample
from tokenflow import Tokenizer
from tokenflow.image import Preprocess

PRE = Preprocess(size=64)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> bytes:
    return _jpeg(Image.fromarray(data.chelsea()))  # 451 x 300


def row(image=None, caption=b"a cat", meta="{}", **kw):
    return {
        "key": "k",
        "source": "s",
        "image": image,
        "caption": caption,
        "meta": meta,
        "reason": None,
        "detail": None,
        **kw,
    }


def test_kept_sample_has_pixels_size_hash_and_caption(photo):
    out = filter_sample(row(photo, caption=b"  a ginger cat \n"), FilterConfig(), PRE)
    assert out["reason"] is None and out["detail"] is None
    assert out["caption"] == "a ginger cat"
    assert (out["width"], out["height"]) == (451, 300)
    assert out["image_sha256"] == hashlib.sha256(photo).hexdigest()
    assert out["pixels"].shape == (64, 64, 3) and out["pixels"].dtype == np.uint8
    # the same pixels as the tokenizer's own preprocess of the file: one decode path
    tok = Tokenizer.from_preset("tiny")
    direct = tok.preprocess([Image.open(io.BytesIO(photo))])[0]
    assert np.array_equal(((direct.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy(), out["pixels"])


def test_exif_rotated_size_is_the_displayed_one():
    img = Image.fromarray(data.chelsea())
    exif = img.getexif()
    exif[0x0112] = 6
    out = filter_sample(row(_jpeg(img, exif=exif)), FilterConfig(), PRE)
    assert (out["width"], out["height"]) == (300, 451)


@pytest.mark.parametrize(
    "make,cfg,reason",
    [
        (lambda p: row(p, caption=None), FilterConfig(), "caption_missing"),
        (lambda p: row(p, caption=b"\xff\xfe bad"), FilterConfig(), "caption_encoding"),
        (lambda p: row(p, caption=b" \n\t "), FilterConfig(), "caption_empty"),
        (lambda p: row(p, caption=b"abc"), FilterConfig(caption_min_chars=5), "caption_too_short"),
        (lambda p: row(p, caption=b"x" * 30), FilterConfig(caption_max_chars=20), "caption_too_long"),
        (
            lambda p: row(p, meta=json.dumps({"punsafe": 0.9})),
            FilterConfig(metadata_max={"punsafe": 0.5}),
            "metadata_filter",
        ),
        (
            lambda p: row(p, meta=json.dumps({"similarity": 0.1})),
            FilterConfig(metadata_min={"similarity": 0.28}),
            "metadata_filter",
        ),
        (lambda p: row(None), FilterConfig(), "image_missing"),
        (lambda p: row(b"not an image at all"), FilterConfig(), "decode_error"),
        (lambda p: row(p[: len(p) // 2]), FilterConfig(), "truncated"),
        (lambda p: row(p), FilterConfig(max_pixels=1000), "decompression_bomb"),
        (lambda p: row(p), FilterConfig(min_side=400), "too_small"),
        (lambda p: row(p), FilterConfig(max_aspect_ratio=1.2), "aspect_ratio"),
    ],
)
def test_each_reject_reason(photo, make, cfg, reason):
    out = filter_sample(make(photo), cfg, PRE)
    assert out["reason"] == reason and out["detail"]
    assert reason in REJECT_REASONS
    assert out["pixels"] is None


def test_reader_rejections_pass_through_untouched(photo):
    r = row(None, caption=None, reason="shard_error", detail="ReadError: truncated after 3 samples")
    out = filter_sample(r, FilterConfig(), PRE)
    assert (out["reason"], out["detail"]) == ("shard_error", "ReadError: truncated after 3 samples")


def test_every_check_can_be_switched_off(photo):
    cfg = FilterConfig(min_side=None, max_aspect_ratio=None, require_caption=False, caption_max_chars=None)
    for r in (row(photo, caption=None), row(photo, caption=b"\xff"), row(photo, caption=b"  ")):
        assert filter_sample(r, cfg, PRE)["reason"] is None


def test_metadata_filters_apply_only_to_present_numeric_fields(photo):
    cfg = FilterConfig(metadata_max={"punsafe": 0.5}, metadata_min={"similarity": 0.3})
    for meta in ({}, {"punsafe": None}, {"punsafe": float("nan")}, {"punsafe": "high"}, {"similarity": 0.3}):
        assert filter_sample(row(photo, meta=json.dumps(meta)), cfg, PRE)["reason"] is None, meta


def test_config_validation():
    with pytest.raises(ValueError, match="min_side"):
        FilterConfig(min_side=0)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        FilterConfig(max_aspect_ratio=0.5)
