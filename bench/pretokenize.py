"""Pretokenize throughput against its bounds, and memory as the corpus grows.

    python bench/pretokenize.py            # N = 2,048 and 8,192 images, 48 for (b): about 10 minutes on 2 cores

(a) decode bound: the job with the `tiny` tokenizer (model cost about a decode's on CPU) over 4N images against a
    plain in-process loop of the same decode + resize + crop (`Preprocess.load`) over the same images; also that
    loop with JPEG draft decoding. End to end and after the job's fixed start-up (to its first output).
(b) model bound: the job with the `clipb_224` preset against a bare loop of `Tokenizer.encode` over pre-decoded
    batches of the same size (--model-n images; CPU forward passes are slow).
(c) memory: peak PSS summed over the driver and every Ray process, for a corpus of N and of 4N images.

The corpus is synthetic but realistic: random crops of scikit-image's photos at 640-1024 px, JPEG quality 90,
in WebDataset shards of 64 samples, written to a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import random
import sys
import tarfile
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from pipelines.pretokenize import PretokenizeConfig, run  # noqa: E402
from pipelines.tokenize import load_tokenizer  # noqa: E402
from pipelines.writer import ShardWriter  # noqa: E402
from tokenflow.image import to_tensor  # noqa: E402

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina"]


def make_corpus(root: Path, n: int, shard_size: int = 64, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    bases = [Image.fromarray(getattr(data, p)()).convert("RGB") for p in PHOTOS]
    images = []
    for i in range(n):
        base = bases[i % len(bases)]
        w, h = rng.randint(640, 1024), rng.randint(480, 768)
        big = base.resize((max(w, base.width), max(h, base.height)))
        x, y = rng.randint(0, big.width - w), rng.randint(0, big.height - h)
        buf = io.BytesIO()
        big.crop((x, y, x + w, y + h)).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, shard_size):
        with tarfile.open(root / f"{s // shard_size:05d}.tar", "w") as tf:
            for i in range(s, min(s + shard_size, n)):
                for name, payload in ((f"{i:06d}.jpg", images[i]), (f"{i:06d}.txt", f"photo {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return images


class PeakMemory:
    """Samples the summed PSS of this process and every Ray process every second. PSS counts a shared page (the
    object store's, the libraries') once in total, where summing RSS would count it once per process."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _total(self) -> int:
        total = 0
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] == os.getpid() or "ray" in cmd:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        return total

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(1.0)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class FirstOutput:
    """Records when the job's writer receives its first batch: the end of the job's fixed start-up (Ray Data
    planning, worker and actor start, model load)."""

    def __init__(self):
        self.t: float | None = None

    def __enter__(self):
        original = self.original = ShardWriter.add

        def add(writer, batch):
            self.t = self.t or time.perf_counter()
            return original(writer, batch)

        ShardWriter.add = add
        return self

    def __exit__(self, *exc):
        ShardWriter.add = self.original


def job(corpus: Path, out: Path, tokenizer: str, memory: bool = False, **kw) -> dict:
    """images/s end to end and after start-up, peak PSS (None unless `memory`; timed runs do not sample it:
    reading every process's smaps costs a good part of a core), images kept."""
    cfg = PretokenizeConfig(input=[str(corpus)], output=str(out), tokenizer=tokenizer, progress_every_s=1e9, **kw)
    cfg.filters.min_side = 64
    with PeakMemory() if memory else contextlib.nullcontext() as mem, FirstOutput() as first:
        t = time.perf_counter()
        manifest = run(cfg)
        end = time.perf_counter()
    kept = manifest["counts"]["kept"]
    return {
        "rate": kept / (end - t),
        "startup_s": first.t - t,
        "steady": kept / (end - first.t),  # slightly high: the first batch's images are counted, not timed
        "peak": mem.peak if memory else None,
        "kept": kept,
    }


def decode_loop(images: list[bytes], tok, draft: bool) -> float:
    from dataclasses import replace

    pre = replace(tok.preprocessor, draft=draft)
    t = time.perf_counter()
    for b in images:
        pre.load(b)
    return len(images) / (time.perf_counter() - t)


def model_loop(images: list[bytes], tok, batch_size: int) -> float:
    squares = [tok.preprocessor.load(b)[0] for b in images]
    batches = [to_tensor(squares[i : i + batch_size]) for i in range(0, len(squares), batch_size)]
    tok.encode(batches[0][:1])  # warm-up
    t = time.perf_counter()
    for x in batches:
        tok.encode(x)
    return len(images) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="(c) runs N and 4N images, (a) 4N")
    p.add_argument("--model-n", type=int, default=48, help="images for (b)")
    p.add_argument("--batch-size", type=int, help="the job's batch size for (a) and (c) (default: the job's own)")
    p.add_argument("--model-batch-size", type=int, default=8, help="batch size of (b), job and loop alike")
    p.add_argument("--actors", type=int, help="tokenizer_actors (default: the job's own default)")
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(
        f"# {date.today()}  {platform.machine()} {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"ray {ray.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_corpus(tmp / "n", args.n)
        images4 = make_corpus(tmp / "4n", 4 * args.n, seed=1)
        tiny = load_tokenizer("preset:tiny")

        rate_dec, rate_draft = decode_loop(images4, tiny, False), decode_loop(images4, tiny, True)
        common = {"tokenizer_actors": args.actors} if args.actors else {}
        if args.batch_size:
            common["batch_size"] = args.batch_size
        a = job(tmp / "4n", tmp / "out-a", "preset:tiny", **common)
        print(
            f"(a) decode bound, tiny, {a['kept']} images: job {a['rate']:.1f} img/s end to end "
            f"({a['steady']:.1f} after its {a['startup_s']:.1f} s start-up), plain decode loop {rate_dec:.1f} img/s "
            f"-> ratio {a['rate'] / rate_dec:.2f} ({a['steady'] / rate_dec:.2f} after start-up); with JPEG draft "
            f"the loop does {rate_draft:.1f} img/s ({rate_draft / rate_dec:.2f}x)"
        )

        if not args.skip_model:
            clip = load_tokenizer("preset:clipb_224")
            rate_model = model_loop(images[: args.model_n], clip, args.model_batch_size)
            make_corpus(tmp / "m", args.model_n, seed=2)
            clip.save_pretrained(tmp / "clipb_224")  # as users run it: a saved directory, loaded without random init
            b = job(tmp / "m", tmp / "out-m", str(tmp / "clipb_224"), batch_size=args.model_batch_size, **common)
            print(
                f"(b) model bound, clipb_224, {b['kept']} images: job {b['rate']:.2f} img/s end to end, bare encode "
                f"loop {rate_model:.2f} img/s -> ratio {b['rate'] / rate_model:.2f}"
            )

        small = job(tmp / "n", tmp / "mem-n", "preset:tiny", memory=True, **common)
        large = job(tmp / "4n", tmp / "mem-4n", "preset:tiny", memory=True, **common)
        print(
            f"(c) peak PSS (driver + Ray processes): {small['kept']} images {small['peak'] / 2**20:.0f} MiB, "
            f"{large['kept']} images {large['peak'] / 2**20:.0f} MiB -> growth "
            f"{100 * (large['peak'] / small['peak'] - 1):+.0f}%"
        )
    ray.shutdown()


if __name__ == "__main__":
    np.random.seed(0)
    main()
