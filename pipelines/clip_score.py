"""Optional CLIP-score filter: open_clip image-text cosine similarity on an actor pool.

Reads `pixels` (the tokenizer-preprocessed square, uint8) and `caption`; writes `clip_score` (float32, null for
rows already rejected) and, below the threshold, rejects the row with reason `clip_score` (its pixels are
dropped so the tokenizer skips it). The image is resized bicubically from the tokenizer's square to the CLIP
model's input size and normalised with the model's own mean and std, so CLIP sees the same crop the tokenizer
does.
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


class ClipScoreStage:
    """Ray Data actor holding one open_clip model."""

    def __init__(self, cfg: ClipScoreConfig, *, image_size: int, device: str = "auto"):
        import open_clip

        if cfg.model_config:
            open_clip.add_model_config(cfg.model_config)
        self.cfg, self.image_size = cfg, image_size
        self.device = resolve_device(device)
        self.model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained, device=self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        visual = self.model.visual
        size = visual.image_size
        self.clip_size = size[0] if isinstance(size, (tuple, list)) else size
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pp.get("std", open_clip.OPENAI_DATASET_STD)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def scores(self, pixels: list[bytes], captions: list[str]) -> np.ndarray:
        """Cosine similarity of each (image, caption) pair."""
        x = pixels_to_tensor(pixels, self.image_size, self.device)
        if self.image_size != self.clip_size:
            size = (self.clip_size, self.clip_size)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        image = F.normalize(self.model.encode_image((x - self.mean) / self.std).float(), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(captions).to(self.device)).float(), dim=-1)
        return (image * text).sum(-1).cpu().numpy()

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
