import ast
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tokenflow.image import to_uint8
from tokenflow.train import visuals
from tokenflow.train.visuals import GAP, reconstruction_grid, save_png, usage_histogram

# ---- reconstruction grid ------------------------------------------------------------------------------------


def test_grid_size_and_exact_pixel_placement():
    x = torch.rand(3, 3, 8, 10) * 2 - 1
    y = torch.rand(3, 3, 8, 10) * 2 - 1
    img = reconstruction_grid(x, y)
    assert img.mode == "RGB"
    assert img.size == (3 * 10 + 2 * GAP, 2 * 8 + GAP)  # (width, height)
    a = np.asarray(img)
    ox, oy = to_uint8(x), to_uint8(y)
    for c in range(3):
        left = c * (10 + GAP)
        np.testing.assert_array_equal(a[:8, left : left + 10], ox[c])
        np.testing.assert_array_equal(a[8 + GAP :, left : left + 10], oy[c])
    # gaps are white: the horizontal band between rows and the vertical bands between columns
    assert (a[8 : 8 + GAP] == 255).all()
    for c in range(2):
        left = c * (10 + GAP) + 10
        assert (a[:, left : left + GAP] == 255).all()


def test_grid_respects_max_images_and_clamps_out_of_range():
    x = torch.zeros(5, 3, 4, 4)
    y = torch.full((5, 3, 4, 4), 3.0)
    y[:, :, 0, 0] = -7.0
    img = reconstruction_grid(x, y, max_images=2)
    assert img.size == (2 * 4 + GAP, 2 * 4 + GAP)
    a = np.asarray(img)
    assert (a[:4, :4] == 128).all()  # to_uint8(0.0) == 128
    assert (a[4 + GAP, 0] == 0).all() and (a[4 + GAP :, 1:4] == 255).all()
    # fewer images than max_images: all of them, no empty columns
    assert reconstruction_grid(x[:1], y[:1], max_images=8).size == (4, 2 * 4 + GAP)


def test_grid_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_grid(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="max_images"):
        reconstruction_grid(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), max_images=0)
    with pytest.raises(ValueError):
        reconstruction_grid(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4))


# ---- usage histogram ----------------------------------------------------------------------------------------

SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _sparse_counts(k: int = 32768) -> torch.Tensor:
    """(10, 1, k) counts with most codes unused, the last scale empty (nothing counted)."""
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(SCALES), 1, k, dtype=torch.long)
    for i, s in enumerate(SCALES[:-1]):
        idx = torch.randint(0, k // 4, (s * s * 64,), generator=g) ** 2 % k  # skewed and sparse
        counts[i, 0] = torch.bincount(idx, minlength=k)
    return counts


def test_histogram_is_rgb_and_plausible_size_for_a_large_codebook():
    counts = _sparse_counts()
    assert (counts == 0).float().mean() > 0.5
    img = usage_histogram(counts, SCALES, title="step 1000")
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    w, h = img.size
    assert 400 <= w <= 2000 and 300 <= h <= 1500
    a = np.asarray(img)
    assert a.std() > 0 and (a == 255).mean() > 0.5  # something drawn on a mostly white canvas


def test_histogram_edge_cases():
    # nothing counted at all, a single code, sub-codebooks
    for counts, scales in [
        (torch.zeros(2, 1, 16, dtype=torch.long), (1, 2)),
        (torch.tensor([[[5]]]), (1,)),
        (torch.randint(0, 3, (3, 2, 100)), (1, 2, 4)),
    ]:
        assert usage_histogram(counts, scales).mode == "RGB"
    with pytest.raises(ValueError, match="S, M, K"):
        usage_histogram(torch.zeros(2, 16, dtype=torch.long), (1, 2))
    with pytest.raises(ValueError, match="S, M, K"):
        usage_histogram(torch.zeros(3, 1, 16, dtype=torch.long), (1, 2))


def test_histogram_never_imports_pyplot():
    tree = ast.parse(inspect.getsource(visuals))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if "pyplot" in m]
    code = (
        "import sys, torch\n"
        "import matplotlib\n"
        "backend = matplotlib.rcParams._get_backend_or_none()\n"
        "from tokenflow.train.visuals import usage_histogram\n"
        "usage_histogram(torch.randint(0, 5, (2, 1, 64)), (1, 2))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "assert matplotlib.rcParams._get_backend_or_none() == backend, 'global backend changed'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_save_png_round_trips(tmp_path):
    img = reconstruction_grid(torch.rand(2, 3, 6, 6) * 2 - 1, torch.rand(2, 3, 6, 6) * 2 - 1)
    path = save_png(img, tmp_path / "sub" / "grid.png")
    assert path.exists()
    with Image.open(path) as back:
        assert back.format == "PNG"
        np.testing.assert_array_equal(np.asarray(back.convert("RGB")), np.asarray(img))
