"""Training data of the understanding (image-to-text) model: token shards on Ray Data, encoded as conversations.

    plan = EpochPlan.remote(shard_ids, seed)                    # which shard each read task reads, per epoch
    ds = i2t_dataset(cfg, shards, plan, text_tokenizer=..., template="plain"|"vicuna_v1"|"qwen_2_5", ...)
    ...in each worker:
    batches = I2TBatches(get_dataset_shard("train"), micro_batch, seed=cfg.seed, rank=rank)
    batches.start_epoch(epoch, skip=micro_batches_taken_before_a_restart)
    if batches.fill(n): batch = batches.take()        # input_ids, labels (B, L), lengths, image_index, tokens

Rows. A shard row with a `conversations` column (the pretokenize job's `llava` format: LLaVA's JSON turns as a
string) is a conversation; a row of the plain formats (a caption) becomes one: a user turn with the image and
`caption_prompt`, and the caption as the answer (under `plain`, the alignment template, only the caption is
learned). `tokens` null is a text-only sample (kept: SFT mixes them in). The read tasks encode every row with
`tokenflow.llm.templates.encode_conversation` (labels from token spans) and check its image tokens.

Rejections, counted by reason and logged, never a crash and never a silent drop: `tokens_length` and
`tokens_range` (tokens that are not this tokenizer's), `caption_missing`, `conversations_invalid` (not JSON, not a
list), the template's `bad_turn`, `image_placeholder` and `image_does_not_fit`, `text_only` (a text-only sample in
the alignment stage, which learns the projector from images), and `zero_supervision`: a sample whose truncation to
`max_length` left no answer token to learn.

Batches. A worker reads `group_window` micro-batches' worth of usable rows at a time; with `group_by_length`
(LLaVA's `group_by_modality_length`) it splits them into image and text-only samples, sorts each by length and
cuts micro-batches of one modality and similar lengths (little padding), then shuffles the micro-batches with a
seeded stream. A partial micro-batch waits for the next window; at the end of the epoch it is handed out short.
Every choice is a function of the worker's row stream and the seed, and rows reach the workers in a fixed order
(Ray Data's `preserve_order`): a resumed run replays the epoch's windows up to the micro-batches it had taken and
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import collections
import functools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines.read_tasks import read_shards
from pipelines.sources import Shard
from pipelines.t2i_data import _cached_tokenizer, check_tokenizer_id

# Read tasks import this module in fresh Ray worker processes: no torch and no model code at the top.

IGNORE = -100


@dataclass(kw_only=True)
class I2TDataConfig:
    input: list[str] = field(default_factory=list)
    """Token shards: a pretokenize output directory (its shards/ are read), Parquet files, directories or globs;
    local paths or s3:// URIs. Caption shards (any image format) and conversation shards (`--format llava`)."""
    s3_endpoint: str | None = None
    seed: int = 0
    """Seeds the shard order of each epoch, the row order within a shard and the grouping of micro-batches."""
    max_length: int = 2048
    """Tokens per sample, the image's feature rows included (official: 2048); the tail of a longer one is cut."""
    caption_prompt: str = "Describe the image briefly."
    """The question a caption row is asked with (under `plain` the question is dropped: only the caption)."""
    group_by_length: bool = True
    """Micro-batches of one modality and similar lengths (LLaVA's group_by_modality_length)."""
    group_window: int = 32
    """Micro-batches' worth of rows grouped together (larger: less padding, coarser shuffling)."""
    read_batch_rows: int = 256
    repeat: int = 1
    """Passes over the shards per epoch (each with its own row order): lets a tiny corpus fill many steps."""

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if min(self.max_length, self.group_window, self.read_batch_rows, self.repeat) < 1:
            raise ValueError("max_length, group_window, read_batch_rows and repeat must be >= 1")

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.s3_endpoint} if self.s3_endpoint else {}


I2T_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("epoch", pa.int64()),
        ("reason", pa.string()),  # null for a usable row
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("image_index", pa.int32()),  # -1: text-only
        ("tokens", pa.list_(pa.int32())),  # null: text-only
        ("length", pa.int32()),  # text tokens + image rows
        ("truncated", pa.int32()),  # text tokens cut from the tail
    ]
)


@dataclass(frozen=True)
class _ReadSpec:
    shards: list[Shard]
    cfg: I2TDataConfig
    plan: object
    text_tokenizer: object
    """An object ref of the HF text tokenizer (put in the object store once)."""
    template: str
    tokenizer_id: str
    tokens_per_image: int
    image_tokens: int
    codebook_size: int


def conversation_of(row: dict, caption_prompt: str) -> list[dict]:
    """A row's conversation: its `conversations` (a JSON string or a list of turns), else its caption as the answer
    to `caption_prompt`. Raises ValueError with the rejection reason as its first argument."""
    raw = row.get("conversations")
    if raw is not None:
        try:
            turns = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as e:
            raise ValueError("conversations_invalid", f"not JSON: {e}") from None
        if not isinstance(turns, list):
            raise ValueError("conversations_invalid", f"a {type(turns).__name__}, not a list of turns")
        return turns
    caption = row.get("caption")
    if caption is None:
        raise ValueError("caption_missing", "neither conversations nor a caption")
    return [{"from": "human", "value": f"<image>\n{caption_prompt}"}, {"from": "gpt", "value": caption}]


def encode_row(spec: _ReadSpec, text_tokenizer, epoch: int, row: dict) -> dict:
    """One shard row -> an I2T_SCHEMA row (usable, or with its rejection reason)."""
    from tokenflow.llm.templates import ConversationError, encode_conversation

    out = {"key": row["key"], "epoch": epoch, "reason": None, "input_ids": None, "labels": None}
    out.update(image_index=-1, tokens=None, length=0, truncated=0)
    tokens = row.get("tokens")
    if tokens is not None:
        if len(tokens) != spec.tokens_per_image:
            return {**out, "reason": "tokens_length"}
        if min(tokens) < 0 or max(tokens) >= spec.codebook_size:
            return {**out, "reason": "tokens_range"}
    elif spec.template == "plain":
        return {**out, "reason": "text_only"}
    try:
        turns = conversation_of(row, spec.cfg.caption_prompt)
        enc = encode_conversation(
            spec.template,
            text_tokenizer,
            turns,
            has_image=tokens is not None,
            image_tokens=spec.image_tokens,
            max_length=spec.cfg.max_length,
        )
    except ConversationError as e:
        return {**out, "reason": e.reason}
    except ValueError as e:
        if e.args and e.args[0] in ("conversations_invalid", "caption_missing"):
            return {**out, "reason": e.args[0]}
        raise
    if enc.supervised == 0:
        return {**out, "reason": "zero_supervision"}
    return {
        **out,
        "input_ids": enc.input_ids,
        "labels": enc.labels,
        "image_index": -1 if enc.image_index is None else enc.image_index,
        "tokens": None if tokens is None else list(tokens),
        "length": enc.length,
        "truncated": enc.truncated,
    }


def read_i2t_shard(i: int, spec: _ReadSpec) -> Iterator[pa.Table]:
    """Read task i: the shard the plan gives it this epoch, rows in a seeded order, each encoded."""
    epoch, index, _ = ray.get(spec.plan.task.remote(i))
    if index is None:
        return
    cfg, shard = spec.cfg, spec.shards[index]
    check_tokenizer_id(shard, spec.tokenizer_id, cfg.storage_options)
    with fsspec.open(shard.path, "rb", **cfg.storage_options) as fh:
        pf = pq.ParquetFile(fh)
        wanted = [c for c in ("key", "tokens", "caption", "conversations") if c in pf.schema_arrow.names]
        table = pf.read(columns=wanted)
    text_tokenizer = _cached_tokenizer(spec.text_tokenizer)
    columns = {c: table.column(c).to_pylist() for c in wanted}
    order = list(range(table.num_rows))
    random.Random(f"rows\x00{cfg.seed}\x00{epoch}\x00{shard.shard_id}").shuffle(order)
    rows = []
    for r in order:
        rows.append(encode_row(spec, text_tokenizer, epoch, {c: v[r] for c, v in columns.items()}))
        if len(rows) >= cfg.read_batch_rows:
            yield pa.Table.from_pylist(rows, schema=I2T_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=I2T_SCHEMA)


def i2t_dataset(
    cfg: I2TDataConfig,
    shards: list[Shard],
    plan,
    *,
    text_tokenizer,
    template: str,
    tokenizer_id: str,
    tokens_per_image: int,
    image_tokens: int,
    codebook_size: int,
):
    spec = _ReadSpec(
        shards,
        cfg,
        plan,
        ray.put(text_tokenizer),
        template,
        tokenizer_id,
        tokens_per_image,
        image_tokens,
        codebook_size,
    )
    tasks = [functools.partial(read_i2t_shard, i, spec=spec) for i in range(len(shards))]
    return read_shards(tasks, I2T_SCHEMA)


# ---- the worker side --------------------------------------------------------------------------------------------


def group_micro_batches(
    rows: list[dict], micro_batch: int, *, by_length: bool, rng: random.Random, final: bool
) -> tuple[list[list[dict]], list[dict]]:
    """(micro-batches, rows left for the next window). By length: image and text-only rows apart, each sorted by
    length (longest first; ties in stream order), cut into micro-batches, which are then shuffled. A partial
    micro-batch is left over unless `final`."""
    groups = (
        [
            sorted((r for r in rows if r["tokens"] is not None), key=lambda r: -r["length"]),
            sorted((r for r in rows if r["tokens"] is None), key=lambda r: -r["length"]),
        ]
        if by_length
        else [rows]
    )
    out, rest = [], []
    for group in groups:
        whole = len(group) - len(group) % micro_batch
        out += [group[i : i + micro_batch] for i in range(0, whole, micro_batch)]
        if whole < len(group):
            if final:
                out.append(group[whole:])
            else:
                rest += group[whole:]
    if by_length:
        rng.shuffle(out)
    if rest:  # back in stream order, so the next window's grouping does not depend on this one's sort
        order = {id(r): i for i, r in enumerate(rows)}
        rest.sort(key=lambda r: order[id(r)])
    return out, rest


class I2TBatches:
    """Micro-batches from a worker's dataset shard (see the module docstring).

    `taken` counts the micro-batches handed out this epoch: resuming with `start_epoch(epoch, skip=taken)` replays
    the epoch's windows (without counting their rejects again) and continues where the run was."""

    def __init__(self, shard, micro_batch: int, *, seed: int = 0, rank: int = 0, group_window: int = 32,
                 group_by_length: bool = True):  # fmt: skip
        self.shard, self.micro_batch, self.seed, self.rank = shard, micro_batch, seed, rank
        self.group_window, self.group_by_length = group_window, group_by_length
        self.rejects: collections.Counter = collections.Counter()
        self.samples: collections.Counter = collections.Counter()  # trained, image, text_only, truncated
        self.epoch, self.taken = 0, 0
        self._ready: list[list[dict]] = []
        self._carry: list[dict] = []
        self._window = 0
        self._ended = True
        self._counting = True
        self._it: Iterator[pa.Table] | None = None
        self._pending: collections.deque = collections.deque()

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.taken, self._window = epoch, 0, 0
        self._ready, self._carry, self._pending, self._ended = [], [], collections.deque(), False
        self._it = iter(self.shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1))
        self._counting = False  # the replayed part was counted before the restart
        try:
            for _ in range(skip):
                if not self.fill(1):
                    raise RuntimeError(f"cannot skip {skip} micro-batches of epoch {epoch}: it has {self.taken}")
                self._ready.pop(0)
                self.taken += 1
        finally:
            self._counting = True

    def _next_window(self) -> bool:
        """Group the next window of usable rows into micro-batches; False when the stream had nothing more."""
        if self._ended:
            return False
        want = self.micro_batch * self.group_window  # new usable rows per window, beside the carried ones
        rows, new = self._carry, 0
        while new < want:
            if not self._pending:
                try:
                    table = next(self._it)
                except StopIteration:
                    self._ended = True
                    break
                self._pending = collections.deque(table.to_pylist())
            row = self._pending.popleft()
            if row["epoch"] != self.epoch:
                raise RuntimeError(f"a row of epoch {row['epoch']} in epoch {self.epoch}: the epoch plan was not set")
            if row["reason"] is not None:
                if self._counting:
                    self.rejects[row["reason"]] += 1
                continue
            rows.append(row)
            new += 1
        rng = random.Random(f"groups\x00{self.seed}\x00{self.epoch}\x00{self.rank}\x00{self._window}")
        ready, self._carry = group_micro_batches(
            rows, self.micro_batch, by_length=self.group_by_length, rng=rng, final=self._ended
        )
        self._window += 1
        self._ready += ready
        return bool(ready) or not self._ended

    def fill(self, n: int) -> bool:
        """Group until n micro-batches wait; False when the epoch's stream ended first."""
        while len(self._ready) < n:
            if not self._next_window():
                return False
        return True

    def take(self) -> dict:
        """The next micro-batch (after fill returned True): input_ids, labels (B, L) right-padded (pad 0 / -100),
        lengths (B,), image_index (B,) with -1 for text-only, tokens (n_images, T), supervised (the loss's count:
        supervised labels after the image is spliced in, the first position never predicted)."""
        import torch

        batch = self._ready.pop(0)
        self.taken += 1
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            labels[b, : len(r["labels"])] = torch.tensor(r["labels"])
        with_image = [r for r in batch if r["tokens"] is not None]
        tokens = torch.tensor([r["tokens"] for r in with_image], dtype=torch.long)
        if not with_image:
            tokens = tokens.reshape(0, 0)
        self.samples.update(
            trained=len(batch),
            image=len(with_image),
            text_only=len(batch) - len(with_image),
            truncated=sum(r["truncated"] > 0 for r in batch),
        )
        return {
            "input_ids": ids,
            "labels": labels,
            "lengths": torch.tensor([len(r["input_ids"]) for r in batch]),
            "image_index": torch.tensor([r["image_index"] for r in batch]),
            "tokens": tokens,
            "supervised": sum(loss_positions(r["labels"], r["image_index"]) for r in batch),
        }


def loss_positions(labels: list[int], image_index: int) -> int:
    """Supervised labels the loss sees: the spliced sequence's first position is never a target (an image at
    index 0 moves the first text label off it)."""
    n = sum(label != IGNORE for label in labels)
    return n - (1 if labels and labels[0] != IGNORE and image_index != 0 else 0)
