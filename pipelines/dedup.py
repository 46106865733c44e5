"""A memory-compact exact-duplicate index: sha256 hex digest -> key of the first sample that claimed it.

A Python dict {digest_str: key} costs ~250 bytes an entry (two str objects and a table slot); at billions of
samples that does not fit in a few actors. Here an entry costs 28 bytes plus the key's UTF-8 bytes:

- only 128 bits of the digest are kept (its first 32 hex digits), as two uint64 `hi`, `lo` (big-endian, so
  ordering by (hi, lo) is ordering by the hex string); a false match needs a 128-bit collision;
- keys are appended UTF-8 to one bytearray that is never rewritten, and referenced by (offset uint64, length
  uint32);
- new entries go into a small dict "memtable" (16 digest bytes -> key); when it holds `memtable_rows` entries it
  is flushed into a sorted run: four numpy arrays (hi, lo, off, length) sorted by (hi, lo);
- runs are merged size-tiered (the newest two, while the newer is at least half the older's size), so there
  are O(log n) of them; a merge only permutes the four arrays, keys never move;
- a batch is looked up in each run with one np.searchsorted on hi, then lo is confirmed (entries sharing hi,
  which random digests practically never do, are scanned one by one).

The index holds no Ray state: the caller partitions digests over actors with `partition_of`.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

_BIG_U64 = np.dtype(">u8")


def _digest_bytes(digest: object) -> bytes:
    """The 32 bytes of one sha256 hex digest (either case); ValueError naming it otherwise."""
    if isinstance(digest, str) and len(digest) == 64:
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raw = b""
        if len(raw) == 32:  # fromhex skips whitespace, so 64 characters can give fewer bytes
            return raw
    raise ValueError(f"not a sha256 hex digest (64 hex characters): {digest!r}")


def _batch_bytes(digests: Sequence[str]) -> bytes:
    """The 32 bytes of each digest, concatenated: one fromhex over the joined batch, per digest only on error."""
    try:
        raw = bytes.fromhex("".join(digests))
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 32 * len(digests) or set(map(len, digests)) - {64}:
        for digest in digests:
            _digest_bytes(digest)  # raises on the first bad one
    return raw


def partition_of(digest: str, partitions: int) -> int:
    """Which of `partitions` index partitions owns a sha256 hex digest (from its leading hex digits; uniform).

    The first 64 bits scaled to [0, partitions): partition p owns a contiguous range of digests.
    """
    partitions = operator.index(partitions)  # a Python int: a numpy one would overflow below
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    return int.from_bytes(_digest_bytes(digest)[:8], "big") * partitions >> 64


class _Run(NamedTuple):
    hi: np.ndarray  # uint64, sorted by (hi, lo)
    lo: np.ndarray  # uint64
    off: np.ndarray  # uint64 offset of the key in the key buffer
    length: np.ndarray  # uint32 length of the key in bytes


def _sorted_run(columns: list[np.ndarray]) -> _Run:
    """A run from (hi, lo, off, length) columns, sorted by (hi, lo).

    The list's arrays are replaced one at a time, so sorting holds at most one extra column besides the order.
    A stable argsort of hi is timsort: near-linear on two concatenated sorted runs, where lexsort is not. Only
    when two entries share hi does the order come from lexsort on (hi, lo).
    """
    order = np.argsort(columns[0], kind="stable")
    hi = columns[0][order]
    if (hi[1:] == hi[:-1]).any():
        order = np.lexsort((columns[1], columns[0]))
    del hi
    for i, column in enumerate(columns):
        columns[i] = column[order]
    return _Run(*columns)


class DedupIndex:
    """sha256 hex digest -> key (str) of the first sample that claimed it."""

    def __init__(self, memtable_rows: int = 1 << 18):
        if memtable_rows < 1:
            raise ValueError(f"memtable_rows must be >= 1, got {memtable_rows}")
        self.memtable_rows = memtable_rows
        self._memtable: dict[bytes, str] = {}  # first 16 digest bytes -> key
        self._runs: list[_Run] = []  # oldest (largest) first
        self._keys = bytearray()  # UTF-8 keys of flushed entries, append-only

    def claim(self, digests: Sequence[str], keys: Sequence[str]) -> list[str | None]:
        """In order: a digest seen before returns the key that first claimed it; a new digest is recorded with its
        key and returns None. A digest repeated inside one call: its first occurrence claims it, later ones get
        that key."""
        if len(digests) != len(keys):
            raise ValueError(f"{len(digests)} digests for {len(keys)} keys")
        if set(map(type, keys)) - {str}:
            bad = next((key for key in keys if not isinstance(key, str)), None)
            if bad is not None:
                raise TypeError(f"keys must be str, got {type(bad).__name__}: {bad!r}")
        raw = _batch_bytes(digests)
        out: list[str | None] = []
        step = self.memtable_rows  # the memtable may be flushed between chunks, so it stays under 2 * step rows
        for start in range(0, len(keys), step):
            out += self._claim_chunk(raw[32 * start : 32 * (start + step)], keys[start : start + step])
        return out

    def first_key(self, digest: str) -> str | None:
        """The key that first claimed `digest`, or None."""
        raw = _digest_bytes(digest)
        first = self._memtable.get(raw[:16])
        return first if first is not None else self._search_runs(raw)[0]

    def __contains__(self, digest: str) -> bool:
        return self.first_key(digest) is not None

    def __len__(self) -> int:
        return len(self._memtable) + sum(len(run.hi) for run in self._runs)

    @property
    def nbytes(self) -> int:
        """Bytes held: the runs' arrays, the key buffer (with its over-allocation) and the memtable (its table,
        digest bytes and key strings, counted even where the caller still references a key)."""
        arrays = sum(column.nbytes for run in self._runs for column in run)
        memtable = sys.getsizeof(self._memtable) + sum(
            sys.getsizeof(prefix) + sys.getsizeof(key) for prefix, key in self._memtable.items()
        )
        return arrays + sys.getsizeof(self._keys) + memtable

    @property
    def runs(self) -> int:
        """Number of sorted runs (O(log n) by the merge policy)."""
        return len(self._runs)

    # ---- internals ----------------------------------------------------------------------------------------------

    def _claim_chunk(self, raw: bytes, keys: Sequence[str]) -> list[str | None]:
        out = self._search_runs(raw)
        memtable = self._memtable
        for i, first in enumerate(out):
            if first is None:  # not in a run: the memtable decides, and records the first occurrence
                size = len(memtable)
                first = memtable.setdefault(raw[32 * i : 32 * i + 16], keys[i])
                if len(memtable) == size:
                    out[i] = first
        if len(memtable) >= self.memtable_rows:
            self._flush()
        return out

    def _search_runs(self, raw: bytes) -> list[str | None]:
        """For each 32-byte digest in `raw`: its key if a run holds it, else None."""
        words = np.frombuffer(raw, dtype=_BIG_U64).reshape(-1, 4)
        out: list[str | None] = [None] * len(words)
        hi, lo = words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64)
        todo = np.argsort(hi)  # searchsorted is ~2.5x faster on sorted queries (fewer cache misses)
        hi, lo = hi[todo], lo[todo]
        for run in self._runs:
            if not todo.size:
                break
            pos = np.minimum(np.searchsorted(run.hi, hi), len(run.hi) - 1)  # past the end: run.hi[-1] < hi
            same_hi = run.hi[pos] == hi
            hit = same_hi & (run.lo[pos] == lo)
            for j in np.flatnonzero(same_hi & ~hit):  # entries sharing hi sit next to each other, sorted by lo
                p = pos[j] + 1
                while p < len(run.hi) and run.hi[p] == hi[j] and run.lo[p] <= lo[j]:
                    if run.lo[p] == lo[j]:
                        hit[j], pos[j] = True, p
                        break
                    p += 1
            at = pos[hit]
            for i, off, length in zip(todo[hit].tolist(), run.off[at].tolist(), run.length[at].tolist()):
                out[i] = self._keys[off : off + length].decode("utf-8", "surrogatepass")
            todo, hi, lo = todo[~hit], hi[~hit], lo[~hit]
        return out

    def _flush(self) -> None:
        """Turn the memtable into a sorted run, then merge runs while the newest is at least half the one before."""
        words = np.frombuffer(b"".join(self._memtable), dtype=_BIG_U64).reshape(-1, 2)
        keys = list(self._memtable.values())
        blob = "".join(keys).encode("utf-8", "surrogatepass")
        length = np.fromiter(map(len, keys), dtype=np.uint32, count=len(keys))
        if len(blob) != length.sum():  # not all ASCII: lengths in bytes, key by key
            length = np.fromiter((len(key.encode("utf-8", "surrogatepass")) for key in keys), np.uint32, len(keys))
        off = np.cumsum(length, dtype=np.uint64) - length + len(self._keys)
        self._keys += blob
        self._memtable = {}
        runs = self._runs
        runs.append(_sorted_run([words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64), off, length]))
        while len(runs) >= 2 and 2 * len(runs[-1].hi) >= len(runs[-2].hi):
            older, newer = list(runs.pop(-2)), list(runs.pop())
            # column by column, each old pair freed once copied: a merge of n rows peaks at ~44 n bytes, not 56 n
            runs.append(_sorted_run([np.concatenate((older.pop(0), newer.pop(0))) for _ in range(4)]))
