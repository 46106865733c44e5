"""Training step of the text-to-image model: SDPA with the dense mask against FlexAttention with a BlockMask.

    python bench/t2i_attention.py                          # GPU: hidden 1024, 12 layers, 16 heads, batch 8
    python bench/t2i_attention.py --checkpointing          # the same with activation checkpointing
    python bench/t2i_attention.py --device cpu --small     # CPU smoke check of the script (tiny dims)

One model, one batch, both choices of `T2IModel.set_attention`: forward + backward of the teacher-forced loss
under bf16 autocast (fp32 weights), on the released layout (128 text tokens + <img>, 817 image tokens over 9
scales, </img>, EOS; captions of random lengths, left-padded). The mask is built inside each timed forward, as
in training. The first `--warmup` steps (FlexAttention compiles there) are untimed; then `--iters` timed steps,
CUDA-synchronised. The script checks that both losses and gradient norms agree to bf16 tolerance and prints
ms/step, tokens/s, peak memory and the ratio. Random weights: the cost of a step does not depend on them.

torch refuses FlexAttention's backward on CPU: there the smoke check lifts that device check to run the unfused
reference backward. It checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenflow.config import QuantizerConfig  # noqa: E402
from tokenflow.llm.layout import T2ILayout  # noqa: E402
from tokenflow.llm.t2i import T2IConfig, T2IModel, decoder_config  # noqa: E402
from tokenflow.quantize import MultiScaleQuantizer  # noqa: E402

SCALES = (1, 2, 4, 6, 8, 10, 12, 14, 16)  # 817 image tokens
CODES = 32768
MID = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16
)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build(args, device: str) -> T2IModel:
    torch.manual_seed(0)
    dims = dict(SMALL if args.small else MID)
    if args.kv_heads:
        dims["num_key_value_heads"] = args.kv_heads
    llm = decoder_config(vocab_size=32000, **dims)
    cfg = T2IConfig(
        llm=llm, scales=SCALES, codebook_size=CODES, code_dim=40, activation_checkpointing=args.checkpointing
    )
    return T2IModel(cfg).to(device).train()


def training_batch(batch: int, device: str) -> dict:
    """Random captions of 5 to 127 ids (left-padded to 128), random image tokens, as `T2IModel.forward` takes."""
    g = torch.Generator().manual_seed(0)
    layout = T2ILayout(scales=SCALES, eos_id=2, pad_id=0, image_open=(5, 6, 7), image_close=(8, 6, 7), bos_id=1)
    lengths = torch.randint(5, 128, (batch,), generator=g).tolist()
    captions = [torch.randint(10, 32000, (n,), generator=g).tolist() for n in lengths]
    ids, valid = T2ILayout.stack([layout.prefix(c) for c in captions])
    tokens = torch.randint(0, CODES, (batch, layout.image_tokens), generator=g)
    quantizer = MultiScaleQuantizer(QuantizerConfig(codebook_size=CODES, scales=SCALES)).eval()
    with torch.no_grad():
        inputs = quantizer.teacher_forcing_inputs(tokens)
    data = dict(
        input_ids=layout.sequence_ids(ids),
        key_valid=layout.key_valid(valid),
        image_tokens=tokens,
        image_inputs=inputs,
        text_labels=layout.text_targets(ids, valid),
    )
    return {k: v.to(device) for k, v in data.items()} | {"image_start": layout.prefix_len}


def step(model: T2IModel, data: dict) -> tuple[float, float]:
    """One forward + backward; (loss, gradient norm)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(data["input_ids"].device.type, dtype=torch.bfloat16):
        out = model(**data)
    loss = out.loss_sum / out.count
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return loss.item(), norm.item()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(model: T2IModel, data: dict, attention: str, warmup: int, iters: int) -> dict:
    model.set_attention(attention)
    device = data["input_ids"].device.type
    loss, norm = step(model, data)  # the first step is warm-up too
    for _ in range(warmup - 1):
        step(model, data)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step(model, data)
    sync(device)
    seconds = (time.perf_counter() - t0) / iters
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device == "cuda" else "-"
    return dict(seconds=seconds, peak=peak, loss=loss, norm=norm)


def lift_cpu_backward_check() -> None:
    """torch refuses FlexAttention's backward on CPU by a device check alone: lift it for the smoke check."""
    import torch.nn.attention.flex_attention as flex

    flex._validate_device = lambda *tensors: None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny dims (hidden 64, 2 layers), batch 2, 1 + 2 steps")
    p.add_argument("--batch", type=int, default=None, help="default 8 (2 with --small)")
    p.add_argument("--kv-heads", type=int, default=None, help="GQA: key/value heads (default 16; 2 with --small)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every layer")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, default 3 (1 with --small)")
    p.add_argument("--iters", type=int, default=None, help="timed steps, default 10 (2 with --small)")
    p.add_argument("--rtol", type=float, default=2e-2, help="bf16 tolerance of the loss and gradient-norm check")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this bench times GPU kernels. For a smoke check: --device cpu --small")
    if args.device == "cpu":
        lift_cpu_backward_check()
    batch = args.batch or (2 if args.small else 8)
    warmup, iters = args.warmup or (1 if args.small else 3), args.iters or (2 if args.small else 10)

    model = build(args, args.device)
    data = training_batch(batch, args.device)
    b, length = data["input_ids"].shape
    cfg = model.llm.config
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"{name}, torch {torch.__version__}: batch {b} x {length} tokens, hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} (q/kv), "
        f"bf16 autocast, checkpointing {'on' if args.checkpointing else 'off'}, {iters} timed steps"
    )
    results = {a: bench(model, data, a, warmup, iters) for a in ("sdpa", "flex")}
    print(f"{'attention':<10} {'ms/step':>9} {'tokens/s':>10} {'peak GiB':>9} {'loss':>10} {'grad norm':>10}")
    for attention, r in results.items():
        print(
            f"{attention:<10} {r['seconds'] * 1e3:>9.1f} {b * length / r['seconds']:>10.0f} {r['peak']:>9} "
            f"{r['loss']:>10.5f} {r['norm']:>10.5f}"
        )
    sdpa, flex = results["sdpa"], results["flex"]
    loss_diff = abs(flex["loss"] - sdpa["loss"]) / abs(sdpa["loss"])
    norm_diff = abs(flex["norm"] - sdpa["norm"]) / abs(sdpa["norm"])
    agree = loss_diff <= args.rtol and norm_diff <= args.rtol
    print(
        f"flex speed-up over sdpa: {sdpa['seconds'] / flex['seconds']:.2f}x; relative difference: loss "
        f"{loss_diff:.1e}, gradient norm {norm_diff:.1e} ({'agree' if agree else 'DISAGREE'} within {args.rtol:g})"
    )
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
