"""The tokenize actor's work without Ray: pixels in, tokens out, in fp32 and in the bf16 the GPU path uses."""

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from skimage import data

from pipelines.tokenize import TokenizeStage, load_tokenizer
from tokenflow.image import to_tensor


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _malloc_left_alone(monkeypatch):
    """A CPU `TokenizeStage` sets glibc's thresholds for its whole process (an actor's own); not for pytest's
    (tests/unit/test_cpu_allocator.py checks that the stage does it)."""
    monkeypatch.setattr("pipelines.tokenize.keep_large_buffers", lambda: True)


@pytest.fixture(scope="module")
def batch():
    tok = load_tokenizer("preset:tiny")
    squares = [tok.preprocessor.load(_jpeg(getattr(data, n)()))[0] for n in ("astronaut", "coffee", "rocket")]
    pixels = [
        np.asarray(squares[0], np.uint8).tobytes(),
        None,
        *(np.asarray(s, np.uint8).tobytes() for s in squares[1:]),
    ]
    return squares, pa.table({"key": ["a", "rejected", "c", "d"], "pixels": pa.array(pixels, pa.binary())})


def _tokens(out: pa.Table) -> list:
    return [None if t is None else np.frombuffer(t, np.uint16).tolist() for t in out["tokens"].to_pylist()]


def test_fp32_stage_tokens_equal_direct_encoding(batch):
    squares, table = batch
    stage = TokenizeStage("preset:tiny", device="cpu")
    out = stage(table)
    assert out.column_names == ["key", "tokens"]  # pixels dropped, other columns kept
    tok = load_tokenizer("preset:tiny")
    direct = tok.encode(to_tensor(squares)).tolist()
    assert _tokens(out) == [direct[0], None, direct[1], direct[2]]


def test_bf16_stage_keeps_the_quantizer_in_fp32(batch):
    squares, table = batch
    stage = TokenizeStage("preset:tiny", device="cpu", precision="bf16")  # the GPU path's arithmetic, on CPU
    quantizer = {id(p) for p in stage.tok.model.quantizer.parameters()}
    for p in stage.tok.model.parameters():
        assert p.dtype == (torch.float32 if id(p) in quantizer else torch.bfloat16)
    out = _tokens(stage(table))
    direct = stage.tok.encode(to_tensor(squares).to(torch.bfloat16)).tolist()  # the same bf16 model, called directly
    assert out == [direct[0], None, direct[1], direct[2]]
    assert all(len(t) == 121 and max(t) < 1024 for t in direct)


def test_threads_and_precision_are_checked():
    before = torch.get_num_threads()
    try:
        TokenizeStage("preset:tiny", device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="precision must be auto, bf16 or fp32"):
        TokenizeStage("preset:tiny", device="cpu", precision="fp16")
