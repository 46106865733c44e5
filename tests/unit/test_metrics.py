import math

import numpy as np
import pytest
import torch

from tokenflow.metrics import psnr, ssim

skimage_data = pytest.importorskip("skimage.data")
skimage_metrics = pytest.importorskip("skimage.metrics")


def _photo_pair(name: str, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 96x128 crop of a skimage photo in [-1, 1] (float64 HWC) and a noisy, clipped copy."""
    photo = getattr(skimage_data, name)()[40:136, 60:188].astype(np.float64) / 255.0 * 2.0 - 1.0
    rng = np.random.default_rng(seed)
    return photo, np.clip(photo + rng.normal(0.0, noise, photo.shape), -1.0, 1.0)


def _bchw(*hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(hwc)).permute(0, 3, 1, 2).contiguous()


# ---- PSNR ---------------------------------------------------------------------------------------------------


def test_psnr_constant_offset_is_exact():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 1.8 - 0.9  # keep x + 0.1 inside [-1, 1]
    out = psnr(x, x + 0.1)
    assert out.shape == (2,)
    expected = 10 * math.log10(4 / 0.01)  # data_range 2: 26.0206 dB
    assert expected == pytest.approx(26.0206, abs=1e-4)
    assert out.tolist() == pytest.approx([expected, expected], abs=1e-9)


def test_psnr_float32_input_and_wrong_range_underreports_by_6db():
    x = torch.zeros(1, 3, 8, 8)
    y = x + 0.1
    assert psnr(x, y).item() == pytest.approx(26.0206, abs=1e-4)
    assert psnr(x, y).item() - psnr(x, y, data_range=1.0).item() == pytest.approx(20 * math.log10(2), abs=1e-6)


def test_psnr_is_per_image():
    x = torch.zeros(3, 3, 4, 4)
    y = x.clone()
    y[1] += 0.2  # mse 0.04 -> 10*log10(4/0.04) = 20 dB
    y[2, 0] += 0.3  # one channel: mse 0.09 / 3 = 0.03
    out = psnr(x, y)
    assert out[0].item() == math.inf
    assert out[1].item() == pytest.approx(20.0, abs=1e-5)
    assert out[2].item() == pytest.approx(10 * math.log10(4 / 0.03), abs=1e-5)


def test_psnr_identical_images_is_inf():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.isinf(psnr(x, x.clone())).all()
    assert (psnr(x, x) > 0).all()


# ---- SSIM ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
@pytest.mark.parametrize("noise", [0.02, 0.2])
def test_ssim_matches_skimage_on_photos(name, noise):
    a, b = _photo_pair(name, noise, seed=len(name))
    expected = skimage_metrics.structural_similarity(
        a, b, channel_axis=-1, data_range=2.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    got = ssim(_bchw(a), _bchw(b))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-4)
    # float32 input is accepted and computed in float64 internally
    assert ssim(_bchw(a).float(), _bchw(b).float()).item() == pytest.approx(expected, abs=1e-4)


def test_ssim_batch_is_per_image_and_data_range_is_used():
    pairs = [_photo_pair(n, 0.1, seed=i) for i, n in enumerate(["astronaut", "coffee"])]
    x, y = _bchw(*(p[0] for p in pairs)), _bchw(*(p[1] for p in pairs))
    batch = ssim(x, y)
    assert batch.shape == (2,)
    for i, (a, b) in enumerate(pairs):
        assert batch[i].item() == pytest.approx(ssim(_bchw(a), _bchw(b)).item(), abs=1e-12)
        expected = skimage_metrics.structural_similarity(
            a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert ssim(_bchw(a), _bchw(b), data_range=1.0).item() == pytest.approx(expected, abs=1e-4)


def test_ssim_identical_is_one_and_noise_lowers_it():
    a, b = _photo_pair("astronaut", 0.2, seed=0)
    assert ssim(_bchw(a), _bchw(a)).item() == pytest.approx(1.0, abs=1e-12)
    assert ssim(_bchw(a), _bchw(b)).item() < 0.9
    flat = torch.zeros(1, 3, 11, 11)  # constant image, smallest allowed size: still exactly 1
    assert ssim(flat, flat).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 10, 32), torch.zeros(1, 3, 10, 32))


# ---- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_shape_mismatch_and_non_4d_raise(fn):
    with pytest.raises(ValueError, match="one shape"):
        fn(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fn(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fn(torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 3, 16, 16))
