"""ShardWriter without Ray: packing input shards into parts, the commit protocol under a crash at every point,
duplicates, metadata columns, row groups."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines.writer as writer_mod
from pipelines.pretokenize import FILTERED_SCHEMA
from pipelines.writer import ShardWriter

TOKENS = 100  # uint16 tokens per sample: 200 bytes


def _rows(shard: str, n: int, *, dup_of: dict | None = None, meta=None, reject_every=0) -> list[dict]:
    """n sample rows of one input shard, then its end-of-shard row."""
    rows = []
    for i in range(n):
        key = f"{shard}/{i:03d}"
        content = (dup_of or {}).get(i, key)
        reason = "too_small" if reject_every and i % reject_every == 0 else None
        rows.append(
            {
                "key": key,
                "source": f"/in/{shard}",
                "caption": f"caption {key}",
                "meta": json.dumps(meta(i)) if meta else None,
                "reason": reason,
                "detail": "8x8" if reason else None,
                "shard_id": shard,
                "end_of_shard": -1,
                "width": 64,
                "height": 48,
                "image_sha256": hashlib.sha256(content.encode()).hexdigest(),
                "clip_score": None,
                "tokens": None if reason else np.full(TOKENS, i, np.uint16).tobytes(),
            }
        )
    rows.append({"key": f"{shard}#end", "source": f"/in/{shard}", "shard_id": shard, "end_of_shard": n})
    return rows


# what the tokenize stage hands the writer: the filter stage's schema with tokens in place of pixels
TOKENIZED_SCHEMA = FILTERED_SCHEMA.remove(FILTERED_SCHEMA.get_field_index("pixels")).append(
    pa.field("tokens", pa.binary())
)


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)


def _dict_claim():
    seen: dict[str, str] = {}

    def claim(digests, keys):
        out = []
        for digest, key in zip(digests, keys):
            out.append(seen.get(digest))
            seen.setdefault(digest, key)
        return out

    return claim


def _writer(out, **kw) -> ShardWriter:
    kw = {"claim": _dict_claim(), **kw}
    return ShardWriter(str(out), file_metadata={"tokenizer_id": "t1"}, token_dtype=np.dtype(np.uint16), **kw)


def _read(out):
    """Kept and rejected rows by key, as a reader globbing shards/ and rejects/ sees them."""
    kept = [r for p in out.glob("shards/*.parquet") for r in pq.read_table(p).to_pylist()]
    rejects = [r for p in out.glob("rejects/*.parquet") for r in pq.read_table(p).to_pylist()]
    return {r["key"]: r for r in kept}, {r["key"]: r for r in rejects}


SHARDS = {f"{i:05d}.tar": 20 for i in range(6)}  # 6 shards x 20 samples x ~300 bytes


def _feed(w: ShardWriter, shards=SHARDS, **row_kw) -> None:
    # interleave the shards' rows the way Ray delivers them: out of order, in small batches
    rows = [r for shard, n in shards.items() for r in _rows(shard, n, **row_kw)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    for start in range(0, len(rows), 7):
        w.add(_table([rows[i] for i in order[start : start + 7]]))


def test_parts_pack_shards_to_the_target_size(tmp_path):
    w = _writer(tmp_path, target_file_mb=10_000 / 2**20, row_group_mb=2_000 / 2**20)  # ~10 kB parts, 2 kB groups
    _feed(w)
    w.close()
    manifest = w.write_manifest({})
    records = w.records()
    assert sorted(s for r in records for s in r["shards"]) == sorted(SHARDS)  # each shard in exactly one part
    assert 1 < len(records) < len(SHARDS)  # several shards per part, several parts
    kept, _ = _read(tmp_path)
    assert len(kept) == sum(SHARDS.values()) == manifest["counts"]["kept"]
    for rec in records:
        pf = pq.ParquetFile(tmp_path / rec["shards_file"])
        assert pf.metadata.num_rows == rec["kept"] == sum(s["kept"] for s in rec["shards"].values())
        groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        assert max(groups) <= 2_000 // 200 and len(groups) > 1
        assert pf.schema_arrow.metadata[b"tokenizer_id"] == b"t1"
    assert manifest["inputs_done"] == sorted(f"/in/{s}" for s in SHARDS)
    assert not (tmp_path / "_staging").exists()


@pytest.mark.parametrize(
    "point", ["shard_joined_part", "part_staged", "part_recorded", "part_half_moved", "part_committed"]
)
@pytest.mark.parametrize("nth", [1, 2])
def test_a_crash_at_any_point_then_resume_gives_every_key_once(tmp_path, monkeypatch, point, nth):
    reference = tmp_path / "reference"
    w = _writer(reference, target_file_mb=10_000 / 2**20)
    _feed(w, reject_every=5)
    w.close()
    want_kept, want_rejects = _read(reference)

    class Crash(Exception):
        pass

    hits = []

    def failpoint(name):
        if name == point:
            hits.append(name)
            if len(hits) == nth:
                raise Crash

    out = tmp_path / "out"
    monkeypatch.setattr(writer_mod, "_failpoint", failpoint)
    w = _writer(out, target_file_mb=10_000 / 2**20)
    with pytest.raises(Crash):
        _feed(w, reject_every=5)
        w.close()
    monkeypatch.undo()

    # what a reader sees after the crash: complete files only, and nothing uncommitted outside _staging/
    committed = {r["name"] for r in _writer(out).records()}
    for path in list(out.glob("shards/*.parquet")) + list(out.glob("rejects/*.parquet")):
        assert path.stem in committed
        pq.read_table(path)

    # resume: roll committed parts forward, redo the other shards
    w = _writer(out, target_file_mb=10_000 / 2**20)
    done = w.recover()
    assert not (out / "_staging").exists()
    for digests, keys in w.committed_digests():
        w.claim(digests, keys)
    _feed(w, shards={s: n for s, n in SHARDS.items() if s not in done}, reject_every=5)
    w.close()
    kept, rejects = _read(out)
    assert kept.keys() == want_kept.keys() and rejects.keys() == want_rejects.keys()
    assert {k: r["tokens"] for k, r in kept.items()} == {k: r["tokens"] for k, r in want_kept.items()}
    assert w.write_manifest({})["counts"]["samples"] == sum(SHARDS.values())


def test_duplicates_first_claim_wins_within_and_across_shards(tmp_path):
    w = _writer(tmp_path)
    for batch in (
        _rows("a.tar", 4, dup_of={3: "a.tar/001"}),  # a.tar/003 has a.tar/001's bytes
        _rows("b.tar", 3, dup_of={0: "a.tar/002"}),  # b.tar/000 has a.tar/002's bytes
    ):
        w.add(_table(batch))
    w.close()
    kept, rejects = _read(tmp_path)
    assert sorted(kept) == ["a.tar/000", "a.tar/001", "a.tar/002", "b.tar/001", "b.tar/002"]
    assert {k: (r["reason"], r["detail"]) for k, r in rejects.items()} == {
        "a.tar/003": ("duplicate", "same image bytes as a.tar/001"),
        "b.tar/000": ("duplicate", "same image bytes as a.tar/002"),
    }


def test_an_invalid_copy_never_claims_an_image(tmp_path):
    w = _writer(tmp_path)
    w.add(_table(_rows("a.tar", 3, dup_of={0: "a.tar/001"}, reject_every=2)))  # 000 (rejected) copies 001
    w.close()
    kept, rejects = _read(tmp_path)
    assert sorted(kept) == ["a.tar/001"] and rejects["a.tar/000"]["reason"] == "too_small"


def test_metadata_schema_is_fixed_by_the_first_part_with_rows_and_nothing_is_lost(tmp_path):
    w = _writer(tmp_path, target_file_mb=1e-9)  # every input shard closes its own part
    w.add(_table(_rows("0.tar", 2, reject_every=1, meta=lambda i: {"only_here": i})))  # no kept rows: no file
    w.add(_table(_rows("a.tar", 2, meta=lambda i: {"punsafe": 0.5 * i, "width": 999, "tags": [i], "note": None})))
    w.add(_table(_rows("b.tar", 2, meta=lambda i: {"punsafe": i, "url": f"http://x/{i}", "note": "n"})))
    w.add(_table(_rows("c.tar", 1, meta=lambda i: {"punsafe": "n/a", "width": 1.5, "tags": "t"})))
    w.close()
    records = w.records()
    assert [r["shards_file"] is None for r in records] == [True, False, False, False]
    assert all(
        r["meta_fields"] == {"note": "string", "punsafe": "float64", "tags": "json", "width": "int64"}
        for r in records[1:]
    )
    files = sorted((tmp_path / "shards").glob("*.parquet"))
    assert len(files) == 3
    schemas = {pq.read_schema(f).remove_metadata() for f in files}
    assert len(schemas) == 1  # one schema for the whole job
    (schema,) = schemas
    assert schema.field("punsafe").type == pa.float64() and schema.field("meta_width").type == pa.int64()
    assert schema.field("width").type == pa.int32()  # the core column, never shadowed
    rows = {r["key"]: r for f in files for r in pq.read_table(f).to_pylist()}
    assert rows["a.tar/001"]["punsafe"] == 0.5 and rows["a.tar/001"]["meta_width"] == 999
    assert rows["a.tar/001"]["tags"] == "[1]" and rows["a.tar/001"]["meta_extra"] is None
    assert rows["b.tar/001"]["punsafe"] == 1.0 and rows["b.tar/001"]["note"] == "n"
    assert json.loads(rows["b.tar/001"]["meta_extra"]) == {"url": "http://x/1"}  # a field the schema lacks
    c = rows["c.tar/000"]  # values their columns cannot hold
    assert c["punsafe"] is None and c["meta_width"] is None and c["tags"] == '"t"'
    assert json.loads(c["meta_extra"]) == {"punsafe": "n/a", "width": 1.5}
    files_listed = [f["path"] for f in w.write_manifest({})["files"]]
    assert [f for f in files_listed if f.startswith("shards/")] == [r["shards_file"] for r in records[1:]]
    assert [f for f in files_listed if f.startswith("rejects/")] == [r["rejects_file"] for r in records]


def test_resume_keeps_the_metadata_schema(tmp_path):
    w = _writer(tmp_path, target_file_mb=1e-9)
    w.add(_table(_rows("a.tar", 1, meta=lambda i: {"punsafe": 0.5})))
    w.close()
    w = _writer(tmp_path, target_file_mb=1e-9)
    w.recover()
    w.add(_table(_rows("b.tar", 1, meta=lambda i: {"url": "u"})))
    w.close()
    files = sorted((tmp_path / "shards").glob("*.parquet"))
    assert len({pq.read_schema(f).remove_metadata() for f in files}) == 1


def test_a_part_whose_committed_file_is_gone_is_reported(tmp_path):
    w = _writer(tmp_path)
    w.add(_table(_rows("a.tar", 2)))
    w.close()
    (name,) = [r["name"] for r in w.records()]
    (tmp_path / "shards" / f"{name}.parquet").unlink()
    with pytest.raises(RuntimeError, match="committed in _progress/.* but missing"):
        _writer(tmp_path).recover()


def test_meta_schema_edge_values():
    from pipelines.writer import MetaSchema

    schema = MetaSchema()
    cols = schema.columns([{"n": 1, "meta_extra": "x", "f": 0.5}], core=["key"])
    assert schema.fields == {"f": "float64", "meta_extra": "string", "n": "int64"}
    assert sorted(cols) == ["f", "meta_extra", "meta_meta_extra", "n"]  # an input field never hides meta_extra
    cols = schema.columns([{"n": 2**70, "f": float("inf")}, {"n": 3.0, "f": True}], core=["key"])
    assert cols["n"].to_pylist() == [None, 3] and cols["f"].to_pylist() == [float("inf"), None]
    assert [json.loads(e) for e in cols["meta_extra"].to_pylist()] == [{"n": 2**70}, {"f": True}]
