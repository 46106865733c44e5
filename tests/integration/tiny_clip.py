"""A tiny open_clip architecture, registered from a JSON config, with seeded random weights in a local checkpoint:
what the CLIP-score tests load instead of downloaded weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(root: Path, name: str, seed: int = 0):
    """(model, config path, checkpoint path): `name` registered with open_clip from root/name.json, its seeded
    weights saved to root/name.pt."""
    import open_clip

    config, weights = root / f"{name}.json", root / f"{name}.pt"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    torch.save(model.state_dict(), weights)
    return model, config, weights
