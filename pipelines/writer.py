"""Token shards, rejects, the per-shard commit protocol and the manifest.

Output layout (the contract documented in the README):

    OUTPUT/shards/<shard_id>.parquet     kept samples of one input shard
    OUTPUT/rejects/<shard_id>.parquet    rejected samples of that shard (key, reason, detail, source)
    OUTPUT/_progress/<shard_id>.json     commit marker: written last, so a shard without it is redone
    OUTPUT/manifest.json                 counts, files and throughput of the whole output

The input shard is the unit of work: all rows of a shard are collected, duplicates against every shard
committed before are marked, both files are written (to a temporary name, then moved into place, so readers
never see a partial file), and only then the marker. A job killed at any point leaves shards that are either
committed or redone from scratch by the next run, under the same deterministic file names.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CORE_COLUMNS = ("key", "caption", "tokens", "width", "height", "image_sha256", "clip_score", "source")
REJECT_SCHEMA = pa.schema(
    [("key", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string())]
)
FORMAT_VERSION = "1"


def shard_stem(shard_id: str) -> str:
    """File stem of an input shard's outputs: its relative path (the folder-tree root "." becomes "_root")."""
    return "_root" if shard_id in ("", ".") else shard_id.strip("/")


@dataclass
class _Pending:
    rows: list[dict] = field(default_factory=list)
    expected: int | None = None  # set by the end-of-shard row
    source: str = ""


class ShardWriter:
    """Collects rows per input shard and commits each shard once all its rows have arrived."""

    def __init__(
        self,
        output: str,
        *,
        file_metadata: dict[str, str],
        token_dtype: np.dtype,
        dedup: bool = True,
        row_group_size: int = 8192,
        storage_options: dict | None = None,
    ):
        self.fs, self.root = fsspec.core.url_to_fs(output, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.file_metadata = {**file_metadata, "tokenflow_shard_format": FORMAT_VERSION}
        self.token_type = pa.list_(pa.from_numpy_dtype(token_dtype))
        self.token_dtype = token_dtype
        self.dedup = dedup
        self.row_group_size = row_group_size
        self.pending: dict[str, _Pending] = defaultdict(_Pending)
        self.seen: dict[str, str] = {}  # image_sha256 -> key of the kept sample

    # ---- resume -------------------------------------------------------------------------------------------------

    def committed(self) -> dict[str, dict]:
        """Progress markers of committed shards, by shard id."""
        pattern = f"{self.root}/_progress/**/*.json"
        out = {}
        for path in sorted(self.fs.glob(pattern)):
            with self.fs.open(path, "r") as fh:
                marker = json.load(fh)
            out[marker["shard_id"]] = marker
        return out

    def load_seen_hashes(self, markers: dict[str, dict]) -> None:
        """Rebuild the duplicate index from committed shards (reads two columns of each shard file)."""
        if not self.dedup:
            return
        for marker in markers.values():
            path = f"{self.root}/{marker['shards_file']}"
            if marker["kept"] == 0:
                continue
            with self.fs.open(path, "rb") as fh:
                table = pq.read_table(fh, columns=["key", "image_sha256"])
            for key, digest in zip(table["key"].to_pylist(), table["image_sha256"].to_pylist()):
                self.seen.setdefault(digest, key)

    # ---- streaming in -------------------------------------------------------------------------------------------

    def add(self, batch: pa.Table) -> list[str]:
        """Take a batch of rows; commit and return the shards it completed."""
        done = []
        touched = set()
        for row in batch.to_pylist():
            shard_id = row["shard_id"]
            p = self.pending[shard_id]
            if row["end_of_shard"] >= 0:
                p.expected = int(row["end_of_shard"])
                p.source = row["source"]
            else:
                p.rows.append(row)
            touched.add(shard_id)
        for shard_id in sorted(touched):
            p = self.pending[shard_id]
            if p.expected is not None and len(p.rows) == p.expected:
                self._commit(shard_id, self.pending.pop(shard_id))
                done.append(shard_id)
        return done

    def unfinished(self) -> list[str]:
        return sorted(self.pending)

    # ---- commit -------------------------------------------------------------------------------------------------

    def _commit(self, shard_id: str, p: _Pending) -> None:
        rows = sorted(p.rows, key=lambda r: r["key"])  # deterministic order, and first-key-wins dedup in a shard
        kept, rejects = [], []
        for r in rows:
            if not r["reason"] and self.dedup:
                first = self.seen.get(r["image_sha256"])
                if first is not None:
                    r["reason"], r["detail"] = "duplicate", f"same image bytes as {first}"
                else:
                    self.seen[r["image_sha256"]] = r["key"]
            (rejects if r["reason"] else kept).append(r)
        stem = shard_stem(shard_id)
        shards_file, rejects_file = f"shards/{stem}.parquet", f"rejects/{stem}.parquet"
        self._write(shards_file, self._kept_table(kept))
        self._write(rejects_file, self._rejects_table(rejects))
        marker = {
            "shard_id": shard_id,
            "source": p.source,
            "kept": len(kept),
            "rejected": len(rejects),
            "reasons": dict(sorted(Counter(r["reason"] for r in rejects).items())),
            "tokenizer_id": self.file_metadata.get("tokenizer_id"),
            "shards_file": shards_file,
            "rejects_file": rejects_file,
            "committed_at": time.time(),
        }
        self._write_bytes(f"_progress/{stem}.json", json.dumps(marker, indent=1).encode())

    def _kept_table(self, rows: list[dict]) -> pa.Table:
        cols = {
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            "tokens": pa.array([np.frombuffer(r["tokens"], dtype=self.token_dtype) for r in rows], self.token_type),
            "width": pa.array([r["width"] for r in rows], pa.int32()),
            "height": pa.array([r["height"] for r in rows], pa.int32()),
            "image_sha256": pa.array([r["image_sha256"] for r in rows], pa.string()),
            "clip_score": pa.array([r.get("clip_score") for r in rows], pa.float32()),
            "source": pa.array([r["source"] for r in rows], pa.string()),
        }
        metas = [json.loads(r["meta"] or "{}") for r in rows]
        for name in sorted({k for m in metas for k in m}):
            column = name if name not in cols else f"meta_{name}"
            cols[column] = _meta_column([m.get(name) for m in metas])
        return pa.table(cols)

    def _rejects_table(self, rows: list[dict]) -> pa.Table:
        return pa.table(
            {name: pa.array([r[name] for r in rows], pa.string()) for name in REJECT_SCHEMA.names},
            schema=REJECT_SCHEMA,
        )

    def _write(self, relpath: str, table: pa.Table) -> None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.file_metadata})
        path = f"{self.root}/{relpath}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp"
        with self.fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh, row_group_size=self.row_group_size)
        self.fs.mv(tmp, path)

    def _write_bytes(self, relpath: str, data: bytes) -> None:
        path = f"{self.root}/{relpath}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(f"{path}.tmp", "wb") as fh:
            fh.write(data)
        self.fs.mv(f"{path}.tmp", path)

    # ---- manifest -----------------------------------------------------------------------------------------------

    def read_manifest(self) -> dict | None:
        path = f"{self.root}/manifest.json"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as fh:
            return json.load(fh)

    def write_manifest(self, extra: dict) -> dict:
        """Aggregate every committed shard's marker into OUTPUT/manifest.json and return it."""
        markers = self.committed()
        reasons: Counter = Counter()
        for m in markers.values():
            reasons.update(m["reasons"])
        kept = sum(m["kept"] for m in markers.values())
        rejected = sum(m["rejected"] for m in markers.values())
        manifest = {
            **extra,
            "counts": {
                "samples": kept + rejected,
                "kept": kept,
                "rejected": rejected,
                "reasons": dict(sorted(reasons.items())),
            },
            "shards_done": len(markers),
            "files": [{"path": m["shards_file"], "rows": m["kept"]} for m in markers.values()]
            + [{"path": m["rejects_file"], "rows": m["rejected"]} for m in markers.values()],
        }
        self._write_bytes("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        return manifest


def _meta_column(values: list) -> pa.Array:
    """A metadata column as Arrow infers it; values of mixed types are kept as JSON text instead."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
