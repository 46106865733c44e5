"""Training data of the text-to-image model: token shards (the pretokenize job's output) on Ray Data.

    plan = EpochPlan.remote(shard_ids, seed)                  # which shard each read task reads, per epoch
    ds = t2i_dataset(cfg, shards, plan, text_tokenizer, expected_tokenizer_id, tokens_per_image, codebook_size)
    ...in each worker:
    batches = T2IBatches(get_dataset_shard("train"), layout, micro_batch)
    batches.start_epoch(epoch, skip=rows_consumed_before_a_restart)
    if batches.fill(n): batch = batches.take()             # prefix ids/valid (B, P), image tokens (B, T)

- A read task reads one shard (the epoch's seeded shard order) and visits its rows in a seeded permutation of
  (seed, epoch, shard). Every shard's file metadata must name the tokenizer the model trains with
  (`tokenizer_id`); a mismatch stops the job with both ids in the message.
- Captions, per sample and epoch, with the draws of `caption_rng(seed, epoch, shard, key)`: cut to the first
  sentence with probability `first_sentence_prob` (0.2), then replaced by "" with probability `caption_dropout`
  (0.1): the empty caption is exactly the null prompt sampling uses for classifier-free guidance (the official
  code defines the dropout and never applies it). The realised rates are counted and logged.
- A row with a missing caption or tokens of the wrong length or range is a recorded rejection (counted by
  reason, logged), never a crash and never silently dropped.
- Determinism: rows reach the workers in a fixed order (Ray Data's `preserve_order`), so a worker's stream is a
  function of (data, seed, epoch, workers). A worker counts the rows it consumed in the epoch; a resumed run
  skips exactly those, and continues as if never interrupted.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines.read_tasks import read_shards
from pipelines.sources import Shard, expand_inputs

# Read tasks import this module in fresh Ray worker processes: it imports neither torch nor the model code at the
# top (T2IBatches, which runs in the training workers, imports them when used).


@dataclass(kw_only=True)
class T2IDataConfig:
    input: list[str] = field(default_factory=list)
    """Token shards: a pretokenize output directory (its shards/ are read), Parquet files, directories or globs;
    local paths or s3:// URIs."""
    s3_endpoint: str | None = None
    seed: int = 0
    """Seeds the shard order of each epoch, the row order within a shard and every caption's draws."""
    caption_dropout: float = 0.1
    """Probability that a caption is replaced by the empty caption (the CFG null prompt); paper: 0.1."""
    first_sentence_prob: float = 0.2
    """Probability that a caption is cut to its first sentence; paper: 0.2."""
    max_text_tokens: int = 128
    """Text tokens (BOS included) the caption is cut or left-padded to (official: 128)."""
    read_batch_rows: int = 256
    repeat: int = 1
    """Passes over the shards per epoch (each pass with its own row order and caption draws): lets a tiny corpus
    such as the demo's fill an epoch of many steps."""

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        for name in ("caption_dropout", "first_sentence_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_text_tokens < 1 or self.read_batch_rows < 1 or self.repeat < 1:
            raise ValueError("max_text_tokens, read_batch_rows and repeat must be >= 1")

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.s3_endpoint} if self.s3_endpoint else {}


# ---- captions ---------------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def first_sentence(caption: str) -> str:
    """The caption, stripped, up to and including its first sentence end (. ! ? before a space or the end, or a
    newline). An abbreviation followed by a space ("e.g. ") counts as an end: a known limit of the rule."""
    text = caption.strip()
    m = _SENTENCE_END.search(text)
    return text if m is None else text[: m.end()].strip()


def caption_rng(seed: int, epoch: int, shard_id: str, key: str) -> random.Random:
    """The random stream of one caption's augmentation in one epoch (a str seed is hashed with SHA-512)."""
    return random.Random(f"caption\x00{seed}\x00{epoch}\x00{shard_id}\x00{key}")


def caption_policy(caption: str, rng: random.Random, first_sentence_prob: float, dropout: float):
    """(text, truncated, dropped). Two draws per caption, always in this order, so the stream is stable;
    `truncated` only when the cut removed a sentence (not mere surrounding whitespace)."""
    cut, drop = rng.random() < first_sentence_prob, rng.random() < dropout
    text = first_sentence(caption) if cut else caption
    return ("" if drop else text), cut and text != caption.strip(), drop


# ---- shards -----------------------------------------------------------------------------------------------------


def token_shards(inputs: list[str], storage_options: dict | None = None) -> list[Shard]:
    """The Parquet token shards of the inputs; a pretokenize output directory stands for its `shards/`."""
    opts = storage_options or {}
    expanded = []
    for spec in inputs:
        fs, root = fsspec.core.url_to_fs(spec, **opts)
        if fs.isdir(root) and fs.isdir(root.rstrip("/") + "/shards"):
            spec = spec.rstrip("/") + "/shards"
        expanded.append(spec)
    return expand_inputs(expanded, format="parquet", storage_options=opts)


def repeated(shards: list[Shard], passes: int) -> list[Shard]:
    """The shards `passes` times, each pass under its own shard ids (so its own row order and caption draws)."""
    if passes == 1:
        return list(shards)
    return [Shard(s.path, f"{s.shard_id}#pass{p}", s.format) for p in range(passes) for s in shards]


def shard_tokenizer_id(shard: Shard, storage_options: dict | None = None) -> str | None:
    """The `tokenizer_id` a token shard records in its file metadata (None when it has none)."""
    with fsspec.open(shard.path, "rb", **(storage_options or {})) as fh:
        meta = pq.read_schema(fh).metadata or {}
    value = meta.get(b"tokenizer_id")
    return value.decode() if value else None


def check_tokenizer_id(shard: Shard, expected: str, storage_options: dict | None = None) -> None:
    found = shard_tokenizer_id(shard, storage_options)
    if found != expected:
        raise ValueError(
            f"token shard {shard.path} was made by tokenizer {found!r}, but the model trains with tokenizer "
            f"{expected!r} (--tokenizer): pretokenize the data with that tokenizer, or pass the one that made it"
        )


T2I_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("epoch", pa.int64()),
        ("reason", pa.string()),  # null for a usable row
        ("caption_ids", pa.list_(pa.int32())),
        ("tokens", pa.list_(pa.int32())),
        ("truncated", pa.bool_()),
        ("dropped", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class _ReadSpec:
    shards: list[Shard]
    cfg: T2IDataConfig
    plan: object
    text_tokenizer: object
    """An object ref of the HF text tokenizer (megabytes: put in the object store once, not in every task)."""
    tokenizer_id: str
    tokens_per_image: int
    codebook_size: int


def read_t2i_shard(i: int, spec: _ReadSpec) -> Iterator[pa.Table]:
    """Read task i: the shard the plan gives it this epoch, rows in a seeded order, captions drawn and encoded."""
    epoch, index, _ = ray.get(spec.plan.task.remote(i))
    if index is None:
        return
    cfg, shard = spec.cfg, spec.shards[index]
    check_tokenizer_id(shard, spec.tokenizer_id, cfg.storage_options)
    with fsspec.open(shard.path, "rb", **cfg.storage_options) as fh:
        table = pq.read_table(fh, columns=["key", "caption", "tokens"])
    text_tokenizer = _cached_tokenizer(spec.text_tokenizer)
    order = list(range(table.num_rows))
    random.Random(f"rows\x00{cfg.seed}\x00{epoch}\x00{shard.shard_id}").shuffle(order)
    keys, captions, tokens = (table.column(c).to_pylist() for c in ("key", "caption", "tokens"))
    rows = []
    for r in order:
        rows.append(_row(spec, text_tokenizer, epoch, shard.shard_id, keys[r], captions[r], tokens[r]))
        if len(rows) >= cfg.read_batch_rows:
            yield pa.Table.from_pylist(rows, schema=T2I_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=T2I_SCHEMA)


_TOKENIZERS: dict = {}


def _cached_tokenizer(ref):
    """The text tokenizer behind an object ref, fetched once per worker process."""
    key = ref.hex()
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = ray.get(ref)
    return _TOKENIZERS[key]


def _row(spec: _ReadSpec, text_tokenizer, epoch: int, shard_id: str, key: str, caption, tokens) -> dict:
    out = {"key": key, "epoch": epoch, "reason": None, "caption_ids": None, "tokens": None}
    out.update(truncated=False, dropped=False)
    if tokens is None or len(tokens) != spec.tokens_per_image:
        return {**out, "reason": "tokens_length"}
    if min(tokens) < 0 or max(tokens) >= spec.codebook_size:
        return {**out, "reason": "tokens_range"}
    if caption is None:
        return {**out, "reason": "caption_missing"}
    rng = caption_rng(spec.cfg.seed, epoch, shard_id, key)
    text, truncated, dropped = caption_policy(caption, rng, spec.cfg.first_sentence_prob, spec.cfg.caption_dropout)
    ids = text_tokenizer.encode(text, add_special_tokens=False)[: spec.cfg.max_text_tokens]
    return {**out, "caption_ids": ids, "tokens": list(tokens), "truncated": truncated, "dropped": dropped}


def t2i_dataset(
    cfg: T2IDataConfig,
    shards: list[Shard],
    plan,
    *,
    text_tokenizer,
    tokenizer_id: str,
    tokens_per_image: int,
    codebook_size: int,
):
    spec = _ReadSpec(shards, cfg, plan, ray.put(text_tokenizer), tokenizer_id, tokens_per_image, codebook_size)
    tasks = [functools.partial(read_t2i_shard, i, spec=spec) for i in range(len(shards))]
    return read_shards(tasks, T2I_SCHEMA)


# ---- the worker side --------------------------------------------------------------------------------------------


class T2IBatches:
    """Fixed-size batches from a worker's dataset shard, in stream order.

    `consumed` counts the rows of this epoch's stream handed out or rejected (rejected rows count when a batch
    passes them), so resuming with `start_epoch(epoch, skip=consumed)` continues exactly where the run was."""

    def __init__(self, shard, layout, batch_size: int):
        self.shard, self.layout, self.batch_size = shard, layout, batch_size
        self.rejects: Counter[str] = Counter()
        self.captions: Counter[str] = Counter()  # trained, truncated, dropped
        self.epoch, self.consumed = 0, 0
        self._rows: list[dict] = []
        self._good = 0
        self._it: Iterator[pa.Table] | None = None

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.consumed, self._rows, self._good = epoch, 0, [], 0
        self._it = iter(self.shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1))
        while self.consumed < skip:  # rows consumed before a restart: already trained on, or already counted
            if not self._rows and not self._read():
                raise RuntimeError(f"cannot skip {skip} rows of epoch {epoch}: the stream has {self.consumed}")
            row = self._rows.pop(0)
            self._good -= row["reason"] is None
            self.consumed += 1

    def _read(self) -> bool:
        try:
            table = next(self._it)
        except StopIteration:
            return False
        for row in table.to_pylist():
            if row["epoch"] != self.epoch:
                raise RuntimeError(f"a row of epoch {row['epoch']} in epoch {self.epoch}: the epoch plan was not set")
            self._rows.append(row)
            self._good += row["reason"] is None
        return True

    def fill(self, n: int) -> bool:
        """Read until n usable rows wait; False when the epoch's stream ended first."""
        while self._good < n:
            if not self._read():
                return False
        return True

    def take(self) -> dict:
        """The next batch (after fill(batch_size) returned True): prefix_ids, prefix_valid (B, P), tokens (B, T)."""
        batch = []
        while len(batch) < self.batch_size:
            row = self._rows.pop(0)
            self.consumed += 1
            if row["reason"] is not None:
                self.rejects[row["reason"]] += 1
                continue
            self._good -= 1
            batch.append(row)
            self.captions.update(trained=1, truncated=int(row["truncated"]), dropped=int(row["dropped"]))
        import torch

        ids, valid = self.layout.stack([self.layout.prefix(r["caption_ids"]) for r in batch])
        tokens = torch.tensor([r["tokens"] for r in batch], dtype=torch.long)
        return {"prefix_ids": ids, "prefix_valid": valid, "tokens": tokens}
