"""Shared-mapping lookup: this project's blocked inner-product search vs the official formula written out.

    python bench/quantizer.py            # K = 32,768, 40-d codes (32 semantic + 8 pixel)

"straightforward" is the official quantizer's arithmetic: l2-normalise, two explicit N x K squared-distance
matrices (|z|^2 + |e|^2 - 2 z.e), their squared norms (the logged d_norm), d_sem + w * d_pix, argmin, a one-hot
N x K encoding (used for the usage statistics) and the codes looked up through it. "ours" is
`CosineQuantizer.lookup` + `embed`: one blocked inner-product search on the concatenated normalised vectors.
Both return the chosen indices and the normalised codes; the script checks the indices are identical.

Throughput is the median of interleaved calls. Peak memory is measured in a fresh subprocess per case: the
process's peak RSS (VmHWM, reset just before) during the call minus its RSS just before (inputs and
codebooks already allocated).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F
from procmem import peak_rss_bytes, reset_peak_rss, rss_bytes

from tokenflow.config import QuantizerConfig
from tokenflow.quantize import CosineQuantizer

K, SEM, PIX = 32_768, 32, 8


def straightforward(z: torch.Tensor, e_sem: torch.Tensor, e_pix: torch.Tensor, w: float = 1.0):
    z_sem, z_pix = F.normalize(z[:, :SEM], dim=-1), F.normalize(z[:, SEM:], dim=-1)
    e_sem, e_pix = F.normalize(e_sem, dim=-1), F.normalize(e_pix, dim=-1)
    d_sem = (z_sem**2).sum(1, keepdim=True) + (e_sem**2).sum(1) - 2 * torch.einsum("bd,dn->bn", z_sem, e_sem.t())
    d_pix = (z_pix**2).sum(1, keepdim=True) + (e_pix**2).sum(1) - 2 * torch.einsum("bd,dn->bn", z_pix, e_pix.t())
    _d_norms = (d_sem**2).sum(-1).mean(), (d_pix**2).sum(-1).mean()
    idx = torch.argmin(d_sem + w * d_pix, dim=1)
    one_hot = F.one_hot(idx, K).to(z.dtype)
    codes = one_hot @ torch.cat([e_sem, e_pix], dim=-1)
    return idx, codes


def make_case(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = CosineQuantizer(QuantizerConfig(codebook_size=K))
    with torch.no_grad():
        q.codebooks[0].weight.copy_(torch.randn(K, SEM, generator=g))
        q.codebooks[1].weight.copy_(torch.randn(K, PIX, generator=g))
    return q, torch.randn(n, SEM + PIX, generator=g)


def run(impl: str, q: CosineQuantizer, z: torch.Tensor):
    with torch.no_grad():
        if impl == "ours":
            idx = q.lookup(z)
            return idx, q.embed(idx)
        return straightforward(z, q.codebooks[0].weight, q.codebooks[1].weight)


def worker(impl: str, n: int) -> None:
    """Peak extra memory of one call, printed as JSON (run in a fresh process)."""
    q, z = make_case(n)
    run(impl, q, z[:8])  # warm up kernels on a tiny input
    reset_peak_rss()
    before = rss_bytes()
    run(impl, q, z)
    peak = peak_rss_bytes()
    print(json.dumps({"peak_extra": max(peak - before, 0)}))


def peak_memory(impl: str, n: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", impl, "--n", str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra"]


def throughput(q, z, repeats: int) -> dict[str, float]:
    """Tokens/s of each implementation: median over `repeats` calls, the two interleaved so that both see the
    same machine conditions (timings on shared VMs drift by tens of percent)."""
    times: dict[str, list[float]] = {"ours": [], "straightforward": []}
    for impl in times:
        run(impl, q, z)  # warm-up
    for _ in range(repeats):
        for impl, ts in times.items():
            t = time.perf_counter()
            run(impl, q, z)
            ts.append(time.perf_counter() - t)
    return {impl: z.shape[0] / statistics.median(ts) for impl, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["ours", "straightforward"])
    p.add_argument("--n", type=int)
    p.add_argument("--repeats", type=int, default=11)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.n)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(f"# {date.today()}  {platform.machine()} {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# K = {K:,}, codes {SEM} + {PIX} dims, fp32")
    header = (
        f"{'case':<22}{'straightforward tok/s':>24}{'ours tok/s':>14}{'speed-up':>10}"
        f"{'peak MiB (s/o)':>18}{'memory ratio':>14}{'same idx':>10}"
    )
    print(header)
    for label, maps, side in (("8 x 14x14 (1,568)", 8, 14), ("32 x 14x14 (6,272)", 32, 14)):
        n = maps * side * side
        q, z = make_case(n)
        same = torch.equal(run("ours", q, z)[0], run("straightforward", q, z)[0])
        tps = throughput(q, z, args.repeats)
        t_s, t_o = tps["straightforward"], tps["ours"]
        m_s, m_o = peak_memory("straightforward", n), peak_memory("ours", n)
        print(
            f"{label:<22}{t_s:>24,.0f}{t_o:>14,.0f}{t_o / t_s:>9.1f}x"
            f"{m_s / 2**20:>10.0f} / {m_o / 2**20:<5.0f}{m_s / max(m_o, 1):>13.1f}x{str(same):>10}"
        )


if __name__ == "__main__":
    main()
