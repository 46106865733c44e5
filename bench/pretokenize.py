"""Pretokenize throughput against its bounds, and memory as the corpus grows.

    python bench/pretokenize.py --n 256            # a few minutes on 2 cores

(a) decode bound: the job with the `tiny` tokenizer (model cost ~0) against a plain in-process loop of the same
    decode + resize + crop (`Preprocess.load`) over the same images; also that loop with JPEG draft decoding.
(b) model bound: the job with the `clipb_224` preset against a bare loop of `Tokenizer.encode` over pre-decoded
    batches of the same size (--model-n images; CPU forward passes are slow).
(c) memory: peak RSS summed over the driver and every Ray worker process, for a corpus of N and of 4N images.

The corpus is synthetic but realistic: random crops of scikit-image's photos at 640-1024 px, JPEG quality 90,
in WebDataset shards of 64 samples, written to a temporary folder.
"""

from __future__ import annotations

import argparse
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


class PeakRSS:
    """Samples the summed RSS of this process and all Ray worker processes every 0.2 s."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _total(self) -> int:
        total = 0
        for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] == os.getpid() or cmd.startswith("ray::") or "default_worker.py" in cmd:
                total += p.info["memory_info"].rss if p.info["memory_info"] else 0
        return total

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def job(corpus: Path, out: Path, tokenizer: str, **kw) -> tuple[float, int, int]:
    cfg = PretokenizeConfig(input=[str(corpus)], output=str(out), tokenizer=tokenizer, progress_every_s=1e9, **kw)
    cfg.filters.min_side = 64
    with PeakRSS() as mem:
        t = time.perf_counter()
        manifest = run(cfg)
        wall = time.perf_counter() - t
    return manifest["counts"]["kept"] / wall, mem.peak, manifest["counts"]["kept"]


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
    p.add_argument("--n", type=int, default=256, help="images for (a) and (c); (c) also runs 4N")
    p.add_argument("--model-n", type=int, default=16, help="images for (b)")
    p.add_argument("--batch-size", type=int, default=8)
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
        make_corpus(tmp / "4n", 4 * args.n, seed=1)
        tiny = load_tokenizer("preset:tiny")

        rate_dec, rate_draft = decode_loop(images, tiny, False), decode_loop(images, tiny, True)
        rate_job, peak_n, kept = job(tmp / "n", tmp / "out-n", "preset:tiny", batch_size=args.batch_size)
        print(
            f"(a) decode bound, tiny, {kept} images: job {rate_job:.1f} img/s, plain decode loop "
            f"{rate_dec:.1f} img/s -> ratio {rate_job / rate_dec:.2f}; with JPEG draft the loop does "
            f"{rate_draft:.1f} img/s ({rate_draft / rate_dec:.2f}x)"
        )

        if not args.skip_model:
            clip = load_tokenizer("preset:clipb_224")
            model_images = images[: args.model_n]
            rate_model = model_loop(model_images, clip, args.batch_size)
            make_corpus(tmp / "m", args.model_n, seed=2)
            rate_mjob, _, _ = job(tmp / "m", tmp / "out-m", "preset:clipb_224", batch_size=args.batch_size)
            print(
                f"(b) model bound, clipb_224, {args.model_n} images: job {rate_mjob:.2f} img/s, bare encode "
                f"loop {rate_model:.2f} img/s -> ratio {rate_mjob / rate_model:.2f}"
            )

        _, peak_4n, kept4 = job(tmp / "4n", tmp / "out-4n", "preset:tiny", batch_size=args.batch_size)
        print(
            f"(c) peak RSS (driver + Ray workers): {args.n} images {peak_n / 2**20:.0f} MiB, {kept4} images "
            f"{peak_4n / 2**20:.0f} MiB -> growth {100 * (peak_4n / peak_n - 1):+.0f}%"
        )
    ray.shutdown()


if __name__ == "__main__":
    np.random.seed(0)
    main()
