"""Tests for tokenflow.image: decoding, mode conversion, preprocess conventions, tensor conversion.

Expected values are exact and hand-computed wherever the operation is exact; approximate checks are kept to
lossy steps (JPEG, colour-management transforms, alpha blending at partial opacity).
"""

import io
import pickle
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from skimage import data

from tokenflow.image import (
    MAX_PIXELS_DEFAULT,
    ImageError,
    Preprocess,
    load_image,
    random_crop,
    random_flip,
    resize_short_side,
    to_pil,
    to_rgb,
    to_tensor,
    to_uint8,
)

WHITE = (255, 255, 255)


def pixels(img: Image.Image) -> list[tuple[int, int, int]]:
    """Row-major list of RGB pixels of an RGB image."""
    assert img.mode == "RGB"
    return [tuple(int(v) for v in p) for p in np.asarray(img).reshape(-1, 3)]


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photo() -> Image.Image:
    """A real photo (451 x 300, not square), so orientation and JPEG behave as on real data."""
    return Image.fromarray(data.chelsea())


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h but whose pixel data is garbage: cheap to make at any size."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def palette(*colours: tuple[int, int, int]) -> list[int]:
    flat = [c for rgb in colours for c in rgb]
    return flat + [0] * (768 - len(flat))


# ------------------------------------------------------------------------------------------------------------
# mode conversion


def test_rgb_is_returned_as_is():
    img = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(img) is img


def test_mode_1():
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    assert pixels(to_rgb(img)) == [(0, 0, 0), WHITE]


def test_mode_l():
    img = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), "L")
    assert pixels(to_rgb(img)) == [(0, 0, 0), (77, 77, 77), WHITE]


def test_mode_p_without_transparency():
    img = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    img.putpalette(palette((0, 0, 0), (10, 20, 30), (200, 100, 50)))
    assert pixels(to_rgb(img)) == [(0, 0, 0), (10, 20, 30), (200, 100, 50)]


def test_mode_p_with_transparent_index_goes_to_white():
    # Index 1 is transparent: its palette colour (10, 20, 30) must not show.
    img = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    img.putpalette(palette((0, 0, 0), (10, 20, 30), (200, 100, 50)))
    img.info["transparency"] = 1
    assert pixels(to_rgb(img)) == [(0, 0, 0), WHITE, (200, 100, 50)]


def test_mode_p_with_transparency_through_png_and_gif():
    img = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    img.putpalette(palette((0, 0, 0), (10, 20, 30), (200, 100, 50)))
    for fmt in ("PNG", "GIF"):
        loaded = load_image(encode(img, fmt, transparency=1))
        assert pixels(loaded) == [(0, 0, 0), WHITE, (200, 100, 50)], fmt


def test_mode_la():
    img = Image.new("LA", (3, 1))
    img.putpixel((0, 0), (50, 0))
    img.putpixel((1, 0), (50, 255))
    img.putpixel((2, 0), (0, 255))
    assert pixels(to_rgb(img)) == [WHITE, (50, 50, 50), (0, 0, 0)]


def test_mode_pa():
    img = Image.new("PA", (2, 1))
    img.putpalette(palette((0, 0, 0), (10, 20, 30)))
    img.putpixel((0, 0), (1, 255))
    img.putpixel((1, 0), (1, 0))
    assert pixels(to_rgb(img)) == [(10, 20, 30), WHITE]


def test_mode_rgba():
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: hidden colour must not leak
    img.putpixel((1, 0), (10, 20, 30, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black on white: mid grey
    out = pixels(to_rgb(img))
    assert out[:2] == [WHITE, (10, 20, 30)]
    assert all(abs(v - 127) <= 1 for v in out[2])


def test_mode_rgba_through_png():
    img = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    img.putpixel((1, 0), (10, 20, 30, 255))
    assert pixels(load_image(encode(img, "PNG"))) == [WHITE, (10, 20, 30)]


def test_mode_rgba_premultiplied():
    img = Image.new("RGBa", (3, 1))
    img.putpixel((0, 0), (0, 0, 0, 0))
    img.putpixel((1, 0), (100, 50, 0, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))
    out = pixels(to_rgb(img))
    assert out[:2] == [WHITE, (100, 50, 0)]
    assert all(abs(v - 127) <= 1 for v in out[2])


def test_mode_la_premultiplied():
    img = Image.new("La", (2, 1))
    img.putpixel((0, 0), (0, 0))
    img.putpixel((1, 0), (100, 255))
    assert pixels(to_rgb(img)) == [WHITE, (100, 100, 100)]


def test_mode_cmyk():
    img = Image.new("CMYK", (4, 1))
    img.putpixel((0, 0), (0, 0, 0, 0))
    img.putpixel((1, 0), (0, 0, 0, 255))
    img.putpixel((2, 0), (255, 0, 0, 0))
    img.putpixel((3, 0), (0, 255, 255, 0))
    assert pixels(to_rgb(img)) == [WHITE, (0, 0, 0), (0, 255, 255), (255, 0, 0)]


def test_mode_ycbcr():
    img = Image.new("YCbCr", (3, 1))
    img.putpixel((0, 0), (255, 128, 128))
    img.putpixel((1, 0), (0, 128, 128))
    img.putpixel((2, 0), (76, 85, 255))  # BT.601 red
    out = pixels(to_rgb(img))
    assert out[:2] == [WHITE, (0, 0, 0)]
    assert np.abs(np.array(out[2]) - (255, 0, 0)).max() <= 2


def test_mode_lab():
    # L 0..255 <-> L* 0..100; a, b stored with +128 offset, so 128 is neutral.
    img = Image.new("LAB", (4, 1))
    img.putpixel((0, 0), (255, 128, 128))
    img.putpixel((1, 0), (0, 128, 128))
    img.putpixel((2, 0), (128, 128, 128))
    img.putpixel((3, 0), (128, 200, 128))  # a* > 0: red-magenta
    white, black, grey, reddish = pixels(to_rgb(img))
    assert min(white) >= 253 and max(black) <= 2
    assert max(grey) - min(grey) <= 1 and abs(grey[0] - 119) <= 1  # L* = 50.2 is sRGB 119
    assert reddish[0] > 200 and reddish[1] < 60


def test_mode_hsv():
    img = Image.new("HSV", (4, 1))
    for x, hsv in enumerate([(0, 255, 255), (85, 255, 255), (170, 255, 255), (0, 0, 200)]):
        img.putpixel((x, 0), hsv)
    assert pixels(to_rgb(img)) == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 200)]


I16_VALUES = [0, 257, 1000, 32896, 65535]
I16_EXPECTED = [0, 1, 4, 128, 255]  # x / 257 rounded; 1000 / 257 = 3.89


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2")])
def test_mode_i16_scales_full_range(mode, dtype):
    raw = np.array([I16_VALUES], dtype=dtype)
    img = Image.frombytes(mode, (len(I16_VALUES), 1), raw.tobytes())
    assert [img.getpixel((x, 0)) for x in range(len(I16_VALUES))] == I16_VALUES  # built as intended
    assert pixels(to_rgb(img)) == [(v, v, v) for v in I16_EXPECTED]


def test_mode_i16_png_is_not_clipped():
    img = Image.frombytes("I;16", (len(I16_VALUES), 1), np.array(I16_VALUES, dtype="<u2").tobytes())
    # The bug we guard against: plain convert("L") saturates everything above 255.
    assert np.asarray(img.convert("L")).tolist() == [[0, 255, 255, 255, 255]]
    assert pixels(load_image(encode(img, "PNG"))) == [(v, v, v) for v in I16_EXPECTED]


def test_mode_i_16bit_range():
    img = Image.fromarray(np.array([[-5, 0, 257, 32896, 65535]], dtype=np.int32), "I")
    assert pixels(to_rgb(img)) == [(v, v, v) for v in [0, 0, 1, 128, 255]]


def test_mode_i_beyond_16bit_scales_by_max():
    img = Image.fromarray(np.array([[0, 400_000, 1_000_000]], dtype=np.int32), "I")
    assert pixels(to_rgb(img)) == [(v, v, v) for v in [0, 102, 255]]  # 400k / 1M * 255 = 102


def test_mode_f_unit_range():
    img = Image.fromarray(np.array([[0.0, 0.25, 1.0, -0.5, np.nan]], dtype=np.float32), "F")
    assert pixels(to_rgb(img)) == [(v, v, v) for v in [0, 64, 255, 0, 0]]  # 0.25 * 255 = 63.75


def test_mode_f_byte_range_is_clipped():
    img = Image.fromarray(np.array([[0.0, 10.4, 128.0, 300.0, -5.0]], dtype=np.float32), "F")
    assert pixels(to_rgb(img)) == [(v, v, v) for v in [0, 10, 128, 255, 0]]


# ------------------------------------------------------------------------------------------------------------
# load_image


@pytest.mark.parametrize("orientation,transpose", [(3, Image.ROTATE_180), (6, Image.ROTATE_270), (8, Image.ROTATE_90)])
def test_exif_orientation(orientation, transpose):
    original = photo()
    exif = original.getexif()
    exif[0x0112] = orientation
    loaded = load_image(encode(original, "JPEG", quality=95, exif=exif))

    expected = original.transpose(transpose)
    assert loaded.mode == "RGB"
    assert loaded.size == expected.size
    if orientation != 3:
        assert loaded.size == (original.height, original.width)
    diff = np.abs(np.asarray(loaded, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.mean() < 3
    # ...and not by accident: ignoring the tag would be far off.
    wrong = original.transpose(Image.ROTATE_90 if orientation == 6 else Image.ROTATE_270)
    if orientation == 3:
        wrong = original
    wrong_diff = np.abs(np.asarray(loaded, dtype=np.int16) - np.asarray(wrong, dtype=np.int16))
    assert wrong_diff.mean() > 20


def test_animated_gif_gives_first_frame():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (4, 4), c) for c in colours]
    blob = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(blob)).n_frames == 3
    assert pixels(load_image(blob)) == [colours[0]] * 16

    # A PIL image left on a later frame is rewound too.
    gif = Image.open(io.BytesIO(blob))
    gif.seek(2)
    assert pixels(load_image(gif)) == [colours[0]] * 16


def test_animated_webp_gives_first_frame():
    colours = [(255, 0, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 8), c) for c in colours]
    blob = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert pixels(load_image(blob)) == [colours[0]] * 64


def test_paths(tmp_path):
    img = Image.new("RGB", (3, 2), (9, 8, 7))
    path = tmp_path / "x.png"
    img.save(path)
    assert pixels(load_image(path)) == [(9, 8, 7)] * 6
    assert pixels(load_image(str(path))) == [(9, 8, 7)] * 6
    with pytest.raises(FileNotFoundError):  # I/O errors are not image errors
        load_image(tmp_path / "missing.png")


def test_pil_image_is_not_modified():
    img = Image.new("RGBA", (2, 2), (1, 2, 3, 0))
    out = load_image(img)
    assert pixels(out) == [WHITE] * 4
    assert img.mode == "RGBA" and img.getpixel((0, 0)) == (1, 2, 3, 0)


@pytest.mark.parametrize("blob", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64])
def test_corrupt_bytes(blob):
    with pytest.raises(ImageError) as info:
        load_image(blob)
    assert info.value.reason == "decode_error"
    assert "decode_error" in str(info.value)


def test_truncated_jpeg():
    blob = encode(photo(), "JPEG", quality=95)
    with pytest.raises(ImageError) as info:
        load_image(blob[: len(blob) // 2])
    assert info.value.reason == "truncated"
    assert "truncated" in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_huge_header_is_too_large_and_globals_untouched():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    with pytest.raises(ImageError) as info:
        load_image(png_header_only(20_000, 20_000))
    assert info.value.reason == "too_large"
    assert "too_large" in str(info.value)
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    assert MAX_PIXELS_DEFAULT == 178_956_970


def test_size_is_checked_before_decoding():
    # The pixel data is garbage, so decoding would fail with decode_error; too_large proves the header check
    # came first.
    blob = png_header_only(11, 11)
    with pytest.raises(ImageError) as info:
        load_image(blob, max_pixels=100)
    assert info.value.reason == "too_large"
    with pytest.raises(ImageError) as info:
        load_image(blob, max_pixels=121)
    assert info.value.reason == "decode_error"


def test_max_pixels_on_valid_image():
    blob = encode(Image.new("RGB", (10, 10)), "PNG")
    assert load_image(blob, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageError, match="too_large"):
        load_image(blob, max_pixels=99)


def test_empty_image():
    with pytest.raises(ImageError) as info:
        load_image(Image.new("RGB", (0, 5)))
    assert info.value.reason == "empty"


def test_image_error_is_value_error_and_pickles():
    err = ImageError("truncated", "half a file")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.detail, str(back)) == ("truncated", "half a file", str(err))
    with pytest.raises(ValueError):
        ImageError("bogus", "x")


def test_draft_keeps_short_side():
    blob = encode(photo().resize((1024, 768)), "JPEG", quality=90)
    assert load_image(blob).size == (1024, 768)
    drafted = load_image(blob, draft_size=256)
    assert 256 <= min(drafted.size) < 768
    assert drafted.size == (512, 384)  # libjpeg scales by 1/2: 1/4 would make the short side 192
    assert load_image(blob, draft_size=96).size == (128, 96)  # 1/8 is exactly enough
    assert load_image(blob, draft_size=1000).size == (1024, 768)  # never below the request
    # Non-JPEG formats ignore the draft.
    assert load_image(encode(Image.new("RGB", (1024, 768)), "PNG"), draft_size=256).size == (1024, 768)


# ------------------------------------------------------------------------------------------------------------
# Preprocess


def coded(w: int, h: int) -> Image.Image:
    """R = row, G = column (mod 256): crop offsets can be read off the top-left pixel."""
    rows, cols = np.mgrid[0:h, 0:w]
    arr = np.stack([rows % 256, cols % 256, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def test_preprocess_validation():
    with pytest.raises(ValueError):
        Preprocess(0)
    with pytest.raises(ValueError):
        Preprocess(256, mode="squash")
    with pytest.raises(ValueError):
        Preprocess(256, mode="resize_crop", resize_to=255)
    assert Preprocess(256, mode="resize_crop", resize_to=256).resize_to == 256


@pytest.mark.parametrize("mode", ["center_crop", "pad", "resize_crop"])
@pytest.mark.parametrize("wh", [(1100, 600), (600, 1100), (256, 256), (300, 1000), (50, 40)])
def test_preprocess_output_size(mode, wh):
    pre = Preprocess(256, mode=mode, resize_to=288 if mode == "resize_crop" else None)
    out = pre.apply(Image.new("RGB", wh, (5, 6, 7)))
    assert out.mode == "RGB" and out.size == (256, 256)


def test_preprocess_converts_to_rgb():
    out = Preprocess(4).apply(Image.new("RGBA", (8, 8), (1, 2, 3, 0)))
    assert pixels(out) == [WHITE] * 16


def test_center_crop_matches_reference():
    img = Image.fromarray(data.astronaut()).resize((1100, 600), Image.BICUBIC)
    # Hand-computed: 600 >= 2 * 256 so halve once (550 x 300); bicubic to short side 256, long side
    # round(550 * 256 / 300) = 469; crop left = (469 - 256) // 2 = 106, top = 0.
    ref = img.resize((550, 300), Image.BOX).resize((469, 256), Image.BICUBIC).crop((106, 0, 362, 256))
    out = Preprocess(256, mode="center_crop").apply(img)
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    # The halving step is observable: skipping it gives different pixels.
    skipped = img.resize((469, 256), Image.BICUBIC).crop((106, 0, 362, 256))
    assert not np.array_equal(np.asarray(out), np.asarray(skipped))


def test_center_crop_offset_floors():
    out = Preprocess(256, mode="center_crop").apply(coded(256, 299))  # no resize; 43 spare rows
    assert out.getpixel((0, 0)) == (21, 0, 0)  # (299 - 256) // 2


def test_random_crop_follows_the_official_draws():
    """Short side drawn from [256, 320] first, then top, then left, all from the given generator: a replay of
    the same seed reproduces the crop, which is what resuming a training run relies on."""
    img = Image.fromarray(data.astronaut()).resize((1100, 600), Image.BICUBIC)
    for seed in range(5):
        out = random_crop(img, 256, random.Random(seed))
        replay = random.Random(seed)
        short = replay.randrange(256, 321)
        resized = resize_short_side(img, short)
        top, left = replay.randrange(resized.height - 255), replay.randrange(resized.width - 255)
        assert np.array_equal(np.asarray(out), np.asarray(resized.crop((left, top, left + 256, top + 256))))


def test_random_crop_sizes_and_edge_cases():
    rng = random.Random(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    crops = {np.asarray(random_crop(img, 64, rng)).tobytes() for _ in range(20)}
    assert len(crops) == 20  # every draw a different crop
    assert all(random_crop(img, 64, rng, min_crop_frac=0.5).size == (64, 64) for _ in range(20))
    # no slack (crop fraction 1, image already the target size): the whole image, unchanged
    same = random_crop(coded(64, 64), 64, random.Random(1), min_crop_frac=1.0)
    assert np.array_equal(np.asarray(same), np.asarray(coded(64, 64)))
    with pytest.raises(ValueError, match="min_crop_frac"):
        random_crop(img, 64, rng, min_crop_frac=0.0)


def test_random_flip_mirrors_with_probability_half():
    img = coded(8, 4)
    flips = [random_flip(img, random.Random(seed)).getpixel((0, 0))[1] == 7 for seed in range(400)]
    assert 150 < sum(flips) < 250
    assert np.array_equal(np.asarray(random_flip(img, random.Random(0), p=1.0))[:, ::-1], np.asarray(img))
    assert random_flip(img, random.Random(0), p=0.0) is img


def test_pad_fills_with_pad_fill():
    fill = (10, 20, 30)
    wide = Preprocess(64, mode="pad", pad_fill=fill).apply(Image.new("RGB", (200, 100), (255, 0, 0)))
    assert wide.getpixel((0, 0)) == fill and wide.getpixel((63, 63)) == fill
    assert wide.getpixel((32, 32)) == (255, 0, 0) and wide.getpixel((0, 32)) == (255, 0, 0)
    tall = Preprocess(64, mode="pad", pad_fill=fill).apply(Image.new("RGB", (100, 200), (255, 0, 0)))
    assert tall.getpixel((0, 0)) == fill and tall.getpixel((32, 0)) == (255, 0, 0)


def test_pad_matches_reference():
    img = Image.fromarray(data.astronaut()).resize((300, 200), Image.BICUBIC)
    canvas = Image.new("RGB", (300, 300), (127, 127, 127))
    canvas.paste(img, (0, 50))
    ref = canvas.resize((224, 224), Image.BICUBIC)
    out = Preprocess(224, mode="pad").apply(img)
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_resize_crop_matches_reference():
    img = Image.fromarray(data.astronaut()).resize((500, 300), Image.BICUBIC)
    # Short side 300 -> 288, long side int(288 * 500 / 300) = 480; crop left = round(224 / 2) = 112,
    # top = round(32 / 2) = 16.
    ref = img.resize((480, 288), Image.BILINEAR).crop((112, 16, 368, 272))
    out = Preprocess(256, mode="resize_crop", resize_to=288).apply(img)
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_resize_crop_offset_rounds_like_torchvision():
    # No resize (short side already 288); 43 spare rows: round(21.5) = 22 (ties to even), floor would be 21.
    out = Preprocess(256, mode="resize_crop", resize_to=288).apply(coded(288, 299))
    assert out.getpixel((0, 0)) == (22, 16, 0)


def test_resize_crop_defaults_to_size():
    out = Preprocess(256, mode="resize_crop").apply(coded(256, 299))
    assert out.getpixel((0, 0)) == (22, 0, 0)


# ------------------------------------------------------------------------------------------------------------
# tensors


def all_values_image() -> Image.Image:
    r = np.arange(256, dtype=np.int64).reshape(16, 16)
    return Image.fromarray(np.stack([r, 255 - r, (r * 7) % 256], axis=-1).astype(np.uint8))


def test_to_tensor_values():
    img = all_values_image()
    x = to_tensor([img, img])
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert x[0, 0, 0, 0].item() == -1.0 and x[0, 0, 15, 15].item() == 1.0
    assert x[0, 1, 0, 0].item() == 1.0  # channel 1 is G = 255 - R
    # Bit-identical to torchvision ToTensor() + Normalize(0.5, 0.5).
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    assert torch.equal(x[0], (ref - 0.5) / 0.5)


def test_to_tensor_rejects_mixed_sizes():
    with pytest.raises(ValueError, match=r"\(2, 1\).*\(3, 1\)"):
        to_tensor([Image.new("RGB", (2, 1)), Image.new("RGB", (3, 1))])
    with pytest.raises(ValueError):
        to_tensor([])


def test_to_uint8_round_trip_is_exact():
    img = all_values_image()
    arr = to_uint8(to_tensor([img]))
    assert arr.dtype == np.uint8 and arr.shape == (1, 16, 16, 3)
    assert np.array_equal(arr[0], np.asarray(img))
    (back,) = to_pil(to_tensor([img]))
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(img))


def test_to_uint8_rounding_and_clamping():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    # 127.5 * x + 128, clamped, truncated: 0 -> 128 (the official convention), 0.999 -> 255.37 -> 255.
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 255]
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(3, 4, 4))
