"""The llava input format without Ray: LLaVA annotation files (JSON array, JSON Lines) and an image root through
the reader (keys, text-only samples, missing images, malformed entries, entry-range shards, file faults), the filter
stage and the writer (the conversations column, null tokens, duplicates of image and turns together)."""

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import sources
from pipelines.filters import FilterConfig, filter_sample
from pipelines.pretokenize import FILTERED_SCHEMA, _check_same_ranges
from pipelines.sources import REASONS_FROM_SOURCES, Shard, Span, expand_inputs, read_shard
from pipelines.writer import ShardWriter
from tokenflow.image import Preprocess

ROW_KEYS = {"key", "source", "image", "caption", "meta", "reason", "detail", "conversations"}


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    out = []
    for color in ("red", "green"):
        buf = io.BytesIO()
        Image.new("RGB", (80, 72), color).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def turns(question: str, answer: str, image: bool = True) -> list[dict]:
    return [
        {"from": "human", "value": ("<image>\n" if image else "") + question},
        {"from": "gpt", "value": answer},
    ]


def write(path, entries, layout="array"):
    """Entries as a JSON array (indented), a one-line array, or JSON Lines (with a blank line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "lines":
        lines = [json.dumps(e, ensure_ascii=False) for e in entries]
        path.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(entries, indent=2 if layout == "array" else None, ensure_ascii=False), "utf-8")
    return path


def rows_of(shard, **kw):
    rows = list(read_shard(shard, **kw))
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["reason"] is None or row["reason"] in REASONS_FROM_SOURCES
        assert isinstance(json.loads(row["meta"]), dict)
    return rows


LAYOUTS = ["array", "one_line", "lines"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_keys_text_only_and_missing_images(tmp_path, photos, layout):
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    (images / "coco/a.jpg").write_bytes(photos[0])
    (images / "vg/b [1].jpg").parent.mkdir()
    (images / "vg/b [1].jpg").write_bytes(photos[1])  # glob characters in a name are not a pattern
    entries = [
        {"id": "a", "image": "coco/a.jpg", "conversations": turns("Qu'est-ce ? ü 😀", "Un chat."), "src": "coco"},
        {"id": "t", "conversations": turns("Hi?", "Hello.", image=False)},  # text-only
        {"id": "m", "image": "coco/missing.jpg", "conversations": turns("Q", "A")},
        {"id": 7, "image": "vg/b [1].jpg", "conversations": turns("Q", "A")},  # an integer id
        {"image": "coco/a.jpg", "conversations": turns("no id", "A")},
        {"id": "a", "image": "coco/a.jpg", "conversations": turns("again", "A")},  # a repeated id
        {"id": "n", "image": None, "conversations": turns("null image", "A", image=False)},  # text-only too
    ]
    name = "llava.jsonl" if layout == "lines" else "llava.json"
    annotations = write(tmp_path / "ann" / name, entries, "array" if layout == "one_line" else layout)

    (shard,) = expand_inputs([str(annotations)])  # a named .json/.jsonl file is llava
    assert shard == Shard(str(annotations), name, "llava", Span(layout="lines" if layout == "lines" else "array"))
    rows = rows_of(shard, image_root=str(images))
    assert [r["key"] for r in rows] == [f"{name}/{k}" for k in ("a", "t", "m", "7", "#4", "a~2", "n")]
    assert [r["image"] for r in rows] == [photos[0], None, None, photos[1], photos[0], photos[0], None]
    assert [r["reason"] for r in rows] == [None, None, "image_missing", None, None, None, None]
    assert rows[2]["detail"] == f"image not found: {images}/coco/missing.jpg"
    assert all(r["caption"] is None and r["source"] == str(annotations) for r in rows)
    assert [json.loads(r["conversations"]) for r in rows] == [e["conversations"] for e in entries]
    assert json.loads(rows[0]["meta"]) == {"id": "a", "image": "coco/a.jpg", "src": "coco"}
    assert json.loads(rows[1]["meta"]) == {"id": "t", "image": None}
    assert json.loads(rows[3]["meta"])["id"] == "7"
    assert json.loads(rows[4]["meta"])["id"] is None

    # Without an image root the images are relative to the annotation file's directory (LLaVA's layout).
    (tmp_path / "ann/coco").mkdir()
    (tmp_path / "ann/coco/a.jpg").write_bytes(photos[1])
    assert rows_of(shard)[0]["image"] == photos[1]


MALFORMED = [
    (["a", "list"], "entry 0: a list, not an object"),
    ({"id": "x"}, "no 'conversations'"),
    ({"id": "x", "conversations": "<image>\nhi"}, "'conversations' is a string, not a list of turns"),
    ({"id": "x", "conversations": []}, "'conversations' is empty"),
    ({"id": "x", "conversations": ["hi"]}, "turn 0 is a string, not an object"),
    ({"id": "x", "conversations": [{"from": "human"}]}, "turn 0 has no 'value' string (got null)"),
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}, {"value": "a"}]}, "turn 1 has no 'from' string"),
    ({"id": "x", "conversations": [{"from": "gpt", "value": 3}]}, "turn 0 has no 'value' string (got a number)"),
]


def test_malformed_entries_are_recorded_and_reading_goes_on(tmp_path):
    good = {"id": "ok", "conversations": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]}
    bad_images = [
        {"id": "i1", "image": 5, "conversations": turns("q", "a")},
        {"id": "i2", "image": " ", "conversations": turns("q", "a")},
    ]
    path = write(tmp_path / "a.json", [entry for entry, _ in MALFORMED] + bad_images + [good])
    rows = rows_of(expand_inputs([str(path)], format="llava")[0])
    assert [r["reason"] for r in rows] == ["conversations_invalid"] * len(MALFORMED) + ["image_missing"] * 2 + [None]
    for row, (_, detail) in zip(rows, MALFORMED):
        assert detail in row["detail"] and row["conversations"] is None, row["detail"]
    assert rows[-3]["detail"] == "entry 8: 'image' is a number, not a path"
    assert rows[-2]["detail"] == "entry 9: 'image' is an empty string, not a path"
    assert json.loads(rows[-1]["conversations"]) == good["conversations"]  # role/content turns are turns too

    # JSON Lines: a line that is not JSON is that entry's rejection; the lines after it are read.
    lines = tmp_path / "b.jsonl"
    lines.write_text(json.dumps(good) + '\n{"id": "cut", "conversa\n' + json.dumps({**good, "id": "after"}) + "\n")
    rows = rows_of(expand_inputs([str(lines)])[0])
    assert [(r["key"], r["reason"]) for r in rows] == [
        ("b.jsonl/ok", None),
        ("b.jsonl/#1", "conversations_invalid"),
        ("b.jsonl/after", None),
    ]
    assert rows[1]["detail"].startswith("entry 1: not JSON (JSONDecodeError: ")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_file_is_split_into_entry_ranges(tmp_path, monkeypatch, layout):
    # multi-byte characters and JSON-looking text inside strings, read in 7-byte chunks: every offset must hold
    entries = [
        {"id": f"é{i % 11}", "conversations": turns('},{ ] [ "x" 😀 ' * (i % 3), f"{i}", False)} for i in range(23)
    ]
    name = "a.jsonl" if layout == "lines" else "a.json"
    path = write(tmp_path / name, entries, "array" if layout == "one_line" else layout)
    monkeypatch.setattr(sources, "_JSON_CHUNK", 7)
    shards = expand_inputs([str(tmp_path)], format="llava", entries_per_shard=5)
    assert [s.shard_id for s in shards] == [
        f"{name}#{a}-{b}" for a, b in ((0, 4), (5, 9), (10, 14), (15, 19), (20, 22))
    ]
    assert [s.span.count for s in shards] == [5, 5, 5, 5, None]  # the last range reads to the end and checks it
    assert all(s.path == str(path) and s.span.layout == ("lines" if layout == "lines" else "array") for s in shards)
    parts = [rows_of(s) for s in shards]
    assert [len(p) for p in parts] == [5, 5, 5, 5, 3]
    rows = [r for p in parts for r in p]
    assert [json.loads(r["conversations"]) for r in rows] == [e["conversations"] for e in entries]
    assert (rows[2]["key"], rows[13]["key"]) == (f"{name}#0-4/é2", f"{name}#10-14/é2")  # a repeated id, two ranges
    assert len({r["key"] for r in rows}) == 23
    # the whole file as one shard reads the same entries
    whole = rows_of(Shard(str(path), name, "llava"))
    assert [r["conversations"] for r in whole] == [r["conversations"] for r in rows]
    # a file of exactly one range keeps the file's name as its shard id
    assert [s.shard_id for s in expand_inputs([str(path)], entries_per_shard=23)] == [name]


def test_directories_are_read_as_llava_only_when_asked(tmp_path, photos):
    write(tmp_path / "d/x/b.jsonl", [{"id": "1", "conversations": turns("q", "a", False)}], "lines")
    write(tmp_path / "d/a.json", [{"id": "1", "image": "x/i.jpg", "conversations": turns("q", "a")}])
    (tmp_path / "d/x/i.jpg").write_bytes(photos[0])
    (tmp_path / "d/x/i.json").write_text("{}")  # a folder sidecar
    assert [(s.shard_id, s.format) for s in expand_inputs([str(tmp_path / "d")])] == [("x", "folder")]
    shards = expand_inputs([str(tmp_path / "d")], format="llava")
    assert [s.shard_id for s in shards] == ["a.json", "x/b.jsonl", "x/i.json"]
    assert {s.format for s in shards} == {"llava"}
    with pytest.raises(FileNotFoundError, match="matched no annotation files"):
        expand_inputs([f"{tmp_path}/d/x/*.jpg"], format="llava")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        sources.resolve_directory(str(tmp_path / "nope"))
    assert sources.resolve_directory(str(tmp_path / "d/x/")) == str(tmp_path / "d/x")


def _entries(n):
    return [{"id": str(i), "conversations": turns("q", str(i), False)} for i in range(n)]


@pytest.mark.parametrize(
    "content, before, message",
    [
        (lambda full: full[: full.index(b'{"id": "4"') + 12], 4, "the file ends inside the element"),  # cut mid-entry
        (lambda full: full[: full.index(b', {"id": "4"')], 4, "the array has no closing ']'"),  # cut between entries
        (lambda full: full + b"\n[]", 6, "data after the array's closing ']'"),
        (lambda full: full.replace(b', {"id": "2"', b' {"id": "2"'), 2, "expected ',' or ']'"),
        (lambda full: full.replace(b'"id": "3"', b'"id": 3x'), 3, "invalid JSON at byte"),
        (lambda full: b"<html>not found</html>", 0, "the first line is not JSON"),
        (lambda full: b" \n ", 0, "the file is empty"),
    ],
    ids=["mid-entry", "between-entries", "trailing-data", "no-comma", "bad-json", "not-json", "empty"],
)
def test_a_broken_file_yields_its_rows_then_a_shard_error(tmp_path, content, before, message):
    full = json.dumps(_entries(6)).encode()
    path = tmp_path / "a.json"
    path.write_bytes(content(full))
    (shard,) = expand_inputs([str(path)])
    rows = rows_of(shard)
    assert [r["key"] for r in rows] == [f"a.json/{i}" for i in range(before)] + ["a.json#shard"]
    assert rows[-1]["reason"] == "shard_error" and rows[-1]["detail"].startswith("AnnotationError: ")
    assert message in rows[-1]["detail"] and rows[-1]["detail"].endswith(f" after {before} samples")


def test_a_fault_splits_the_ranges_before_it_and_reads_to_it(tmp_path):
    full = json.dumps(_entries(10)).encode()
    path = tmp_path / "a.json"
    path.write_bytes(full.replace(b'"id": "7"', b'"id": 7x'))
    shards = expand_inputs([str(path)], entries_per_shard=3)
    assert [s.shard_id for s in shards] == ["a.json#0-2", "a.json#3-5", "a.json#6-"]
    rows = [r for s in shards for r in rows_of(s)]
    assert [r["key"] for r in rows] == [f"a.json#{'0-2' if i < 3 else '3-5'}/{i}" for i in range(6)] + [
        "a.json#6-/6",
        "a.json#6-#shard",
    ]
    assert rows[-1]["detail"].endswith(" after 1 samples")


def test_a_missing_or_empty_file(tmp_path):
    (row,) = rows_of(Shard(str(tmp_path / "gone.json"), "gone.json", "llava"))
    assert row["key"] == "gone.json#shard" and row["detail"].startswith("FileNotFoundError: ")
    (tmp_path / "empty.json").write_text("[ ]")
    assert rows_of(expand_inputs([str(tmp_path / "empty.json")])[0]) == []


def test_resuming_with_other_ranges_is_refused(tmp_path):
    path = write(tmp_path / "a.json", _entries(10))
    shards = expand_inputs([str(path)], entries_per_shard=5)
    done = {"a.json#0-4": {"source": str(path)}, "other.tar": {"source": "/x/other.tar"}}
    _check_same_ranges(shards, done, "out/")  # the same split: fine
    with pytest.raises(ValueError, match=r"entry ranges \['a.json#0-4'\].*llava_entries_per_shard"):
        _check_same_ranges(expand_inputs([str(path)], entries_per_shard=4), done, "out/")


# ---- the filter stage -------------------------------------------------------------------------------------------

PRE = Preprocess(size=32)


def test_filter_keeps_conversations_without_caption_and_text_only_without_pixels(photos):
    def row(image, conversations=json.dumps(turns("q", "a"))):  # noqa: B008
        row = {"key": "k", "source": "s", "image": image, "caption": None, "meta": '{"id": "k"}'}
        return {**row, "reason": None, "detail": None, "conversations": conversations}

    cfg = FilterConfig()  # require_caption: True, which does not apply to conversations
    kept = filter_sample(row(photos[0]), cfg, PRE)
    assert kept["reason"] is None and kept["caption"] is None and kept["pixels"].shape == (32, 32, 3)
    assert (kept["width"], kept["height"]) == (80, 72)
    text = filter_sample(row(None, json.dumps(turns("hi", "hello", False))), cfg, PRE)
    assert text["reason"] is None and text["pixels"] is None and text["image_sha256"] is None
    assert (text["width"], text["height"]) == (None, None) and text["conversations"] == json.dumps(
        turns("hi", "hello", False)
    )
    assert filter_sample(row(b"not an image"), cfg, PRE)["reason"] == "decode_error"
    assert filter_sample(row(photos[0], None), cfg, PRE)["reason"] == "caption_missing"  # not a conversation
    invalid = {**row(None, None), "reason": "conversations_invalid", "detail": "entry 3: no 'conversations'"}
    assert filter_sample(invalid, cfg, PRE)["reason"] == "conversations_invalid"


# ---- the writer -------------------------------------------------------------------------------------------------


# what the tokenize stage hands the writer: the filter stage's schema with tokens in place of pixels
TOKENIZED_SCHEMA = FILTERED_SCHEMA.remove(FILTERED_SCHEMA.get_field_index("pixels")).append(
    pa.field("tokens", pa.binary())
)


def _tokenized(shard: str, key: str, image: bytes | None, conversations: list[dict]) -> dict:
    return {
        "key": f"{shard}/{key}",
        "source": f"/in/{shard}",
        "caption": None,
        "conversations": json.dumps(conversations),
        "meta": json.dumps({"id": key, "image": None if image is None else f"{key}.jpg"}),
        "reason": None,
        "detail": None,
        "shard_id": shard,
        "end_of_shard": -1,
        "width": None if image is None else 80,
        "height": None if image is None else 72,
        "image_sha256": None if image is None else hashlib.sha256(image).hexdigest(),
        "clip_score": None,
        "tokens": None if image is None else np.arange(4, dtype=np.uint16).tobytes(),
    }


def _seen_claim():
    seen: dict[str, str] = {}

    def claim(digests, keys):
        out = []
        for d, k in zip(digests, keys):
            out.append(seen.get(d))
            seen.setdefault(d, k)
        return out

    return claim


def test_writer_conversations_column_null_tokens_and_duplicates(tmp_path, photos):
    q1, q2, text = turns("What?", "A cat."), turns("Color?", "Red."), turns("Hi?", "Hello.", False)
    rows = [
        _tokenized("a.json", "1", photos[0], q1),
        _tokenized("a.json", "2", photos[0], q2),  # the same image, other turns: another sample
        _tokenized("a.json", "3", photos[0], q1),  # the same image and turns: a duplicate
        _tokenized("a.json", "4", None, text),
        _tokenized("a.json", "5", None, text),  # text-only: never a duplicate
        {"key": "a.json#end", "source": "/in/a.json", "shard_id": "a.json", "end_of_shard": 5},
    ]
    out = tmp_path / "out"
    w = ShardWriter(
        str(out), file_metadata={}, token_dtype=np.dtype(np.uint16), claim=_seen_claim(), conversations=True
    )
    assert w.add(pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)) == ["a.json"]
    w.close()
    (shard_file,) = out.glob("shards/*.parquet")
    table = pq.read_table(shard_file)
    assert table.column_names[:3] == ["key", "caption", "conversations"]
    kept = {r["key"]: r for r in table.to_pylist()}
    assert sorted(kept) == ["a.json/1", "a.json/2", "a.json/4", "a.json/5"]
    assert json.loads(kept["a.json/2"]["conversations"]) == q2
    assert kept["a.json/4"]["tokens"] is None and kept["a.json/4"]["width"] is None
    assert kept["a.json/1"]["tokens"] == [0, 1, 2, 3] and kept["a.json/1"]["id"] == "1"
    (reject,) = pq.read_table(next(out.glob("rejects/*.parquet"))).to_pylist()
    assert (reject["key"], reject["reason"]) == ("a.json/3", "duplicate")
    assert reject["detail"] == "same image bytes and conversations as a.json/1"

    # resume rebuilds the same index: image + turns, text-only left out
    w2 = ShardWriter(str(out), file_metadata={}, token_dtype=np.dtype(np.uint16), conversations=True)
    w2.recover()
    (digests, keys) = next(w2.committed_digests())
    assert keys == ["a.json/1", "a.json/2"]
    claim = _seen_claim()
    claim(digests, keys)
    assert claim([digests[0]], ["again"]) == ["a.json/1"]

    # the other formats' shards keep their schema
    plain = ShardWriter(str(tmp_path / "plain"), file_metadata={}, token_dtype=np.dtype(np.uint16))
    assert "conversations" not in plain._kept_table([]).column_names
