"""Evaluate generated images: FID against a reference set and CLIP score against their prompts.

Inputs:
- `generated`: a `jobs/generate.py` output directory (path or URI): `images/<index:05d>.png` and `samples.parquet`
  (index, prompt, seed, tokens). GenEval's layout (`--geneval-layout`) is refused with a pointer to GenEval's own
  evaluator: its prompts test composition, not a distribution to compare with FID.
- `reference`: a directory (searched recursively for image files), a glob, or a `.npz` of reference statistics
  (`mu`, `sigma`, `n`: ours, pytorch-fid's or clean-fid's). Paths or fsspec URIs (s3://...). Reference images go
  through the project's one decode path (`tokenflow.image`: EXIF orientation, alpha on white, 16-bit scaled) and
  are resized and centre-cropped to the generated images' side (`image_size`) with ADM's `center_crop_arr`
  (`tokenflow.image.center_crop`: box-filter halving while the image is at least twice the target, one bicubic
  resize of the short side, then the centre square), the convention of ADM's and LlamaGen's FID reference batches.
  A file that does not decode is counted and listed in `reference_rejects`, never dropped silently; non-image
  files in a reference directory (captions, JSON) are counted in `n_reference_ignored`.

Metrics:
- `fid`: the Fréchet distance between the Inception-v3 pool features (2048-d, `tokenflow.fid`) of the generated
  and the reference images; both sets reach the Inception at the same side, which resizes them to 299 inside.
- `clip_score`: torchmetrics' CLIPScore convention, the mean over images of 100 * max(cos, 0), where cos is the
  cosine between the open_clip embeddings of an image and its own prompt (from samples.parquet);
  `clip_cosine` is the raw mean cosine.

Images stream through in batches (features accumulate into float64 statistics), so memory does not grow with the
number of images. This module knows nothing of Ray or MLflow (`jobs/eval_t2i.py` logs the result).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("eval_t2i")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_GLOB_CHARS = ("*", "?", "[")


@dataclass(kw_only=True)
class EvalT2IConfig:
    generated: str
    """A `jobs/generate.py` output directory (images/ + samples.parquet), path or URI."""
    reference: str | None = None
    """Reference set for FID: a directory of images, a glob, or a `.npz` of statistics (mu, sigma, n)."""
    inception: str | None = None
    """The FID feature extractor: a local path (or URI) of the FID Inception-v3 weights
    (pt_inception-2015-12-05-6726825d.pth), or a `torch.export` archive of another extractor; never downloaded."""
    clip_model: str | None = None
    """open_clip model name for the CLIP score; None skips the CLIP score."""
    clip_pretrained: str | None = None
    """open_clip pretrained tag (downloads when online) or a local checkpoint path."""
    clip_model_config: str | None = None
    """A JSON open_clip model config to register first (custom architectures; its file name is the model name)."""
    batch_size: int = 50
    device: str = "auto"
    """auto (CUDA when visible), cpu, cuda or cuda:N."""
    image_size: int | None = None
    """Side the reference images are resized and centre-cropped to; default the generated images' side."""
    save_reference_stats: str | None = None
    """Write the reference statistics here (.npz) to reuse them as `reference` later."""
    limit: int | None = None
    """Use at most this many generated images (lowest indices) and reference images (sorted paths); a quick check
    only: FID is biased upwards on small sets."""
    workers: int = 8
    """Threads reading and decoding images."""
    s3_endpoint: str | None = None
    """S3-compatible endpoint for s3:// paths (credentials from the AWS environment)."""

    def __post_init__(self) -> None:
        for f in ("reference", "inception", "clip_model", "clip_pretrained", "clip_model_config"):
            if getattr(self, f) == "":
                setattr(self, f, None)  # an empty flag (e.g. --reference "$UNSET") means not given
        if self.save_reference_stats == "":
            self.save_reference_stats = None
        if min(self.batch_size, self.workers) < 1:
            raise ValueError("batch_size and workers must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError("image_size must be >= 1")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.inception is None and self.clip_model is None:
            raise ValueError("nothing to evaluate: give the FID Inception weights (--inception) and/or a CLIP model")
        if (self.inception is None) != (self.reference is None):
            raise ValueError("FID needs both the reference set (--reference) and the Inception weights (--inception)")
        if self.save_reference_stats and self.inception is None:
            raise ValueError("save_reference_stats needs the FID inputs (--reference, --inception)")

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.s3_endpoint} if self.s3_endpoint else {}

    @property
    def reference_is_stats(self) -> bool:
        return self.reference is not None and self.reference.endswith(".npz")


# ------------------------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class GeneratedImage:
    index: int
    prompt: str
    path: str


def _display(fs, path: str) -> str:
    """A path as the user wrote it: plain for local files, with its protocol for remote ones."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def read_generated(
    generated: str, limit: int | None = None, storage_options: dict | None = None
) -> tuple[object, list[GeneratedImage]]:
    """The generated images of a `jobs/generate.py` output, sorted by index, checked to exist: (fs, images)."""
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(generated, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"generated directory not found: {generated}")
    if not fs.isdir(f"{root}/images") and fs.glob(f"{root}/*/metadata.jsonl"):
        raise ValueError(
            f"{generated} is in GenEval's layout (jobs/generate.py --geneval-layout): score it with GenEval's "
            'evaluator, `python evaluation/evaluate_images.py "DIR" --outfile results.jsonl --model-path '
            "MASK2FORMER_DIR` then `python evaluation/summary_scores.py results.jsonl` "
            "(https://github.com/djghosh13/geneval; see jobs/eval_t2i.py); for FID and CLIP score, generate without "
            "--geneval-layout"
        )
    table_path = f"{root}/samples.parquet"
    if not fs.isfile(table_path):
        raise FileNotFoundError(
            f"{generated} has no samples.parquet: give a jobs/generate.py output directory (images/ + samples.parquet)"
        )
    with fs.open(table_path, "rb") as fh:
        table = pq.read_table(fh)
    missing_cols = {"index", "prompt"} - set(table.column_names)
    if missing_cols:
        raise ValueError(f"{_display(fs, table_path)} lacks the columns {sorted(missing_cols)}")
    rows = sorted(zip(table.column("index").to_pylist(), table.column("prompt").to_pylist()))
    if not rows:
        raise ValueError(f"{_display(fs, table_path)} lists no images")
    if limit is not None:
        rows = rows[:limit]
    present = {p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/images")} if fs.isdir(f"{root}/images") else set()
    images = [GeneratedImage(int(i), str(p or ""), f"{root}/images/{int(i):05d}.png") for i, p in rows]
    missing = [g.path.rsplit("/", 1)[-1] for g in images if g.path.rsplit("/", 1)[-1] not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{len(missing)} of the {len(images)} images samples.parquet lists are missing from "
            f"{_display(fs, root)}/images/: {shown}"
        )
    return fs, images


def list_reference_files(
    reference: str, limit: int | None = None, storage_options: dict | None = None
) -> tuple[object, list[str], int]:
    """Reference image files, sorted: (fs, paths, number of non-image files ignored in a directory).

    A directory is searched recursively and keeps image extensions only (the others, e.g. caption files, are
    counted); every file a glob matches is a candidate (one that is not an image is rejected when decoded)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(reference, **(storage_options or {}))
    ignored = 0
    if any(c in path for c in _GLOB_CHARS):
        files = sorted(p for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file")
    elif fs.isdir(path):
        found = sorted(fs.find(path))
        files = [p for p in found if p.lower().endswith(IMAGE_EXTENSIONS)]
        ignored = len(found) - len(files)
    elif fs.exists(path):
        raise ValueError(f"--reference {reference}: give a directory of images, a glob or a .npz of statistics")
    else:
        raise FileNotFoundError(f"reference set not found: {reference}")
    if limit is not None:
        files = files[:limit]
    return fs, files, ignored


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _to_uint8(images: list[np.ndarray]) -> torch.Tensor:
    """H x W x 3 uint8 arrays of one size -> uint8 N x 3 x H x W."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------------------
# evaluation


def _device(name: str) -> torch.device:
    from pipelines.tokenize import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no GPU is visible")
    return device


def evaluate(cfg: EvalT2IConfig, *, feature_extractor: torch.nn.Module | None = None) -> dict:
    """Compute the metrics (see the module docstring); returns the result dict `jobs/eval_t2i.py` writes as JSON.

    `feature_extractor` replaces the one loaded from `cfg.inception` (any module mapping uint8 N x 3 x H x W to
    N x D features); `cfg.inception` is then only recorded."""
    from tokenflow.image import ImageError, load_image

    t0 = time.time()
    device = _device(cfg.device)
    fs, images = read_generated(cfg.generated, cfg.limit, cfg.storage_options)
    log.info("%d generated images in %s", len(images), cfg.generated)
    if cfg.inception is not None and len(images) < 2:
        raise ValueError(f"FID needs at least 2 generated images for a covariance, got {len(images)}")
    reference = _open_reference(cfg) if cfg.inception is not None else None  # fail before hours of work

    extractor = None
    if cfg.inception is not None:
        from tokenflow.fid import FeatureStats, load_feature_extractor

        extractor = feature_extractor.to(device) if feature_extractor is not None else None
        if extractor is None:
            extractor = load_feature_extractor(cfg.inception, device, cfg.storage_options)
        gen_stats = FeatureStats()
    scorer = None
    if cfg.clip_model is not None:
        from pipelines.clip_score import ClipScorer

        scorer = ClipScorer(cfg.clip_model, cfg.clip_pretrained, model_config=cfg.clip_model_config, device=str(device))
    cosines: list[np.ndarray] = []

    def read_generated_image(g: GeneratedImage) -> np.ndarray:
        with fs.open(g.path, "rb") as fh:
            raw = fh.read()
        try:
            return np.asarray(load_image(raw), dtype=np.uint8)
        except ImageError as e:
            raise ValueError(f"generated image {_display(fs, g.path)} does not decode: {e}") from e

    side = None
    with ThreadPoolExecutor(cfg.workers) as pool:
        for n, batch in enumerate(_batches(images, cfg.batch_size)):
            arrays = list(pool.map(read_generated_image, batch))
            for g, a in zip(batch, arrays):
                h, w = a.shape[:2]
                side = side or h
                if (h, w) != (side, side):
                    raise ValueError(
                        f"generated images must be square and of one size: {_display(fs, g.path)} is {w}x{h}, "
                        f"the first was {side}x{side}"
                    )
            x = _to_uint8(arrays)
            if extractor is not None:
                gen_stats.update_from_images(extractor, x)
            if scorer is not None:
                cosines.append(scorer.cosine(x.float().div(255.0), [g.prompt for g in batch]))
            if (n + 1) % 20 == 0:
                log.info("generated: %d / %d images", min((n + 1) * cfg.batch_size, len(images)), len(images))

    result: dict = {
        "fid": None,
        "clip_score": None,
        "clip_cosine": None,
        "n_generated": len(images),
        "n_reference": None,
        "n_reference_rejected": 0,
        "n_reference_ignored": 0,
        "reference_rejects": [],
        "image_size": side,
        "reference_image_size": None,
        "reference_kind": None,
        "feature_dim": None,
    }
    if scorer is not None:
        cos = np.concatenate(cosines).astype(np.float64)
        result["clip_score"] = float(np.mean(100.0 * np.maximum(cos, 0.0)))
        result["clip_cosine"] = float(np.mean(cos))
    if extractor is not None:
        ref = _reference_stats(cfg, reference, extractor, side, result)
        gen = gen_stats.gaussian()
        if ref.dim != gen.dim:
            raise ValueError(
                f"reference statistics have {ref.dim} features, the extractor gives {gen.dim}: they were computed "
                "with another feature extractor"
            )
        from tokenflow.fid import fid_from_stats

        result["fid"] = fid_from_stats(gen, ref)
        result["feature_dim"] = gen.dim
    result["wall_time_s"] = round(time.time() - t0, 3)
    result["config"] = dataclasses.asdict(cfg)
    return result


def _open_reference(cfg: EvalT2IConfig):
    """The reference statistics (`Gaussian`) of a .npz, or the reference files (fs, paths, ignored count)."""
    from tokenflow.fid import Gaussian

    if cfg.reference_is_stats:
        ref = Gaussian.load(cfg.reference, cfg.storage_options)
        if ref.n is not None and ref.n < 2:
            raise ValueError(f"{cfg.reference} holds statistics of {ref.n} images: a covariance needs at least 2")
        return ref
    fs, files, ignored = list_reference_files(cfg.reference, cfg.limit, cfg.storage_options)
    if not files:
        raise ValueError(f"the reference set is empty: no image files in {cfg.reference}")
    return fs, files, ignored


def _reference_stats(cfg: EvalT2IConfig, reference, extractor: torch.nn.Module, side: int, result: dict):
    """The reference Gaussian, from a .npz or from the images (filling the reference fields of `result`)."""
    from tokenflow.fid import FeatureStats, Gaussian
    from tokenflow.image import ImageError, Preprocess

    size = cfg.image_size or side
    if isinstance(reference, Gaussian):
        ref = reference
        stored = ref.meta.get("image_size")
        if stored is not None and int(stored) != size:
            log.warning(
                "%s was computed from reference images at %s px, the generated images are %s px",
                cfg.reference,
                stored,
                size,
            )
        result.update(
            n_reference=ref.n, reference_kind="statistics", reference_image_size=None if stored is None else int(stored)
        )
    else:
        fs, files, ignored = reference
        log.info("%d reference files in %s (resized and centre-cropped to %d px)", len(files), cfg.reference, size)
        preprocess = Preprocess(size=size, mode="center_crop")
        rejects: list[dict] = []

        def load(path: str) -> np.ndarray | dict:
            with fs.open(path, "rb") as fh:
                raw = fh.read()
            try:
                img, _ = preprocess.load(raw)
            except ImageError as e:
                return {"path": _display(fs, path), "reason": e.reason, "detail": e.detail}
            return np.asarray(img, dtype=np.uint8)

        stats = FeatureStats()
        with ThreadPoolExecutor(cfg.workers) as pool:
            for n, batch in enumerate(_batches(files, cfg.batch_size)):
                loaded = list(pool.map(load, batch))
                rejects += [r for r in loaded if isinstance(r, dict)]
                arrays = [a for a in loaded if not isinstance(a, dict)]
                if arrays:
                    stats.update_from_images(extractor, _to_uint8(arrays))
                if (n + 1) % 20 == 0:
                    log.info("reference: %d / %d files", min((n + 1) * cfg.batch_size, len(files)), len(files))
        for r in rejects:
            log.warning("reference file rejected (%s): %s: %s", r["reason"], r["path"], r["detail"])
        result.update(
            n_reference=stats.n,
            n_reference_rejected=len(rejects),
            n_reference_ignored=ignored,
            reference_rejects=rejects,
            reference_kind="images",
            reference_image_size=size,
        )
        if stats.n == 0:
            raise ValueError(
                f"the reference set is empty: none of the {len(files)} files in {cfg.reference} decodes "
                f"(first: {rejects[0]['path']}: {rejects[0]['detail']})"
            )
        if stats.n < 2:
            raise ValueError(f"FID needs at least 2 reference images for a covariance, got {stats.n}")
        ref = stats.gaussian()
        ref = Gaussian(mu=ref.mu, sigma=ref.sigma, n=ref.n, meta={"image_size": size})
    if cfg.save_reference_stats:
        ref.save(cfg.save_reference_stats, cfg.storage_options)
        log.info("reference statistics saved to %s", cfg.save_reference_stats)
    return ref
