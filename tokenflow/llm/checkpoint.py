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
import struct

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

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
    source = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    if tied(model):
        state.pop(TIED_HEAD, None)
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": {**config, "llm": model.llm.config.to_dict()},
        **(extra or {}),
    }
    with fs.open(root.rstrip("/") + "/" + WEIGHTS_NAME, "wb") as fh:
        fh.write(save_safetensors(state, metadata={"format": "pt"}))
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
    with fsspec.open(path.rstrip("/") + "/" + WEIGHTS_NAME, "rb", **opts) as fh:
        state = load_safetensors(fh.read())
    with torch.device("meta"):  # no random init: every weight comes from the file
        model = build()
    expected = model.state_dict()
    if tied(model):
        expected.pop(TIED_HEAD, None)
    check_state_dict(expected, state, source=path)
    model.to_empty(device=device)
    model.load_state_dict(state, strict=False)
    inner = model.llm.model
    with torch.device(device):  # RoPE frequencies are a non-persistent buffer: compute them again
        inner.rotary_emb = type(inner.rotary_emb)(config=inner.rotary_emb.config)
    if tied(model):
        model.llm.tie_weights()
    return model.eval()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_weights(path: str | os.PathLike, prefix: str, *, storage_options: dict | None = None) -> dict:
    """The weights of a saved model whose names start with `prefix`, read by byte range (a projector from a 14 B
    model's file on S3 costs its own bytes, not the file's)."""
    path = os.fspath(path).rstrip("/") + "/" + WEIGHTS_NAME
    out = {}
    with fsspec.open(path, "rb", **(storage_options or {})) as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        for name, info in header.items():
            if name == "__metadata__" or not name.startswith(prefix):
                continue
            start, end = info["data_offsets"]
            fh.seek(8 + size + start)
            data = bytearray(fh.read(end - start))
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            out[name] = (
                torch.frombuffer(data, dtype=dtype).reshape(info["shape"])
                if data
                else torch.empty(info["shape"], dtype=dtype)
            )
    if not out:
        raise ValueError(f"{path} has no weights named {prefix}*")
    return out
