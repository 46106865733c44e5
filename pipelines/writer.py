"""Token shards, rejects, the commit protocol and the manifest.

Output layout (the contract documented in the README):

    OUTPUT/shards/<part>.parquet      kept samples, files of about `target_file_mb` each
    OUTPUT/rejects/<part>.parquet     the rejected samples of the same input shards (key, reason, detail, source)
    OUTPUT/_progress/<part>.json      commit record: the input shards the part holds, with their counts
    OUTPUT/_staging/                  parts being written; never read
    OUTPUT/manifest.json              counts, inputs done, files and throughput of the whole output

Input shards are the unit of work, parts the unit of commit. The rows of an input shard are collected until its
end-of-shard row and all its samples have arrived; then its duplicates are marked and its rows join the open part.
A part closes when its kept rows reach the target size, or at the end of the job: both files are written to
_staging/, then the commit record (the commit point), then the files are moved into shards/ and rejects/.
A job killed at any moment leaves every input shard in exactly one committed part or in none: the next run rolls
committed parts forward (finishes their moves), clears _staging/ and redoes every shard not in a record. Readers of
shards/ never see a partial file.

For the resume tests, `TOKENFLOW_FAILPOINT=<name>[:<n>]` SIGKILLs the process the n-th time (default 1st) it passes
the named point; the points are the `_failpoint` calls below.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REJECT_SCHEMA = pa.schema(
    [("key", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string())]
)
FORMAT_VERSION = "2"
MiB = 1 << 20

Claim = Callable[[list[str], list[str]], list[str | None]]
"""Dedup index: (image digests, keys) in order -> for each, the key that claimed the digest first, or None if new."""


def dedup_digest(image_sha256: str | None, conversations: str | None = None) -> str | None:
    """What exact duplicates are found by: the image bytes' digest; for a conversation (llava) the image and its
    turns together, as one image with other questions is another sample (LLaVA-1.5's mix reuses COCO images across
    its sources). None (never a duplicate) for a sample without an image: a text-only conversation."""
    if image_sha256 is None or conversations is None:
        return image_sha256
    return hashlib.sha256(f"{image_sha256}\n{conversations}".encode()).hexdigest()


_failpoint_hits: Counter = Counter()


def _failpoint(name: str) -> None:
    spec = os.environ.get("TOKENFLOW_FAILPOINT", "")
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _failpoint_hits[name] += 1
    if _failpoint_hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Pending:
    rows: list[dict] = field(default_factory=list)
    expected: int | None = None  # set by the end-of-shard row
    source: str = ""


@dataclass
class _Part:
    name: str
    kept: list[pa.Table] = field(default_factory=list)
    rejects: list[pa.Table] = field(default_factory=list)
    shards: dict[str, dict] = field(default_factory=dict)
    nbytes: int = 0  # kept + rejected rows held in memory; the part closes at the target size


class MetaSchema:
    """The metadata columns of a job's token shards, fixed by the first part with kept rows so that every file
    of the job has the same schema (Hugging Face `datasets`, Ray Data and DuckDB read the files as one table).

    Types: bool, int64, float64, string, or json (text) for lists, objects and mixed values. A later field that
    is not in the schema, or a value its column cannot hold (0.5 in an int64 column), goes to the `meta_extra`
    column as JSON, so nothing is dropped. A field whose name clashes with a core column is prefixed `meta_`."""

    EXTRA = "meta_extra"
    _ARROW = {
        "bool": pa.bool_(),
        "int64": pa.int64(),
        "float64": pa.float64(),
        "string": pa.string(),
        "json": pa.string(),
    }

    def __init__(self, fields: dict[str, str] | None = None):
        self.fields = fields  # field name -> type name; None until fixed

    @staticmethod
    def infer(values: list) -> str:
        present = [v for v in values if v is not None]
        if not present:
            return "string"
        if all(isinstance(v, bool) for v in present):
            return "bool"
        if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            return "int64"
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            return "float64"
        if all(isinstance(v, str) for v in present):
            return "string"
        return "json"

    @staticmethod
    def _fits(kind: str, v):
        """(True, stored value) when the column can hold v, else (False, None)."""
        if v is None:
            return True, None
        if kind == "bool":
            return isinstance(v, bool), v if isinstance(v, bool) else None
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if kind == "int64":
            ok = number and abs(v) < 2**63 and float(v).is_integer()  # (abs first: huge ints overflow float())
            return ok, int(v) if ok else None
        if kind == "float64":
            return number, float(v) if number else None
        if kind == "string":
            return isinstance(v, str), v if isinstance(v, str) else None
        return True, json.dumps(v)  # json

    def columns(self, metas: list[dict], core: list[str]) -> dict[str, pa.Array]:
        """The metadata columns (and meta_extra) for rows whose metadata are `metas`; fixes the schema if needed."""
        if self.fields is None:
            names = sorted({k for m in metas for k in m})
            self.fields = {name: self.infer([m.get(name) for m in metas]) for name in names}
        out: dict[str, list] = {name: [] for name in self.fields}
        extra: list[str | None] = []
        for m in metas:
            rest = {k: v for k, v in m.items() if k not in self.fields}
            for name, kind in self.fields.items():
                ok, value = self._fits(kind, m.get(name))
                out[name].append(value)
                if not ok:
                    rest[name] = m[name]
            extra.append(json.dumps(rest, sort_keys=True) if rest else None)
        taken = {*core, self.EXTRA}
        cols = {
            (name if name not in taken else f"meta_{name}"): pa.array(values, self._ARROW[self.fields[name]])
            for name, values in out.items()
        }
        cols[self.EXTRA] = pa.array(extra, pa.string())
        return cols


class ShardWriter:
    """Collects rows per input shard, packs finished shards into parts of a target size and commits them."""

    def __init__(
        self,
        output: str,
        *,
        file_metadata: dict[str, str],
        token_dtype: np.dtype,
        claim: Claim | None = None,
        target_file_mb: float = 256.0,
        row_group_mb: float = 32.0,
        conversations: bool = False,
        storage_options: dict | None = None,
    ):
        """`conversations`: the job reads llava annotations, and its shards get a `conversations` column."""
        self.fs, self.root = fsspec.core.url_to_fs(output, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.file_metadata = {**file_metadata, "tokenflow_shard_format": FORMAT_VERSION}
        self.token_type = pa.list_(pa.from_numpy_dtype(token_dtype))
        self.token_dtype = token_dtype
        self.claim = claim
        self.conversations = conversations
        self.target_bytes = max(1, int(target_file_mb * MiB))
        self.row_group_bytes = max(1, int(row_group_mb * MiB))
        self.pending: dict[str, _Pending] = defaultdict(_Pending)
        self.run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        self.seq = 0
        self.part: _Part | None = None
        self.meta = MetaSchema()

    # ---- resume -------------------------------------------------------------------------------------------------

    def records(self) -> list[dict]:
        """Commit records of all committed parts, in name order."""
        out = []
        for path in sorted(self.fs.glob(f"{self.root}/_progress/*.json")):
            with self.fs.open(path, "r") as fh:
                out.append(json.load(fh))
        return out

    def recover(self) -> dict[str, dict]:
        """Finish the moves of committed parts, drop uncommitted staging files; return committed shards by id."""
        done = {}
        for rec in self.records():
            if rec.get("meta_fields") is not None and self.meta.fields is None:
                self.meta = MetaSchema(rec["meta_fields"])
            for relpath in filter(None, (rec["shards_file"], rec["rejects_file"])):
                final, staged = f"{self.root}/{relpath}", f"{self.root}/_staging/{relpath}"
                if not self.fs.exists(final):
                    if not self.fs.exists(staged):
                        raise RuntimeError(f"{final} is committed in _progress/{rec['name']}.json but missing")
                    self._move(staged, final)
            for shard_id, info in rec["shards"].items():
                done[shard_id] = {**info, "part": rec["name"], "tokenizer_id": rec["tokenizer_id"]}
        if self.fs.exists(f"{self.root}/_staging"):
            self.fs.rm(f"{self.root}/_staging", recursive=True)
        return done

    def committed_digests(self, batch_rows: int = 65_536):
        """(dedup digests, keys) of every committed kept sample with an image, in commit order, in batches (to
        rebuild dedup)."""
        for rec in self.records():
            if rec["kept"] == 0:
                continue
            with self.fs.open(f"{self.root}/{rec['shards_file']}", "rb") as fh:
                pf = pq.ParquetFile(fh)
                columns = [c for c in ("key", "image_sha256", "conversations") if c in pf.schema_arrow.names]
                for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                    col = batch.to_pydict()
                    turns = col.get("conversations", [None] * batch.num_rows)
                    found = [(dedup_digest(i, t), k) for k, i, t in zip(col["key"], col["image_sha256"], turns)]
                    found = [(d, k) for d, k in found if d is not None]
                    yield [d for d, _ in found], [k for _, k in found]

    # ---- streaming in -------------------------------------------------------------------------------------------

    def add(self, batch: pa.Table) -> list[str]:
        """Take a batch of rows; return the input shards it completed (they joined the open part)."""
        done = []
        touched = set()
        for row in batch.to_pylist():
            p = self.pending[row["shard_id"]]
            if row["end_of_shard"] >= 0:
                p.expected = int(row["end_of_shard"])
                p.source = row["source"]
            else:
                p.rows.append(row)
            touched.add(row["shard_id"])
        for shard_id in sorted(touched):
            p = self.pending[shard_id]
            if p.expected is not None and len(p.rows) == p.expected:
                self._finish_shard(shard_id, self.pending.pop(shard_id))
                done.append(shard_id)
        return done

    def unfinished(self) -> list[str]:
        return sorted(self.pending)

    def close(self) -> None:
        """Commit the open part (the end of the job)."""
        if self.part is not None and self.part.shards:
            self._commit(self.part)
        self.part = None
        if self.fs.exists(f"{self.root}/_staging"):  # empty directories, on filesystems that have them
            self.fs.rm(f"{self.root}/_staging", recursive=True)

    def _finish_shard(self, shard_id: str, p: _Pending) -> None:
        rows = sorted(p.rows, key=lambda r: r["key"])  # deterministic order, and first-key-wins dedup in a shard
        digests = {r["key"]: dedup_digest(r["image_sha256"], r.get("conversations")) for r in rows}
        candidates = [r for r in rows if not r["reason"] and digests[r["key"]] is not None]
        if self.claim is not None and candidates:
            firsts = self.claim([digests[r["key"]] for r in candidates], [r["key"] for r in candidates])
            for r, first in zip(candidates, firsts):
                if first is not None:
                    same = "image bytes and conversations" if r.get("conversations") is not None else "image bytes"
                    r["reason"], r["detail"] = "duplicate", f"same {same} as {first}"
        kept = [r for r in rows if not r["reason"]]
        rejects = [r for r in rows if r["reason"]]
        if self.part is None:
            self.part = _Part(name=f"part-{self.run_id}-{self.seq:05d}")
            self.seq += 1
        part = self.part
        if kept:
            table = self._kept_table(kept)
            part.kept.append(table)
            part.nbytes += table.nbytes
        if rejects:
            table = self._rejects_table(rejects)
            part.rejects.append(table)
            part.nbytes += table.nbytes
        part.shards[shard_id] = {
            "source": p.source,
            "kept": len(kept),
            "rejected": len(rejects),
            "reasons": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        }
        _failpoint("shard_joined_part")
        if part.nbytes >= self.target_bytes:
            self.close()

    # ---- commit -------------------------------------------------------------------------------------------------

    def _commit(self, part: _Part) -> None:
        shards_file, rejects_file = f"shards/{part.name}.parquet", f"rejects/{part.name}.parquet"
        kept = _concat(part.kept, self._kept_table([]).schema)
        rejects = _concat(part.rejects, REJECT_SCHEMA)
        if kept.num_rows:
            self._write_parquet(f"_staging/{shards_file}", self._with_meta_columns(kept))
        else:  # no file: its metadata schema could not be the job's before a part with rows has fixed it
            shards_file = None
        self._write_parquet(f"_staging/{rejects_file}", rejects)
        _failpoint("part_staged")
        shards = part.shards
        record = {
            "name": part.name,
            "shards_file": shards_file,
            "rejects_file": rejects_file,
            "kept": kept.num_rows,
            "rejected": rejects.num_rows,
            "reasons": dict(sorted(sum((Counter(s["reasons"]) for s in shards.values()), Counter()).items())),
            "tokenizer_id": self.file_metadata.get("tokenizer_id"),
            "meta_fields": self.meta.fields,
            "committed_at": time.time(),
            "shards": dict(sorted(shards.items())),
        }
        self._write_bytes(f"_progress/{part.name}.json", json.dumps(record, indent=1).encode())
        _failpoint("part_recorded")
        if shards_file:
            self._move(f"{self.root}/_staging/{shards_file}", f"{self.root}/{shards_file}")
        _failpoint("part_half_moved")
        self._move(f"{self.root}/_staging/{rejects_file}", f"{self.root}/{rejects_file}")
        _failpoint("part_committed")

    def _kept_table(self, rows: list[dict]) -> pa.Table:
        tokens = [None if r["tokens"] is None else np.frombuffer(r["tokens"], dtype=self.token_dtype) for r in rows]
        cols = {
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
        }
        if self.conversations:  # llava jobs only: the other formats' shards keep their schema
            cols["conversations"] = pa.array([r.get("conversations") for r in rows], pa.string())  # the turns, JSON
        cols |= {
            "tokens": pa.array(tokens, self.token_type),  # null for a text-only conversation (so are size and digest)
            "width": pa.array([r["width"] for r in rows], pa.int32()),
            "height": pa.array([r["height"] for r in rows], pa.int32()),
            "image_sha256": pa.array([r["image_sha256"] for r in rows], pa.string()),
            "clip_score": pa.array([r.get("clip_score") for r in rows], pa.float32()),
            "source": pa.array([r["source"] for r in rows], pa.string()),
            "_meta": pa.array([r["meta"] for r in rows], pa.string()),  # JSON; columns are made at commit
        }
        return pa.table(cols)

    def _with_meta_columns(self, table: pa.Table) -> pa.Table:
        """Expand the `_meta` JSON column into the job's metadata columns."""
        metas = [json.loads(m or "{}") for m in table.column("_meta").to_pylist()]
        table = table.drop_columns(["_meta"])
        for name, column in self.meta.columns(metas, core=table.column_names).items():
            table = table.append_column(name, column)
        return table

    def _rejects_table(self, rows: list[dict]) -> pa.Table:
        return pa.table(
            {name: pa.array([r[name] for r in rows], pa.string()) for name in REJECT_SCHEMA.names},
            schema=REJECT_SCHEMA,
        )

    def _write_parquet(self, relpath: str, table: pa.Table) -> None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.file_metadata})
        path = f"{self.root}/{relpath}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        with self.fs.open(path, "wb") as fh:
            pq.write_table(table, fh, row_group_size=max(1, self.row_group_bytes // row_bytes))

    def _write_bytes(self, relpath: str, data: bytes) -> None:
        path = f"{self.root}/{relpath}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(f"{path}.tmp", "wb") as fh:
            fh.write(data)
        self._move(f"{path}.tmp", path)

    def _move(self, src: str, dst: str) -> None:
        self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(src, dst)

    # ---- manifest -----------------------------------------------------------------------------------------------

    def read_manifest(self) -> dict | None:
        path = f"{self.root}/manifest.json"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as fh:
            return json.load(fh)

    def remove_manifest(self) -> None:
        """Drop the manifest of an earlier run: while shards are added it would describe an outdated output."""
        path = f"{self.root}/manifest.json"
        if self.fs.exists(path):
            self.fs.rm(path)

    def write_manifest(self, extra: dict) -> dict:
        """Aggregate every commit record into OUTPUT/manifest.json and return it."""
        records = self.records()
        reasons: Counter = Counter()
        for rec in records:
            reasons.update(rec["reasons"])
        kept = sum(rec["kept"] for rec in records)
        rejected = sum(rec["rejected"] for rec in records)
        manifest = {
            **extra,
            "counts": {
                "samples": kept + rejected,
                "kept": kept,
                "rejected": rejected,
                "reasons": dict(sorted(reasons.items())),
            },
            "shards_done": sum(len(rec["shards"]) for rec in records),
            "inputs_done": sorted({s["source"] for rec in records for s in rec["shards"].values()}),
            "files": [{"path": rec["shards_file"], "rows": rec["kept"]} for rec in records if rec["shards_file"]]
            + [{"path": rec["rejects_file"], "rows": rec["rejected"]} for rec in records],
        }
        self._write_bytes("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        return manifest


def _concat(tables: list[pa.Table], empty_schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables) if tables else empty_schema.empty_table()
