"""The on-disk format both LLMs share (`T2IModel`, `I2TModel`): a directory (local or fsspec URI) with

    config.json        {"format_version", "kind": "t2i" | "i2t", "config": {..., "llm": the decoder's HF config},
                        plus extras such as the image tokenizer's id and provenance}
    model.safetensors  every weight by its module name; a tied output head is stored once

Loading builds the model on the meta device (no random init), requires exactly the saved names and shapes (the
error lists what is missing, unexpected or misshapen), then recomputes the non-persistent RoPE buffers.
"""

from __future__ import annotations

import json
import os

import fsspec
import torch
from torch import nn

from tokenflow import safetensors_io

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
FORMAT_VERSION = 1
TIED_HEAD = "llm.lm_head.weight"


def tied(model: nn.Module) -> bool:
    return bool(getattr(model.llm.config, "tie_word_embeddings", False))


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    kind: str,
    config: dict,
    extra: dict | None = None,
    storage_options: dict | None = None,
    state_dict: dict | None = None,
) -> None:
    """Write `model` (with its decoder at `model.llm`) as above; `config` is the model's own config dict (the
    decoder's config is added under "llm"); `state_dict` replaces the module's own (e.g. gathered from ZeRO-3)."""
    path, opts = os.fspath(path), storage_options or {}
    fs, root = fsspec.core.url_to_fs(path, **opts)
    fs.makedirs(root, exist_ok=True)
    # the writer moves one tensor at a time to the CPU: a model on a GPU is never copied to host memory whole
    state = dict(model.state_dict() if state_dict is None else state_dict)
    if tied(model):
        state.pop(TIED_HEAD, None)
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": {**config, "llm": model.llm.config.to_dict()},
        **(extra or {}),
    }
    with fs.open(root.rstrip("/") + "/" + WEIGHTS_NAME, "wb") as fh:
        safetensors_io.write(fh, state, metadata={"format": "pt"})
    with fs.open(root.rstrip("/") + "/" + CONFIG_NAME, "w") as fh:
        json.dump(payload, fh, indent=2)


def read_model_config(path: str | os.PathLike, *, storage_options: dict | None = None, kind: str | None = None) -> dict:
    """The config.json payload; with `kind`, checked to be that kind of model (directories written before kinds
    were recorded are text-to-image models)."""
    path = os.fspath(path)
    with fsspec.open(path.rstrip("/") + "/" + CONFIG_NAME, "r", **(storage_options or {})) as fh:
        payload = json.load(fh)
    if payload.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer tokenflow (format {payload['format_version']})")
    found = payload.get("kind", "t2i")
    if kind is not None and found != kind:
        names = {"t2i": "a text-to-image", "i2t": "an understanding (image-to-text)"}
        raise ValueError(f"{path} holds {names.get(found, found)} model, not {names.get(kind, kind)} model")
    return payload


def load_model(build, path: str | os.PathLike, *, device="cpu", storage_options: dict | None = None) -> nn.Module:
    """`build()` constructs the model (called on the meta device); its weights then come from `path`."""
    from tokenflow.codes import check_state_dict

    path, opts = os.fspath(path), storage_options or {}
    with torch.device("meta"):  # no random init: every weight comes from the file
        model = build()
    expected = model.state_dict()
    if tied(model):
        expected.pop(TIED_HEAD, None)
    with fsspec.open(path.rstrip("/") + "/" + WEIGHTS_NAME, "rb", **opts) as fh:
        check_state_dict(expected, safetensors_io.meta(fh), source=path)  # before reading any weight
        model.to_empty(device=device)
        target = model.state_dict()
        with torch.no_grad():  # one tensor at a time: a 14 B model is never held twice
            for name, tensor in safetensors_io.tensors(fh):
                target[name].copy_(tensor)
    return restore_buffers(model, device)


def restore_buffers(model: nn.Module, device="cpu") -> nn.Module:
    """Once a model built on the meta device holds its weights: recompute the non-persistent RoPE buffers, tie a
    tied head again, and set eval mode."""
    inner = model.llm.model
    with torch.device(device):
        inner.rotary_emb = type(inner.rotary_emb)(config=inner.rotary_emb.config)
    if tied(model):
        model.llm.tie_weights()
    return model.eval()


def read_weights(path: str | os.PathLike, prefix: str, *, storage_options: dict | None = None) -> dict:
    """The weights of a saved model whose names start with `prefix`, read by byte range (a projector from a 14 B
    model's file on S3 costs its own bytes, not the file's)."""
    path = os.fspath(path).rstrip("/") + "/" + WEIGHTS_NAME
    with fsspec.open(path, "rb", **(storage_options or {})) as fh:
        out = safetensors_io.read(fh, keep=lambda name: name.startswith(prefix))
    if not out:
        raise ValueError(f"{path} has no weights named {prefix}*")
    return out
