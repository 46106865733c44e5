"""What a pretokenize run over `samples/images/` with the tiny tokenizer must leave in its output root."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq


def assert_sample_corpus_tokenized(out: Path) -> None:
    """All four photos kept, none rejected, each with the tiny tokenizer's 121 tokens, in one shard file."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 4 and manifest["counts"]["rejected"] == 0, manifest["counts"]
    (shards_file,) = (out / "shards").glob("*.parquet")
    kept = pq.read_table(shards_file).to_pylist()
    assert sorted(r["key"] for r in kept) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert all(len(r["tokens"]) == 121 for r in kept)
