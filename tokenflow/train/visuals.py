"""PNG figures for tokenizer training logs: reconstruction grids and codebook-usage curves.

Plain PIL images, so the caller decides where they go (an MLflow artifact, a file). Matplotlib is used
through `Figure` + `FigureCanvasAgg` only: pyplot is never imported and the global backend never touched,
so nothing here depends on a display or on process-wide matplotlib state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from tokenflow.image import to_uint8

GAP = 2
"""White pixels between the cells of a reconstruction grid."""
MAX_CURVE_POINTS = 1024
"""Most points drawn per rank-frequency curve: ranks log-spaced (every rank at the head, sparse in the tail);
the curves are monotone, so the subsample keeps their shape."""


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, max_images: int = 8) -> Image.Image:
    """Originals on the top row, their reconstructions below, the first `max_images` of the batch, with
    `GAP` white pixels between cells. Inputs are [-1, 1] float (B, 3, H, W); values outside are clamped."""
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals and reconstructions differ in shape: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}"
        )
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    n = min(originals.shape[0], max_images)
    if n == 0:
        raise ValueError("reconstruction_grid needs at least one image")
    rows = (to_uint8(originals[:n]), to_uint8(reconstructions[:n]))  # (n, H, W, 3) each; to_uint8 clamps
    h, w = rows[0].shape[1:3]
    canvas = np.full((2 * h + GAP, n * w + (n - 1) * GAP, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c in range(n):
            top, left = r * (h + GAP), c * (w + GAP)
            canvas[top : top + h, left : left + w] = row[c]
    return Image.fromarray(canvas)


def sample_grid(images: torch.Tensor, captions: Sequence[str] | None = None, max_images: int = 8) -> Image.Image:
    """Generated images ([0, 1] float (B, 3, H, W)) in one row, each titled with its prompt (wrapped)."""
    import textwrap

    n = min(images.shape[0], max_images)
    if n == 0:
        raise ValueError("sample_grid needs at least one image")
    pixels = to_uint8(images[:n].float() * 2 - 1)
    fig = Figure(figsize=(2.2 * n, 2.9), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(pixels[i])
        ax.set_axis_off()
        if captions is not None:
            ax.set_title("\n".join(textwrap.wrap(captions[i], 28)[:3]), fontsize=7)
    fig.tight_layout()
    return _figure_to_image(fig)


def usage_histogram(counts: torch.Tensor, scales: Sequence[int], title: str = "") -> Image.Image:
    """Rank-frequency curves of code usage (`CodebookStats.counts`, (S, M, K)): for each scale and pooled over
    scales, the share of tokens taken by each code, sorted in decreasing order, on log-log axes.

    Unused codes cannot appear on a log axis: a curve ends at its last used code, and the legend gives
    "used / K" per curve. With M sub-codebooks the M * K (sub-codebook, code) pairs are ranked together
    (the legend then reads "used / M*K").
    """
    if counts.ndim != 3 or counts.shape[0] != len(scales):
        raise ValueError(f"counts must be (S, M, K) with S = len(scales) = {len(scales)}, got {tuple(counts.shape)}")
    c = counts.detach().to("cpu", torch.float64)
    total = c.shape[1] * c.shape[2]
    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = _scale_colors(len(scales))
    for i, side in enumerate(scales):
        _plot_curve(ax, c[i].flatten(), total, label=f"s{side}", color=colors[i], lw=1.0)
    _plot_curve(ax, c.sum(0).flatten(), total, label="all", color="black", lw=2.0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1, max(total, 2))
    ax.set_xlabel("code rank")
    ax.set_ylabel("share of tokens")
    ax.grid(True, which="major", alpha=0.3)
    if not c.any():  # no data: give the log axis limits of its own and say why it is empty
        ax.set_ylim(1e-6, 1.0)
        ax.text(0.5, 0.5, "no codes counted", transform=ax.transAxes, ha="center", va="center")
    ax.legend(title="codes used / total", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _figure_to_image(fig)


def save_png(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write `img` as PNG to `path` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def _plot_curve(ax, counts: torch.Tensor, total: int, label: str, color, lw: float) -> None:
    used = int((counts > 0).sum())
    label = f"{label}: {used} / {total}"
    if used == 0:
        ax.plot([], [], color=color, lw=lw, label=label)  # nothing counted: legend entry only
        return
    freq = torch.sort(counts, descending=True).values[:used] / counts.sum()
    ranks = np.unique(np.geomspace(1, used, min(used, MAX_CURVE_POINTS)).round().astype(np.int64))
    ax.plot(ranks, freq.numpy()[ranks - 1], color=color, lw=lw, label=label)


def _scale_colors(n: int) -> list:
    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]  # stop short of viridis' pale yellow end


def _figure_to_image(fig: Figure) -> Image.Image:
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))
