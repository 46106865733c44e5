"""Peak memory of converting a released understanding model (`--kind tokenflow-llava`) and of loading the result.

A bf16 release in the official layout (Qwen2 with LLaVA's projector; random weights, sized by the flags) is
written once; then, each in a fresh process, this project's `convert_i2t_checkpoint` and
`I2TModel.from_pretrained` run on it, and the peak resident memory of each process is printed against the
release's size. `--root` runs another checkout of this project on the same release (e.g. an older commit, for a
side-by-side figure):

    python bench/convert_memory.py [--hidden 1536 --layers 20 --vocab 32000] [--root /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch


def hwm():  # this process's peak resident memory in GiB (VmHWM: unlike ru_maxrss, not inherited over fork)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


step, release, out = sys.argv[2:5]
base = hwm()
start = time.perf_counter()
if step == "convert":
    from tokenflow.llm.convert_i2t import convert_i2t_checkpoint
    convert_i2t_checkpoint(release, out)
else:
    from tokenflow.llm.i2t import I2TModel
    I2TModel.from_pretrained(out)
print(hwm(), base, time.perf_counter() - start)
"""


def write_release(path: str, hidden: int, layers: int, vocab: int, seed: int = 0) -> int:
    """A bf16 release directory in the official layout (tests/parity/i2t_layout.py) with these sizes; returns its
    weights' bytes."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, ROOT)
    from tests.parity.i2t_layout import RELEASED_14B, released_shapes

    heads = hidden // 128
    config = {
        **RELEASED_14B,
        "hidden_size": hidden,
        "intermediate_size": hidden * 8 // 3 // 128 * 128,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "vocab_size": vocab,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in released_shapes(config).items()}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    save_file(state, os.path.join(path, "model.safetensors"))
    return sum(t.numel() * t.element_size() for t in state.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--root", default=ROOT, help="the checkout whose code runs (default: this one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        release, out = os.path.join(tmp, "release"), os.path.join(tmp, "converted")
        size = write_release(release, args.hidden, args.layers, args.vocab) / 2**30
        print(f"release: {size:.2f} GiB of bf16 weights ({args.hidden} hidden, {args.layers} layers)")
        print(f"code: {args.root}")
        for step in ("convert", "load"):
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, args.root, step, release, out], capture_output=True, text=True
            )
            if proc.returncode:
                sys.exit(proc.stderr)
            peak, base, seconds = map(float, proc.stdout.split()[-3:])
            written = os.path.getsize(os.path.join(out, "model.safetensors")) / 2**30
            print(
                f"{step:8s} peak RSS {peak:6.2f} GiB (after imports {base:.2f}; {peak - base:.2f} GiB for the work = "
                f"{(peak - base) / size:.2f}x the release)  {seconds:5.1f} s  model.safetensors {written:.2f} GiB"
            )


if __name__ == "__main__":
    main()
