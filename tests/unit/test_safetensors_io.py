"""Safetensors written and read one tensor at a time (`tokenflow.safetensors_io`) are the `safetensors` library's
format, both ways, for every dtype the checkpoints use; a truncated file is an error, not short tensors."""

import io
import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from tokenflow import safetensors_io


def _state() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 3, generator=gen),
        "b.bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, generator=gen).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.bytes": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "g.scalar": torch.tensor(3.5),
        "h.empty": torch.empty(0, 4),
        "i.strided": torch.randn(4, 6, generator=gen)[:, ::2],  # not contiguous
    }


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_written_files_are_read_by_safetensors_with_metadata_and_aligned_offsets(tmp_path):
    state = _state()
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as fh:
        safetensors_io.write(fh, state, metadata={"format": "pt"})
    _same(st_load_file(path), state)  # memory-mapped by the library: offsets must be aligned
    _same(st_load(path.read_bytes()), state)
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    assert size % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % state[name].element_size() == 0, name


def test_files_written_by_safetensors_are_read_back_exactly_and_selectively():
    state = {k: v.contiguous() for k, v in _state().items()}
    raw = st_save(state, metadata={"x": "y"})
    _same(safetensors_io.read(io.BytesIO(raw)), state)
    some = safetensors_io.read(io.BytesIO(raw), keep=lambda n: n.startswith(("a.", "e.")))
    assert sorted(some) == ["a.weight", "e.mask"]
    some["a.weight"].add_(1)  # each tensor owns a writable buffer


def test_round_trip_through_an_fsspec_file(tmp_path):
    import fsspec

    state = _state()
    url = f"file://{tmp_path}/deep/model.safetensors"
    with fsspec.open(url, "wb", auto_mkdir=True) as fh:
        safetensors_io.write(fh, state)
    with fsspec.open(url, "rb") as fh:
        _same(safetensors_io.read(fh), state)


def test_a_truncated_file_another_format_and_an_unsupported_dtype_are_errors(tmp_path):
    buf = io.BytesIO()
    safetensors_io.write(buf, {"w": torch.ones(100)})
    with pytest.raises(ValueError, match="w: the file ends inside the tensor's data"):
        safetensors_io.read(io.BytesIO(buf.getvalue()[:-4]))
    with pytest.raises(ValueError, match="not a safetensors file: header length"):
        safetensors_io.read(io.BytesIO(b"\x80\x02PK not safetensors"))  # e.g. a pickle
    with pytest.raises(ValueError, match="not a safetensors file: header length 0"):
        safetensors_io.read(io.BytesIO(b""))
    with pytest.raises(ValueError, match="its header is not JSON"):
        safetensors_io.read(io.BytesIO(struct.pack("<Q", 4) + b"{{{{"))
    with pytest.raises(TypeError, match="z: dtype torch.complex64 cannot be stored"):
        safetensors_io.write(io.BytesIO(), {"z": torch.zeros(2, dtype=torch.complex64)})
