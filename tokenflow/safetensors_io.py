"""Safetensors files read and written one tensor at a time, through any fsspec file (local, S3, ...).

`safetensors.torch.save` builds the whole file as one `bytes` object and `load(fh.read())` needs the whole file
in memory next to the tensors it makes: for a 14 B model that is two extra copies of 30-60 GB. Here a write
holds no copy beyond the tensor being written, and a read holds the tensors it returns plus the one being read.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, offsets relative to
the end of the header), then the tensors' bytes, contiguous. Files written here are read by `safetensors` itself
and the other way round (tests/unit/test_safetensors_io.py). `meta` gives names, dtypes and shapes from the header
alone, so a loader can check a file before reading its data, then copy the tensors into place one by one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

import torch
from torch import Tensor

DTYPES = {
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
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


def write(fh: BinaryIO, state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `state` to the open binary file `fh`. Tensors are laid out as `safetensors` lays them out (widest
    element first, then by name), so every tensor starts at an offset aligned to its element size."""
    names = sorted(state, key=lambda n: (-state[n].element_size(), n))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = state[name]
        if t.dtype not in _NAMES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for name in names:
        t = state[name].detach().cpu().contiguous()
        if t.numel():
            fh.write(t.reshape(-1).view(torch.uint8).numpy().data)  # a view of the tensor's bytes, not a copy


def read_header(fh: BinaryIO) -> tuple[int, dict]:
    """(where the data starts, the header without `__metadata__`) of an open safetensors file."""
    fh.seek(0)
    head = fh.read(8)
    (size,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
    if not 2 <= size <= MAX_HEADER:
        raise ValueError(f"not a safetensors file: header length {size} (expected 2 to {MAX_HEADER} bytes)")
    try:
        header = json.loads(fh.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a safetensors file: its header is not JSON ({e})") from e
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{name}: unsupported safetensors dtype {info['dtype']}")
    return 8 + size, header


def meta(fh: BinaryIO) -> dict[str, Tensor]:
    """Every tensor of an open safetensors file as a meta tensor (name, dtype and shape; no data read)."""
    _, header = read_header(fh)
    return {n: torch.empty(i["shape"], dtype=DTYPES[i["dtype"]], device="meta") for n, i in header.items()}


def tensors(fh: BinaryIO, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of an open safetensors file in file order (those whose name passes `keep`), each read into
    its own writable buffer when it is reached. Skipped tensors cost a seek, not their bytes."""
    start, header = read_header(fh)
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if keep is not None and not keep(name):
            continue
        begin, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], info["shape"]
        if end == begin:
            yield name, torch.empty(shape, dtype=dtype)
            continue
        fh.seek(start + begin)
        data = bytearray(end - begin)
        view, got = memoryview(data), 0
        while got < len(data):
            n = fh.readinto(view[got:])
            if not n:
                raise ValueError(f"{name}: the file ends inside the tensor's data")
            got += n
        yield name, torch.frombuffer(data, dtype=dtype).reshape(shape)


def read(fh: BinaryIO, keep: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """The tensors of an open safetensors file (those whose name passes `keep`), as a dict."""
    return dict(tensors(fh, keep))
