"""Fréchet distance between image feature distributions (FID), in plain PyTorch.

- `FeatureStats`: the mean and covariance of features, accumulated in float64 over batches (Chan et al.'s
  parallel update of the mean and the centred sum of outer products), so a 50K-image set costs one D x D matrix,
  never the features themselves; streaming equals one-shot to float64 rounding.
- `frechet_distance`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) in float64, with the trace of the matrix square
  root taken from the eigenvalues of S1 S2 as torchmetrics does (sqrt of the complex eigenvalues, real part: the
  tiny imaginary parts that rounding gives a product of two PSD matrices are dropped, as pytorch-fid and
  torchmetrics drop them).
- `Gaussian` statistics save to / load from `.npz` with keys `mu`, `sigma` and `n`, the layout pytorch-fid and
  clean-fid use (their files, without `n`, load too).
- `load_feature_extractor`: the FID Inception-v3 (torch-fidelity's `FeatureExtractorInceptionV3`, 2048-d pool
  features) from a LOCAL weights file, the TF "inception-2015-12-05" graph converted to PyTorch: torch-fidelity's
  `weights-inception-2015-12-05-6726825d.pth` or pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`. It never
  downloads. A `torch.export` archive (`.pt2`) of any other extractor loads too (tests use a small random one).

Every extractor takes uint8 images N x 3 x H x W and returns float features N x D; any `nn.Module` that does so
works with `FeatureStats.update_from_images`.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

INCEPTION_FEATURES = 2048


# ------------------------------------------------------------------------------------------------------------
# statistics


@dataclass(frozen=True)
class Gaussian:
    """Feature statistics: mean `mu` (D,), unbiased covariance `sigma` (D, D), both float64, from `n` samples
    (None for files that do not record it, like pytorch-fid's)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    meta: dict = field(default_factory=dict)
    """Scalars saved next to the arrays (e.g. `image_size`: the side the reference images were resized to)."""

    def __post_init__(self):
        mu, sigma = np.asarray(self.mu, np.float64), np.asarray(self.sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"statistics need mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str, storage_options: dict | None = None) -> None:
        """Write `.npz` with keys mu, sigma, n (-1: unknown) and the `meta` scalars; a path or an fsspec URI."""
        import fsspec

        buf = io.BytesIO()
        n = np.int64(-1 if self.n is None else self.n)
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=n, **{k: np.asarray(v) for k, v in self.meta.items()})
        fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
        fs.makedirs(fs._parent(p), exist_ok=True)
        with fs.open(p, "wb") as fh:
            fh.write(buf.getvalue())

    @classmethod
    def load(cls, path: str, storage_options: dict | None = None) -> Gaussian:
        """Read `.npz` statistics (ours, pytorch-fid's or clean-fid's: keys mu and sigma, n optional)."""
        import fsspec

        with fsspec.open(path, "rb", **(storage_options or {})) as fh:
            raw = fh.read()
        try:
            f = np.load(io.BytesIO(raw), allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not a .npz file of reference statistics: {e}") from e
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} is not a .npz file of reference statistics (a single array)")
        with f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path}: reference statistics need arrays 'mu' and 'sigma', found {f.files}")
            n = int(f["n"]) if "n" in f else -1
            meta = {k: f[k].item() for k in f.files if k not in ("mu", "sigma", "n") and f[k].ndim == 0}
            return cls(mu=f["mu"], sigma=f["sigma"], n=None if n < 0 else n, meta=meta)


class FeatureStats:
    """Streaming mean and covariance of feature vectors, in float64.

    Each batch's own mean and centred scatter are merged into the running ones (Chan, Golub, LeVeque's pairwise
    update), which keeps the precision of a two-pass computation whatever the batch sizes."""

    def __init__(self) -> None:
        self.n = 0
        self._mean: torch.Tensor | None = None
        self._scatter: torch.Tensor | None = None  # sum of (x - mean)(x - mean)^T

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features N x D (any float dtype, any device; accumulated on the CPU in float64)."""
        x = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be N x D, got shape {tuple(x.shape)}")
        nb = x.shape[0]
        if nb == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("the feature extractor returned non-finite features (NaN or inf)")
        mean_b = x.mean(0)
        xc = x - mean_b
        scatter_b = xc.T @ xc
        if self._mean is None:
            self.n, self._mean, self._scatter = nb, mean_b, scatter_b
            return
        if x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"feature dimension changed from {self._mean.shape[0]} to {x.shape[1]}")
        n = self.n + nb
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (nb / n)
        self._scatter = self._scatter + scatter_b + torch.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    @torch.no_grad()
    def update_from_images(self, extractor: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Run `extractor` on uint8 images N x 3 x H x W (moved to the extractor's device) and add the features;
        returns them."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images N x 3 x H x W, got {images.dtype} {tuple(images.shape)}")
        feats = extractor(images.to(_module_device(extractor)))
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        feats = feats.reshape(images.shape[0], -1)
        self.update(feats)
        return feats

    @property
    def dim(self) -> int | None:
        return None if self._mean is None else int(self._mean.shape[0])

    def mean(self) -> torch.Tensor:
        if self._mean is None:
            raise ValueError("no features accumulated")
        return self._mean.clone()

    def cov(self) -> torch.Tensor:
        """The unbiased (n - 1) covariance, as pytorch-fid (np.cov) and torchmetrics compute it."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        return self._scatter / (self.n - 1)

    def gaussian(self) -> Gaussian:
        return Gaussian(mu=self.mean().numpy(), sigma=self.cov().numpy(), n=self.n)


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------------------
# distance


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^1/2), where the last trace is the sum of
    the square roots of the eigenvalues of sigma1 sigma2 (real and >= 0 in exact arithmetic: those of
    sigma1^1/2 sigma2 sigma1^1/2). Rounding makes some complex or slightly negative; as torchmetrics, the real
    part of their complex square roots is summed. A large imaginary part (pytorch-fid raises above 1e-3) is
    logged as a warning: it means degenerate statistics, e.g. far fewer images than feature dimensions."""
    m1, m2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.shape[0], m1.shape[0]):
        raise ValueError(
            f"statistics of different shapes: mu {tuple(m1.shape)} vs {tuple(m2.shape)}, "
            f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)} (different feature extractors?)"
        )
    roots = torch.linalg.eigvals(s1 @ s2).sqrt()
    imag = float(roots.imag.abs().max()) if roots.numel() else 0.0
    if imag > 1e-3:
        log.warning("FID: imaginary component %.3g in the covariance square root (degenerate statistics?)", imag)
    diff = m1 - m2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * roots.real.sum())


def fid_from_stats(a: Gaussian | FeatureStats, b: Gaussian | FeatureStats) -> float:
    """FID between two sets of statistics."""
    ga = a.gaussian() if isinstance(a, FeatureStats) else a
    gb = b.gaussian() if isinstance(b, FeatureStats) else b
    return frechet_distance(ga.mu, ga.sigma, gb.mu, gb.sigma)


# ------------------------------------------------------------------------------------------------------------
# feature extractors


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception-v3: uint8 N x 3 x H x W (any size; resized to 299 x 299 inside with the TF1
    bilinear resize the original TF FID code uses) -> float32 N x 2048 pool features."""

    num_features = INCEPTION_FEATURES

    def __init__(self, state_dict: dict[str, torch.Tensor], *, path: str = "<state dict>"):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:  # pragma: no cover - the eval extra is missing
            raise ImportError(
                "the FID Inception needs torch-fidelity: pip install 'tokenflow-ray[eval]' (or torch-fidelity)"
            ) from e
        # torch-fidelity calls torch.load(path) itself (no weights_only, no map_location): give it the state dict
        # we already loaded safely on the CPU, re-serialised in memory
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        buf.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", [str(INCEPTION_FEATURES)], feature_extractor_weights_path=buf
            )
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys, shape mismatches
            raise ValueError(
                f"{path} is not a state dict of the FID Inception-v3 (torch-fidelity's "
                f"weights-inception-2015-12-05-6726825d.pth or pytorch-fid's pt_inception-2015-12-05-6726825d.pth): "
                f"{str(e)[:500]}"
            ) from e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def _is_export_archive(raw: bytes) -> bool:
    """A `torch.export.save` archive (a zip holding `*/archive_format`), as opposed to a `torch.save` file."""
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        return False
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        return any(n.endswith("/archive_format") or n == "archive_format" for n in z.namelist())


def load_feature_extractor(
    path: str, device: str | torch.device = "cpu", storage_options: dict | None = None
) -> nn.Module:
    """The FID feature extractor stored at `path` (a local path or an fsspec URI; nothing is downloaded), in eval
    mode on `device`:

    - the FID Inception-v3 state dict (see the module docstring) -> `InceptionFeatures` (2048-d);
    - a `torch.export.save` archive (`.pt2`) of a module mapping uint8 N x 3 x H x W to N x D features.

    The state dict is read with `torch.load(weights_only=True)`: tensors only, no code from the file runs."""
    import fsspec

    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as fh:
            raw = fh.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"FID feature extractor weights not found: {path} (download pt_inception-2015-12-05-6726825d.pth "
            "once and give its local path)"
        ) from e
    if _is_export_archive(raw):
        try:
            module = torch.export.load(io.BytesIO(raw)).module()
        except Exception as e:
            raise ValueError(f"{path}: cannot load the torch.export archive: {type(e).__name__}: {e}") from e
        return module.to(device)
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is neither a PyTorch state dict nor a torch.export archive: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensors)")
    return InceptionFeatures(state, path=path).to(device).eval()
