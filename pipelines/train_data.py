"""Training images for the tokenizer, on Ray Data: the pretokenize readers and filters, with random-resize-crop
and flip augmentation, streamed to the Ray Train workers (`get_dataset_shard`).

    plan = EpochPlan.remote(shard_ids)                       # one small actor: which shard each read task reads
    train = train_dataset(cfg, shards, image_size, plan)     # datasets={"train": train, "eval": eval_dataset(...)}
    ...in each worker:
    batches = MicroBatches(get_dataset_shard("train"), batch_size, image_size)
    x = batches.next()        # (B, 3, S, S) float in [-1, 1], or None at the end of the epoch

- Decode, validate and filter are `pipelines.filters.filter_sample`, as in pretokenize (require_caption off by
  default: a tokenizer needs no caption). A bad sample is a row with a reason: workers count it and skip it.
- The crop of a sample is a function of (seed, epoch, shard, key) only (`sample_rng`), so it does not depend on
  which worker or read task handles the sample.
- Data position. Each read task asks the `EpochPlan` actor which shard it reads this epoch (the epoch's seeded
  shard order) and which of its keys to skip. Workers record the keys they consumed (trained on or rejected);
  at a checkpoint these merge into a `DataPosition` (shards finished, keys consumed in unfinished shards). A
  resumed run skips exactly those, before decoding: no sample of the epoch is lost or seen twice.
- Held-out split: the samples whose key hashes below `eval_fraction` never train; `eval_dataset` centre-crops
  up to `eval_images` of them (or reads `eval_input` instead when given).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
import torch

from pipelines.filters import FilterConfig, filter_sample
from pipelines.read_tasks import read_shards
from pipelines.sources import Shard, read_shard
from tokenflow.image import Preprocess, load_image, open_image, oriented_size, random_crop, random_flip


@dataclass(kw_only=True)
class TrainDataConfig:
    """Where training images come from and how they are augmented."""

    input: list[str] = field(default_factory=list)
    """Training shards: files, directories, globs, brace ranges; local paths or s3:// URIs (as pretokenize)."""
    format: str | None = None
    """webdataset, parquet or folder; None detects it."""
    image_column: str | None = None
    caption_column: str | None = None
    s3_endpoint: str | None = None
    filters: FilterConfig = field(default_factory=lambda: FilterConfig(require_caption=False))
    """The pretokenize filters; captions are not required for tokenizer training."""
    min_crop_frac: float = 0.8
    """Random-resize-crop: the short side is resized to a random value in [S / max_crop_frac, S / min_crop_frac]
    before a random S x S crop (official: 0.8 and 1.0, i.e. 256..320 for 256 px)."""
    max_crop_frac: float = 1.0
    flip_prob: float = 0.5
    """Probability of a left-right flip (official: 0.5)."""
    draft: bool = True
    """Let libjpeg decode JPEGs at a reduced scale that still covers the largest crop (much faster on big photos;
    the pixels differ slightly from a full decode, which training does not mind)."""
    seed: int = 0
    """Seeds the shard order of each epoch and every sample's crop."""
    read_batch_rows: int = 64
    """Rows per block a read task yields (after decoding and augmentation)."""
    eval_fraction: float = 0.001
    """Fraction of samples held out for evaluation, chosen by a hash of their key (never trained on)."""
    eval_input: list[str] = field(default_factory=list)
    """Evaluate on these shards instead (then nothing is held out of the training input)."""
    eval_images: int = 64
    """At most this many held-out images are evaluated (split over the workers)."""

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if isinstance(self.eval_input, str):
            self.eval_input = [self.eval_input]
        if not 0.0 < self.min_crop_frac <= self.max_crop_frac <= 1.0:
            raise ValueError("need 0 < min_crop_frac <= max_crop_frac <= 1")
        if not 0.0 <= self.flip_prob <= 1.0 or not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("flip_prob must be in [0, 1] and eval_fraction in [0, 1)")
        if self.read_batch_rows < 1 or self.eval_images < 0:
            raise ValueError("read_batch_rows must be >= 1 and eval_images >= 0")

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.s3_endpoint} if self.s3_endpoint else {}


# ---- per-sample decisions: pure functions of the sample's identity ---------------------------------------------


def held_out(key: str, fraction: float) -> bool:
    """Whether a sample belongs to the evaluation split (stable across runs, machines and Python versions)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def sample_rng(seed: int, epoch: int, shard_id: str, key: str) -> random.Random:
    """The random stream of one sample's augmentation in one epoch (a str seed is hashed with SHA-512)."""
    return random.Random(f"{seed}\x00{epoch}\x00{shard_id}\x00{key}")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which the n shards are read in `epoch`."""
    order = list(range(n))
    random.Random(f"order\x00{seed}\x00{epoch}").shuffle(order)
    return order


@dataclass(frozen=True)
class RandomCrop:
    """The training view of an image: random-resize-crop then flip, with the draws of one sample's rng. Same
    `load` interface as `tokenflow.image.Preprocess`, so `filter_sample` decodes and validates with it."""

    size: int
    rng: random.Random
    min_crop_frac: float = 0.8
    max_crop_frac: float = 1.0
    flip_prob: float = 0.5
    draft: bool = False

    def load(self, source, *, max_pixels: int):
        img = open_image(source)
        original = oriented_size(img)
        draft = math.ceil(self.size / self.min_crop_frac) if self.draft else None
        img = load_image(img, max_pixels=max_pixels, draft_size=draft)
        img = random_crop(img, self.size, self.rng, self.min_crop_frac, self.max_crop_frac)
        return random_flip(img, self.rng, self.flip_prob), original


# ---- the epoch plan ---------------------------------------------------------------------------------------------


class EpochPlan:
    """Which shard read task i reads this epoch, and which keys it skips (a Ray actor; rank 0 sets it before
    every epoch, read tasks ask it when they start)."""

    def __init__(self, shard_ids: list[str], seed: int):
        self.shard_ids, self.seed = list(shard_ids), seed
        self.epoch, self.order, self.skip = 0, list(range(len(shard_ids))), {}

    def start(self, epoch: int, position: dict | None = None) -> None:
        pos = DataPosition.from_dict(position or {})
        done = pos.done if pos.epoch == epoch else set()
        self.skip = {s: set(keys) for s, keys in pos.consumed.items()} if pos.epoch == epoch else {}
        order = epoch_order(len(self.shard_ids), self.seed, epoch)
        self.order = [i for i in order if self.shard_ids[i] not in done]
        self.epoch = epoch

    def task(self, i: int) -> tuple[int, int | None, list[str]]:
        """(epoch, index of the shard to read or None, keys to skip in it)."""
        if i >= len(self.order):
            return self.epoch, None, []
        shard = self.order[i]
        return self.epoch, shard, sorted(self.skip.get(self.shard_ids[shard], ()))


TRAIN_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard_id", pa.string()),
        ("epoch", pa.int64()),
        ("end_of_shard", pa.int64()),  # -1 for samples; the shard's row count (skipped rows included) on its last
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("pixels", pa.binary()),  # uint8 S x S x 3; null for rejects
    ]
)


def read_train_shard(i: int, shards: list[Shard], cfg: TrainDataConfig, size: int, plan) -> Iterator[pa.Table]:
    """Read task i: the shard the plan gives it this epoch, minus skipped and held-out keys, augmented."""
    epoch, index, skip = ray.get(plan.task.remote(i))
    if index is None:
        return
    shard, skip = shards[index], set(skip)
    rows, n = [], 0
    for row in read_shard(
        shard, image_column=cfg.image_column, caption_column=cfg.caption_column, storage_options=cfg.storage_options
    ):
        n += 1
        key = row["key"]
        if key in skip or (not cfg.eval_input and held_out(key, cfg.eval_fraction)):
            if key not in skip:
                skip.add(key)  # a held-out key counts as consumed, so the shard still completes
                rows.append(_row(key, shard.shard_id, epoch, reason="held_out"))
            continue
        rng = sample_rng(cfg.seed, epoch, shard.shard_id, key)
        crop = RandomCrop(size, rng, cfg.min_crop_frac, cfg.max_crop_frac, cfg.flip_prob, cfg.draft)
        out = filter_sample(row, cfg.filters, crop)
        pixels = None if out["pixels"] is None else out["pixels"].tobytes()
        rows.append(_row(key, shard.shard_id, epoch, reason=out["reason"], detail=out["detail"], pixels=pixels))
        if len(rows) >= cfg.read_batch_rows:
            yield pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA)
            rows = []
    rows.append(_row(f"{shard.shard_id}#end", shard.shard_id, epoch, end_of_shard=n))
    yield pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA)


def _row(key, shard_id, epoch, *, end_of_shard=-1, reason=None, detail=None, pixels=None) -> dict:
    return {
        "key": key,
        "shard_id": shard_id,
        "epoch": epoch,
        "end_of_shard": end_of_shard,
        "reason": reason,
        "detail": detail,
        "pixels": pixels,
    }


def train_dataset(cfg: TrainDataConfig, shards: list[Shard], image_size: int, plan):
    """One read task per shard slot; the plan maps slots to shards each epoch."""
    tasks = [
        functools.partial(read_train_shard, i, shards=shards, cfg=cfg, size=image_size, plan=plan)
        for i in range(len(shards))
    ]
    return read_shards(tasks, TRAIN_SCHEMA)


# ---- evaluation images ------------------------------------------------------------------------------------------


def read_eval_shard(shard: Shard, cfg: TrainDataConfig, preprocess: Preprocess) -> Iterator[pa.Table]:
    """Held-out samples of one shard (all of them for eval_input shards), centre-cropped as at inference."""
    rows = []
    for row in read_shard(
        shard, image_column=cfg.image_column, caption_column=cfg.caption_column, storage_options=cfg.storage_options
    ):
        if not cfg.eval_input and not held_out(row["key"], cfg.eval_fraction):
            continue
        out = filter_sample(row, cfg.filters, preprocess)
        if out["pixels"] is not None:
            rows.append(_row(row["key"], shard.shard_id, 0, pixels=out["pixels"].tobytes()))
        if len(rows) >= cfg.read_batch_rows:
            yield pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=TRAIN_SCHEMA)


def eval_dataset(cfg: TrainDataConfig, shards: list[Shard], preprocess: Preprocess):
    """Up to eval_images held-out images (deterministic set: the first ones in shard order)."""
    ds = read_shards([functools.partial(read_eval_shard, s, cfg, preprocess) for s in shards], TRAIN_SCHEMA)
    return ds.limit(cfg.eval_images)


# ---- the worker side --------------------------------------------------------------------------------------------


@dataclass
class DataPosition:
    """How far an epoch has got: shards finished, and the keys consumed (trained on, rejected or held out) in
    the shards still open. Worker positions merge by union; a shard is finished once its consumed keys reach
    its row count."""

    epoch: int = 0
    done: set[str] = field(default_factory=set)
    consumed: dict[str, set[str]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)

    def consume(self, shard_id: str, key: str) -> None:
        self.consumed.setdefault(shard_id, set()).add(key)

    def end_of_shard(self, shard_id: str, rows: int) -> None:
        self.totals[shard_id] = rows

    def merged(self, others: list[DataPosition]) -> DataPosition:
        out = DataPosition(self.epoch, set(self.done))
        for pos in [self, *others]:
            if pos.epoch != self.epoch:
                raise ValueError(f"cannot merge positions of epochs {self.epoch} and {pos.epoch}")
            out.done |= pos.done
            out.totals.update(pos.totals)
            for s, keys in pos.consumed.items():
                out.consumed.setdefault(s, set()).update(keys)
        for s in list(out.consumed):
            if s in out.done or out.totals.get(s) == len(out.consumed[s]):
                out.done.add(s)
                del out.consumed[s]
                out.totals.pop(s, None)
        return out

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "done": sorted(self.done),
            "consumed": {s: sorted(k) for s, k in sorted(self.consumed.items())},
            "totals": dict(sorted(self.totals.items())),
        }

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        return cls(
            int(d.get("epoch", 0)),
            set(d.get("done", ())),
            {s: set(k) for s, k in d.get("consumed", {}).items()},
            {s: int(n) for s, n in d.get("totals", {}).items()},
        )


def pixels_to_tensor(blobs: list[bytes], size: int) -> torch.Tensor:
    """uint8 S x S x 3 buffers -> float32 (B, 3, S, S) in [-1, 1] (bit-identical to `tokenflow.image.to_tensor`)."""
    arr = np.stack([np.frombuffer(b, dtype=np.uint8).reshape(size, size, 3) for b in blobs])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32)
    return x.div(255.0).mul(2.0).sub(1.0).contiguous()


class MicroBatches:
    """Fixed-size training batches from a worker's dataset shard, one epoch at a time.

    Rejected rows are counted (`rejects`, by reason) and skipped; a key counts as consumed when its batch is
    handed out (or when it is rejected). `fill(n)` reads until n images wait or the epoch's stream ends."""

    def __init__(self, shard, batch_size: int, image_size: int):
        self.shard, self.batch_size, self.image_size = shard, batch_size, image_size
        self.rejects: Counter[str] = Counter()
        self.position = DataPosition()
        self._rows: list[tuple[str, str, bytes]] = []
        self._it: Iterator[pa.Table] | None = None

    def start_epoch(self, epoch: int) -> None:
        self.position = DataPosition(epoch)
        self._rows = []  # rows left from an epoch that ended on another worker: not consumed, seen next epoch
        self._it = iter(self.shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1))

    def fill(self, n: int) -> bool:
        """Read until n images are waiting; False when the epoch's stream ended first."""
        while len(self._rows) < n:
            try:
                table = next(self._it)
            except StopIteration:
                return False
            self._feed(table)
        return True

    def _feed(self, table: pa.Table) -> None:
        epoch = self.position.epoch
        for row in table.to_pylist():
            if row["epoch"] != epoch:
                raise RuntimeError(f"a row of epoch {row['epoch']} in epoch {epoch}: the epoch plan was not set")
            if row["end_of_shard"] >= 0:
                self.position.end_of_shard(row["shard_id"], row["end_of_shard"])
            elif row["reason"]:
                if row["reason"] != "held_out":
                    self.rejects[row["reason"]] += 1
                self.position.consume(row["shard_id"], row["key"])
            else:
                self._rows.append((row["shard_id"], row["key"], row["pixels"]))

    def take(self) -> tuple[torch.Tensor, list[str]]:
        """The next batch (call after fill(batch_size) returned True) and its keys."""
        batch, self._rows = self._rows[: self.batch_size], self._rows[self.batch_size :]
        for shard_id, key, _ in batch:
            self.position.consume(shard_id, key)
        return pixels_to_tensor([b for *_, b in batch], self.image_size), [k for _, k, _ in batch]
