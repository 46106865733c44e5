import hashlib
import math
import random

import numpy as np
import pytest

from pipelines.dedup import DedupIndex, partition_of


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def random_digests(rng: random.Random, n: int) -> list[str]:
    return [rng.randbytes(32).hex() for _ in range(n)]


def test_claim_returns_first_key_across_calls_and_inside_a_batch():
    index = DedupIndex()
    assert index.claim([sha(0), sha(1), sha(0), sha(2), sha(0)], ["a", "b", "c", "d", "e"]) == [
        None,
        None,
        "a",
        None,
        "a",
    ]
    assert index.claim([sha(2), sha(3), sha(3)], ["x", "y", "z"]) == ["d", None, "y"]
    assert len(index) == 4
    assert index.first_key(sha(1)) == "b" and index.first_key(sha(9)) is None
    assert sha(3) in index and sha(9) not in index
    assert index.claim([], []) == []


def test_claims_survive_flushes_and_merges_and_runs_stay_logarithmic():
    index = DedupIndex(memtable_rows=4)
    n = 3000
    for start in range(0, n, 3):  # batches of 3 against a memtable of 4: flushes of 4-6 rows, many merges
        batch = range(start, min(start + 3, n))
        assert index.claim([sha(i) for i in batch], [f"k{i}" for i in batch]) == [None] * len(batch)
        assert index.runs <= math.log2(len(index) / 4 + 1) + 1
    assert index.runs >= 2 and len(index) == n
    # every digest again, in one batch and interleaved with new ones: all answered from the runs or the memtable
    again = [sha(i) for i in range(n)] + [sha(n)]
    assert index.claim(again, ["late"] * (n + 1)) == [f"k{i}" for i in range(n)] + [None]
    assert index.claim([sha(n), sha(n + 1)], ["later", "new"]) == ["late", None]
    # one batch much larger than the memtable is flushed chunk by chunk, repeats across chunks included
    big = [sha(i) for i in range(n + 2, 2 * n)]
    assert index.claim(big + big[:10], ["b"] * len(big) + ["c"] * 10) == [None] * len(big) + ["b"] * 10
    assert index.runs <= math.log2(len(index) / 4 + 1) + 1
    assert [index.first_key(sha(i)) for i in (0, 1234, n - 1, n + 1)] == ["k0", "k1234", f"k{n - 1}", "new"]


@pytest.mark.parametrize("seed, memtable_rows", [(0, 1), (1, 5), (2, 64), (3, 1 << 18)])
def test_matches_a_dict_on_random_batches(seed, memtable_rows):
    rng = random.Random(seed)
    pool = random_digests(rng, 2000)
    stream = [rng.choice(pool) for _ in range(6000)]  # ~95% of the pool appears, most digests several times
    index, reference = DedupIndex(memtable_rows), {}
    pos = 0
    while pos < len(stream):
        size = rng.choice([0, 1, 2, 7, 50, 300])
        digests = stream[pos : pos + size]
        keys = [f"key-{pos + i}" for i in range(len(digests))]
        expected = []
        for digest, key in zip(digests, keys):
            expected.append(reference.get(digest))
            reference.setdefault(digest, key)
        assert index.claim(digests, keys) == expected
        pos += size
    assert len(index) == len(reference)
    assert all(index.first_key(d) == k for d, k in reference.items())
    assert all(index.first_key(d) is None for d in random_digests(rng, 100))


def test_digests_sharing_their_first_64_bits_are_told_apart():
    prefix = "0123456789abcdef"
    same_hi = [prefix + f"{lo:016x}" + "0" * 32 for lo in (5, 1, 9, 3, 7, 2, 8)]
    index = DedupIndex(memtable_rows=2)
    index.claim(same_hi[:2], ["a", "b"])  # one run of two equal-hi entries
    index.claim(same_hi[2:4] + [sha(0)], ["c", "d", "x"])  # a second run, merged with the first
    index.claim(same_hi[4:], ["e", "f", "g"])
    assert index.runs == 1 and len(index) == 8
    assert index.claim(list(reversed(same_hi)), ["z"] * 7) == ["g", "f", "e", "d", "c", "b", "a"]
    for lo in (0, 4, 6, 10, 0xFFFFFFFFFFFFFFFF):  # absent lo between, before and after the present ones
        assert prefix + f"{lo:016x}" + "0" * 32 not in index


def test_only_the_first_128_bits_and_not_the_case_identify_a_digest():
    index = DedupIndex(memtable_rows=1)
    digest = sha(42)
    index.claim([digest], ["first"])
    assert index.claim([digest[:32] + "0" * 32, digest.upper()], ["a", "b"]) == ["first", "first"]


def test_non_ascii_keys_round_trip_through_memtable_and_runs():
    keys = ["データ/0001", "ñandú/ü", "emoji/🙂", "lone-surrogate/\ud800", ""]
    index = DedupIndex(memtable_rows=3)
    index.claim([sha(i) for i in range(5)], keys)  # flushed into a run
    index.claim([sha(10)], ["Ελληνικά"])  # stays in the memtable
    assert index.claim([sha(i) for i in (0, 1, 2, 3, 4, 10)], ["z"] * 6) == keys + ["Ελληνικά"]


@pytest.mark.parametrize(
    "bad",
    ["abc", "g" * 64, "  " + "a" * 62, "a" * 65, "é" * 64, b"a" * 64, None],
    ids=["short", "non-hex", "whitespace", "long", "non-ascii", "bytes", "none"],
)
def test_bad_digest_raises_naming_it_and_leaves_the_index_unchanged(bad):
    index = DedupIndex()
    with pytest.raises(ValueError, match="not a sha256 hex digest") as info:
        index.claim([sha(0), bad, sha(1)], ["a", "b", "c"])
    assert repr(bad) in str(info.value)
    assert len(index) == 0
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        index.first_key(bad)
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        partition_of(bad, 4)


def test_bad_batch_shapes_and_keys_are_rejected():
    index = DedupIndex()
    with pytest.raises(ValueError, match="2 digests for 1 keys"):
        index.claim([sha(0), sha(1)], ["a"])
    with pytest.raises(TypeError, match="keys must be str"):
        index.claim([sha(0)], [7])
    with pytest.raises(ValueError, match="memtable_rows"):
        DedupIndex(memtable_rows=0)
    assert len(index) == 0


def test_partition_of_is_in_range_by_leading_digits_and_uniform():
    assert partition_of("0" * 64, 4) == 0 and partition_of("4" + "0" * 63, 4) == 1 and partition_of("f" * 64, 4) == 3
    rng = random.Random(0)
    digests = random_digests(rng, 16000)
    for partitions in (1, 3, 8, 1000):
        counts = [0] * partitions
        for d in digests:
            counts[partition_of(d, partitions)] += 1
        if partitions <= 8:  # binomial sd ~ 40 for 2000 per partition: 10% is >4.5 sd
            assert max(abs(c - len(digests) / partitions) for c in counts) < 0.1 * len(digests) / partitions
        else:
            assert sum(counts) == len(digests) and max(counts) < 40  # mean 16
    assert partition_of("f" * 64, np.int64(1000)) == 999  # numpy ints as well, without overflow
    with pytest.raises(ValueError, match="partitions"):
        partition_of(sha(0), 0)


def test_memory_per_entry_is_28_bytes_plus_the_key(capsys):
    n = 200_000
    rng = random.Random(0)
    keys = [f"laion400m/part-{i // 10_000:05d}/{i:09d}" for i in range(n)]  # 30 ASCII characters
    index = DedupIndex(memtable_rows=1 << 12)
    for start in range(0, n, 8192):
        index.claim(random_digests(rng, len(keys[start : start + 8192])), keys[start : start + 8192])
    per_entry = index.nbytes / len(index)
    with capsys.disabled():
        print(f"\nDedupIndex: {per_entry:.1f} bytes/entry for {n} entries with 30-byte keys, {index.runs} runs")
    assert len(index) == n
    # 16 digest bytes + 12 for (offset, length) + 30 key bytes = 58, plus the key buffer's over-allocation (up to
    # 1/8 of the key bytes) and the unflushed memtable (here 3392 entries at ~170 bytes: ~3 bytes an entry)
    assert 58 <= per_entry < 64
