"""Exact-duplicate index: `pipelines.dedup.DedupIndex` vs a plain dict {digest_str: key}.

    python bench/dedup.py            # N = 1,000,000 claims, well under a minute on 2 cores
    python bench/dedup.py --large    # and N = 4,000,000

The workload is the pretokenize writer's: claims in batches of 8,192 (sha256 hex digest, 30-character key), 10%
of them repeating an earlier digest, so ~0.9 N distinct entries. The dict side is the writer's loop
(`seen.get(digest)`, then `seen[digest] = key` when new).

claims/s: median over 3 builds from pre-generated batches, the structures interleaved so that all see the same
machine conditions (timings on shared VMs drift by tens of percent).
bytes/entry: RSS deltas, in a fresh process per structure that builds it from batches generated on the fly and
dropped, so only what the structure keeps is counted (for the dict its table and the digest and key strings, for
the index its arrays, key buffer and memtable), allocator overhead included. "held" is the RSS after all claims,
"peak" the peak RSS during them (dict resizes, memtable, run merges), both minus the RSS before, divided by the
distinct entries. The index's own `nbytes` estimate is printed next to them.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import date

import numpy as np
from procmem import peak_rss_bytes, reset_peak_rss, rss_bytes

from pipelines.dedup import DedupIndex

BATCH = 8192
REPEATS = 0.1
STRUCTURES = {"dict": None, "index mem 2^18": 1 << 18, "index mem 2^14": 1 << 14}  # label: memtable_rows

Batch = tuple[list[str], list[str]]


def digest(i: int) -> str:
    return hashlib.sha256(i.to_bytes(8, "little")).hexdigest()


def batches(n: int, seed: int = 0) -> Iterator[Batch]:
    """Claims 0..n-1: claim i has key i and either digest i or, 10% of the time, the digest of an earlier claim.

    Digests are recomputed from their index, so the generator itself holds nothing between batches."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, BATCH):
        ids = np.arange(start, min(start + BATCH, n))
        repeat = (rng.random(len(ids)) < REPEATS) & (ids > 0)
        ids[repeat] = rng.integers(0, ids[repeat])
        keys = [f"laion400m/part-{i // 10_000:05d}/{i:09d}" for i in range(start, start + len(ids))]
        yield [digest(i) for i in ids.tolist()], keys


def dict_claim(seen: dict[str, str], digests: list[str], keys: list[str]) -> list[str | None]:
    out = []
    for d, key in zip(digests, keys):
        first = seen.get(d)
        if first is None:
            seen[d] = key
        out.append(first)
    return out


def build(memtable_rows: int | None, work: Iterable[Batch]) -> tuple[dict[str, str] | DedupIndex, list[int]]:
    """The dict (memtable_rows None) or index after all claims, and the number of repeats each batch reported."""
    if memtable_rows is None:
        seen: dict[str, str] = {}
        return seen, [len(d) - dict_claim(seen, d, k).count(None) for d, k in work]
    index = DedupIndex(memtable_rows)
    return index, [len(d) - index.claim(d, k).count(None) for d, k in work]


def worker(label: str, n: int) -> None:
    """Memory of one structure after n claims, printed as JSON (run in a fresh process)."""
    gc.collect()
    reset_peak_rss()
    before = rss_bytes()
    structure, _ = build(STRUCTURES[label], batches(n))
    gc.collect()
    held, peak = rss_bytes() - before, peak_rss_bytes() - before
    nbytes = structure.nbytes if isinstance(structure, DedupIndex) else None
    print(json.dumps({"entries": len(structure), "held": held, "peak": peak, "nbytes": nbytes}))


def memory(label: str, n: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", label, "--n", str(n)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(n: int, repeats: int = 3) -> tuple[dict[str, float], int]:
    """Claims/s of each structure (median over interleaved builds), and the repeats they all reported."""
    work = list(batches(n))
    times: dict[str, list[float]] = {label: [] for label in STRUCTURES}
    dups = set()
    for _ in range(repeats):
        for label, ts in times.items():
            t = time.perf_counter()
            _, found = build(STRUCTURES[label], work)
            ts.append(time.perf_counter() - t)
            dups.add(sum(found))
    assert len(dups) == 1, dups
    return {label: n / statistics.median(ts) for label, ts in times.items()}, dups.pop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", action="store_true", help="also N = 4,000,000")
    p.add_argument("--worker", choices=list(STRUCTURES))
    p.add_argument("--n", type=int)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.n)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(
        f"# {date.today()}  {platform.machine()} {cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"numpy {np.__version__}"
    )
    print(f"# batches of {BATCH:,}, {REPEATS:.0%} repeats, 30-byte keys; memory: RSS deltas in a fresh process")
    print(
        f"{'N':>10}{'structure':>16}{'entries':>10}{'claims/s':>12}{'held B/entry':>14}{'peak B/entry':>14}"
        f"{'nbytes/entry':>14}"
    )
    for n in (1_000_000, 4_000_000) if args.large else (1_000_000,):
        rates, dups = throughput(n)
        for label, rate in rates.items():
            m = memory(label, n)
            entries = m["entries"]
            assert entries == n - dups, (entries, n, dups)
            nbytes = f"{m['nbytes'] / entries:.1f}" if m["nbytes"] is not None else "-"
            print(
                f"{n:>10,}{label:>16}{entries:>10,}{rate:>12,.0f}{m['held'] / entries:>14.1f}"
                f"{m['peak'] / entries:>14.1f}{nbytes:>14}"
            )


if __name__ == "__main__":
    main()
