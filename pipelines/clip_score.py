"""Optional CLIP-score filter: open_clip image-text cosine similarity on an actor pool.

Reads `pixels` (the tokenizer-preprocessed square, uint8) and `caption`; writes `clip_score` (float32, null for
rows already rejected) and, below the threshold, rejects the row with reason `clip_score` (its pixels are
dropped so the tokenizer skips it). The image is resized bicubically from the tokenizer's square to the CLIP
model's input size and normalised with the model's own mean and std, so CLIP sees the same crop the tokenizer
does. `ClipScorer` is the scoring core alone (model loading, preprocessing, cosine), which the text-to-image
evaluation (`pipelines/eval_t2i.py`) uses too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipelines.tokenize import pixels_to_tensor, resolve_device


@dataclass(kw_only=True)
class ClipScoreConfig:
    """The CLIP-score stage; off unless `enabled`."""

    enabled: bool = False
    model: str = "ViT-B-32"
    """open_clip model name (or the name defined by `model_config`)."""
    pretrained: str | None = "laion2b_s34b_b79k"
    """open_clip pretrained tag (downloads when online) or a local checkpoint path; None = random (tests)."""
    model_config: str | None = None
    """Path of a JSON open_clip model config to register first (custom architectures), relative to the job's
    working directory; its file name (without .json) is the model name."""
    threshold: float | None = 0.28
    """Reject samples whose cosine is below this; None only records the score."""
    batch_size: int = 64
    actors: int | None = None
    """Actor pool size; default as the tokenize pool."""


class ClipScorer:
    """The CLIP-score core, shared by the pretokenize filter stage and the text-to-image evaluation
    (`pipelines/eval_t2i.py`): one open_clip model and its tokenizer, and the cosine of (image, caption) pairs.

    `model_config` (a JSON open_clip config, its file name the model name) is registered first; `pretrained` is an
    open_clip tag (downloads when online) or a local checkpoint path, None for random weights (tests)."""

    def __init__(
        self, model: str, pretrained: str | None, *, model_config: str | None = None, device: str = "auto"
    ) -> None:
        import open_clip

        if model_config:
            open_clip.add_model_config(model_config)
        self.device = resolve_device(device)
        self.model = open_clip.create_model(model, pretrained=pretrained, device=self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        visual = self.model.visual
        size = visual.image_size
        self.clip_size = size[0] if isinstance(size, (tuple, list)) else size
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pp.get("std", open_clip.OPENAI_DATASET_STD)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, captions: list[str]) -> np.ndarray:
        """Cosine similarity of each (image, caption) pair. `images`: float (B, 3, H, W) in [0, 1], square (any
        side: resized bicubically, antialiased, to the model's input size), normalised with the model's mean and
        std."""
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"CLIP scoring needs square images, got {images.shape[-1]}x{images.shape[-2]}")
        x = images.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != (self.clip_size, self.clip_size):
            size = (self.clip_size, self.clip_size)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        image = F.normalize(self.model.encode_image((x - self.mean) / self.std).float(), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(captions).to(self.device)).float(), dim=-1)
        return (image * text).sum(-1).cpu().numpy()


class ClipScoreStage(ClipScorer):
    """Ray Data actor holding one open_clip model."""

    def __init__(self, cfg: ClipScoreConfig, *, image_size: int, device: str = "auto"):
        super().__init__(cfg.model, cfg.pretrained, model_config=cfg.model_config, device=device)
        self.cfg, self.image_size = cfg, image_size

    def scores(self, pixels: list[bytes], captions: list[str]) -> np.ndarray:
        """Cosine similarity of each (image, caption) pair."""
        return self.cosine(pixels_to_tensor(pixels, self.image_size, self.device), captions)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["pixels"] is not None]
        if todo:
            s = self.scores([rows[i]["pixels"] for i in todo], [rows[i]["caption"] or "" for i in todo])
            for i, score in zip(todo, s):
                rows[i]["clip_score"] = float(score)
                if self.cfg.threshold is not None and score < self.cfg.threshold:
                    rows[i].update(reason="clip_score", detail=f"{score:.4f} < {self.cfg.threshold}", pixels=None)
        return pa.Table.from_pylist(rows, schema=batch.schema)
