"""The GPU paths: bf16-autocast training steps (one process, and DeepSpeed ZeRO-2/3 on NCCL), CUDA encode and decode
against the CPU, and the tokenize stage in bf16 and in fp32 on a GPU.

Skipped without CUDA (the suite never needs a GPU). On a GPU machine: `python -m pytest -q tests/gpu`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch

from tokenflow import Tokenizer
from tokenflow.config import preset
from tokenflow.losses import LossConfig, TokenizerLoss
from tokenflow.train import LocalEngine, OptimizerConfig, TrainConfig, TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@contextlib.contextmanager
def true_fp32():
    """TF32 off for cuDNN convolutions and cuBLAS matmuls (cuDNN's is on by default)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def tiny(seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    cfg = preset("tiny")
    return Tokenizer(replace(cfg, quantizer=replace(cfg.quantizer, scale_drop_prob=0.0)))


def fixed_batch(n: int = 4, size: int = 64) -> torch.Tensor:
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(CUDA)


def photos(tok: Tokenizer) -> torch.Tensor:
    from tests.parity.photos import PHOTOS, photo

    return tok.preprocess([photo(n) for n in PHOTOS])


def assert_falls(losses: list[float]) -> None:
    assert all(math.isfinite(v) for v in losses), losses
    k = max(1, len(losses) // 5)
    assert sum(losses[-k:]) < sum(losses[:k]), losses


# ---- training ---------------------------------------------------------------------------------------------------


def test_bf16_autocast_step_trains_with_fp32_weights():
    tok = tiny().to(CUDA)
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0.0, disc_start=20)).to(CUDA)
    opt = OptimizerConfig(lr=1e-3)
    gen = LocalEngine(tok, opt, max_steps=100)
    disc = LocalEngine(loss_fn.discriminator, opt, max_steps=100)
    step = TrainStep(tok, loss_fn, gen, disc, teacher=tok.make_teacher().to(CUDA), amp_dtype=torch.bfloat16)
    x = fixed_batch()
    metrics = [step(x, s) for s in range(25)]
    assert_falls([m["loss/total"] for m in metrics[:20]])  # before the GAN term joins the total
    assert_falls([m["loss/rec"] for m in metrics])
    assert all(m.get("disc/d_loss", 0.0) != 0.0 for m in metrics[20:])  # the discriminator joined at disc_start
    assert {p.dtype for p in tok.parameters()} == {torch.float32}
    assert {p.dtype for p in loss_fn.discriminator.parameters()} == {torch.float32}
    assert step.last_reconstruction.dtype == torch.bfloat16  # the forward did run under autocast
    assert step.last_quant.indices.dtype == torch.long


@pytest.fixture(scope="module")
def nccl_group():
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl")
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_engines_train_on_cuda(nccl_group, zero):
    """The training job's GPU configuration: DeepSpeed engines with fp32 weights and optimiser states (bf16 off
    in DeepSpeed) and the step under bf16 autocast."""
    import deepspeed

    from tokenflow.train.deepspeed import build_engines

    steps, disc_start = 10, 7
    tok = tiny().to(CUDA)
    teacher = tok.make_teacher().to(CUDA)
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0.0, disc_start=disc_start)).to(CUDA)
    opt = OptimizerConfig(lr=1e-3)
    cfg = TrainConfig(max_steps=steps, generator=opt, discriminator=opt)
    gen, disc = build_engines(tok, loss_fn, cfg, zero_stage=zero, micro_batch=4, world_size=1, bf16=False)
    assert gen.zero_optimization_stage() == zero and gen.device.type == "cuda"
    step = TrainStep(tok, loss_fn, gen, disc, teacher=teacher, amp_dtype=torch.bfloat16)
    x = fixed_batch()
    metrics = [step(x, s) for s in range(steps)]
    assert_falls([m["loss/total"] for m in metrics[:disc_start]])
    assert_falls([m["loss/rec"] for m in metrics])
    assert all(m.get("disc/d_loss", 0.0) != 0.0 for m in metrics[disc_start:])
    params = list(tok.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero == 3):
        assert {p.dtype for p in params} == {torch.float32}
        assert all(bool(torch.isfinite(p).all()) for p in params)


# ---- encode and decode ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "clipb_256", "unitok"])
def test_cuda_fp32_tokens_are_the_cpu_tokens(name):
    """fp32 on the GPU (TF32 off) gives the CPU's tokens under the parity rule: >= 99.9% identical and every
    difference a near-tie; decoding the same indices agrees to 1e-3."""
    from tests.parity.compare import compare_tokens

    torch.manual_seed(0)
    cpu = Tokenizer.from_preset(name).eval()
    gpu = copy.deepcopy(cpu).to(CUDA)
    pixels = photos(cpu)
    with true_fp32():
        got = gpu.encode(pixels.to(CUDA)).cpu()
        decoded = gpu.decode(got).cpu()
    result = compare_tokens(cpu, pixels, got)
    print(name, {k: result[k] for k in ("agreement", "differing", "max_gap", "per_image")})
    assert result["agreement"] >= 0.999 and result["near_ties_ok"], result
    assert float((decoded - cpu.decode(got)).abs().max()) < 1e-3


# ---- the tokenize stage -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_batch():
    import io

    import pyarrow as pa

    from pipelines.tokenize import load_tokenizer
    from tests.parity.photos import PHOTOS, photo

    tok = load_tokenizer("preset:tiny")
    squares = []
    for n in PHOTOS:
        buf = io.BytesIO()
        photo(n).save(buf, "JPEG", quality=90)
        squares.append(np.asarray(tok.preprocessor.load(buf.getvalue())[0], np.uint8).tobytes())
    pixels = [squares[0], None, *squares[1:]]
    keys = ["a", "rejected", *"bcd"[: len(squares) - 1]]
    return pa.table({"key": keys, "pixels": pa.array(pixels, pa.binary())})


def _tokens(out) -> list:
    return [None if t is None else np.frombuffer(t, np.uint16) for t in out["tokens"].to_pylist()]


def test_tokenize_stage_runs_bf16_on_cuda(stage_batch):
    from pipelines.tokenize import TokenizeStage

    stage = TokenizeStage("preset:tiny")  # device and precision "auto" on a GPU actor: CUDA, bf16
    assert stage.device.type == "cuda" and stage.bf16
    assert next(stage.tok.model.quantizer.parameters()).dtype == torch.float32
    out = _tokens(stage(stage_batch))
    assert out[1] is None  # a rejected row stays a null
    t = stage.tok.tokens_per_image
    assert all(len(o) == t and int(o.max()) < stage.tok.codebook_size for o in out if o is not None)
    cpu = _tokens(TokenizeStage("preset:tiny", device="cpu")(stage_batch))
    same = np.mean([np.mean(a == b) for a, b in zip(out, cpu) if a is not None])
    first = np.mean([a[0] == b[0] for a, b in zip(out, cpu) if a is not None])
    print(f"bf16 CUDA vs fp32 CPU: {same:.4f} of tokens identical, first scale {first:.2f}")


def test_tokenize_stage_fp32_on_cuda_turns_tf32_off(stage_batch):
    from pipelines.tokenize import TokenizeStage

    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    stage = TokenizeStage("preset:tiny", precision="fp32")
    assert stage.device.type == "cuda" and not stage.bf16
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    out = _tokens(stage(stage_batch))
    cpu = _tokens(TokenizeStage("preset:tiny", device="cpu")(stage_batch))
    same = np.mean([np.mean(a == b) for a, b in zip(out, cpu) if a is not None])
    assert same >= 0.999, same
