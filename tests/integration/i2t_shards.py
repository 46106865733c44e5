"""Token shards for the understanding-model tests: a saved tiny image tokenizer, caption shards (the plain formats)
and one conversation shard (the llava format) with image and text-only conversations, one malformed and one whose
answer does not fit `max_length`; and a saved model whose projector an SFT run can start from."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tests.integration.t2i_shards import save_tiny_tokenizer, write_token_shards
from tokenflow.llm.i2t import I2TConfig, I2TModel
from tokenflow.llm.t2i import decoder_config


def _turns(question: str, answer: str) -> str:
    return json.dumps([{"from": "human", "value": question}, {"from": "gpt", "value": answer}])


def write_i2t_data(root: Path):
    """root/tokenizer, root/captions/shards, root/chat/shards; returns the tokenizer."""
    tok = save_tiny_tokenizer(root / "tokenizer")
    write_token_shards(root / "captions", tok, shards=2, rows=8)
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(12):
        image = i % 3 != 0
        tokens = torch.randint(0, tok.codebook_size, (tok.tokens_per_image,), generator=g).tolist()
        question = ("<image>\n" if image else "") + f"What is item {i}?"
        rows.append(
            {
                "key": f"llava.json/{i}",
                "caption": None,
                "tokens": tokens if image else None,
                "conversations": _turns(question, f"It is number {i}."),
            }
        )
    rows.append({**rows[1], "key": "llava.json/bad", "conversations": '[{"from": "gpt"'})
    rows.append({**rows[1], "key": "llava.json/long", "conversations": _turns("<image>\n" + "why " * 200, "ok")})
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("tokens", pa.list_(pa.uint16())),
            ("conversations", pa.string()),
        ]
    )
    (root / "chat" / "shards").mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata({b"tokenizer_id": tok.fingerprint()})
    pq.write_table(table, root / "chat" / "shards" / "part-00000.parquet")
    return tok


def save_projector_model(path: Path, tokenizer_id: str) -> I2TModel:
    """A saved understanding model (hidden 64, as i2t_tiny's decoder) trained on `tokenizer_id`'s features."""
    torch.manual_seed(3)
    model = I2TModel(I2TConfig(llm=decoder_config(vocab_size=32), image_tokens=64))
    model.save_pretrained(path, extra={"image_tokenizer_id": tokenizer_id})
    return model
