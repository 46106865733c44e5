"""Token shards for the text-to-image tests: a saved tiny image tokenizer and Parquet shards in the pretokenize
output format (the columns the trainer reads, and the tokenizer id in the file metadata)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tokenflow import Tokenizer

WORDS = ["cat", "dog", "car", "tree", "lake", "red", "blue", "house", "bird", "boat"]


def save_tiny_tokenizer(path: Path) -> Tokenizer:
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("tiny")
    tok.save_pretrained(path)
    return Tokenizer.from_pretrained(path)


def caption(i: int) -> str:
    a, b = WORDS[i % len(WORDS)], WORDS[(i // len(WORDS)) % len(WORDS)]
    return f"A photo of a {a} next to a {b}. It is sunny."


def write_token_shards(
    root: Path, tok: Tokenizer, *, shards: int = 3, rows: int = 24, tokenizer_id: str | None = None, bad: bool = False
) -> Path:
    """OUTPUT/shards/part-*.parquet with `key`, `caption`, `tokens`; tokens are a fixed function of the row.
    bad=True adds one row with a missing caption and one with too few tokens to the first shard."""
    out = root / "shards"
    out.mkdir(parents=True, exist_ok=True)
    t, k = tok.tokens_per_image, tok.codebook_size
    meta = {b"tokenizer_id": (tokenizer_id or tok.fingerprint()).encode()}
    n = 0
    for s in range(shards):
        keys, captions, tokens = [], [], []
        for _ in range(rows):
            g = torch.Generator().manual_seed(n)
            keys.append(f"src/{s:03d}.tar/{n:06d}")
            captions.append(caption(n))
            tokens.append(torch.randint(0, k, (t,), generator=g).tolist())
            n += 1
        if bad and s == 0:
            keys += ["src/bad/no_caption", "src/bad/short"]
            captions += [None, "short tokens"]
            tokens += [[1] * t, [1] * (t - 1)]
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "caption": pa.array(captions, pa.string()),
                "tokens": pa.array(tokens, pa.list_(pa.uint16())),
            }
        ).replace_schema_metadata(meta)
        pq.write_table(table, out / f"part-{s:05d}.parquet")
    return root
