"""Image-quality metrics for reconstructions: PSNR and SSIM, per image, pure torch.

Inputs are float (B, C, H, W) tensors. Our images are in [-1, 1], so `data_range` defaults to 2.0, the
correct data range (max - min of the pixel scale): with 1.0 on [-1, 1] images PSNR would under-report by
20 * log10(2) = 6.02 dB and SSIM's stabilising constants would be 4x too small. Nothing is clamped: clamp
reconstructions to the pixel range first if that is what should be measured. Both compute in float64 and
return float64 (B,) tensors; both stay differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# SSIM as in Wang et al. 2004 (and skimage with gaussian_weights=True, use_sample_covariance=False).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB, 10 * log10(data_range**2 / MSE), MSE over (C, H, W); +inf for identical images."""
    x, y = _check_pair(x, y, "psnr")
    mse = (x - y).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> inf, no error


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
    population (co)variances, computed per channel over valid windows only (no padding), and averaged over
    channels and positions. Equal to skimage's `structural_similarity(..., channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` on float64 images."""
    x, y = _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(x.shape)}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _gaussian_filter(x), _gaussian_filter(y)
    var_x = _gaussian_filter(x * x) - mu_x * mu_x
    var_y = _gaussian_filter(y * y) - mu_y * mu_y
    cov = _gaussian_filter(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


def _check_pair(x: Tensor, y: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if x.ndim != 4 or y.ndim != 4:
        raise ValueError(f"{name} expects (B, C, H, W) tensors, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"{name} expects tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x.to(torch.float64), y.to(torch.float64)


def _gaussian_filter(x: Tensor) -> Tensor:
    """Separable normalised Gaussian filter of each channel, valid windows only: (B, C, H-10, W-10)."""
    c = x.shape[1]
    r = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=x.device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-0.5 * (r / SSIM_SIGMA) ** 2)
    g = g / g.sum()
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
