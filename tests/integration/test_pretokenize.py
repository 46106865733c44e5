"""The pretokenize job end to end on a real local Ray: accounting, reject reasons, token equality, resume."""

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data

from pipelines.pretokenize import PretokenizeConfig, run
from pipelines.tokenize import load_tokenizer


def _jpeg(arr, size=None) -> bytes:
    img = Image.fromarray(arr).convert("RGB")
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


PHOTOS = {name: _jpeg(getattr(data, name)(), (160, 120)) for name in ("astronaut", "chelsea", "coffee", "rocket")}


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


@pytest.fixture()
def corpus(tmp_path):
    """Two webdataset shards with one of each bad-input kind; returns (input dir, expected reason per key).

    The twins 00000.tar/b and 00001.tar/g are both expected kept: which one becomes the duplicate depends on which
    shard commits first (see `_resolve_twins`)."""
    root = tmp_path / "corpus"
    root.mkdir()
    _tar(
        root / "00000.tar",
        [
            ("a.jpg", PHOTOS["astronaut"]),
            ("a.txt", b"an astronaut"),
            ("a.json", b'{"punsafe": 0.1}'),
            ("b.jpg", PHOTOS["chelsea"]),
            ("b.txt", b"a cat"),
            ("c.jpg", b"garbage bytes"),
            ("c.txt", b"broken"),
            ("d.jpg", PHOTOS["coffee"]),  # no caption
            ("e.jpg", _jpeg(data.rocket(), (40, 30))),
            ("e.txt", b"too small"),
            ("f.txt", b"caption without an image"),
        ],
    )
    _tar(
        root / "00001.tar",
        [
            ("g.jpg", PHOTOS["chelsea"]),
            ("g.txt", b"the same cat again"),  # same image as 00000.tar/b: one of the twins is a duplicate
            ("h.jpg", PHOTOS["rocket"]),
            ("h.txt", b"\xff\xfe"),  # caption not UTF-8
            ("i.jpg", PHOTOS["rocket"]),
            ("i.txt", b"a rocket"),
        ],
    )
    expected = {
        "00000.tar/a": None,
        "00000.tar/b": None,
        "00000.tar/c": "decode_error",
        "00000.tar/d": "caption_missing",
        "00000.tar/e": "too_small",
        "00000.tar/f": "image_missing",
        "00001.tar/g": None,
        "00001.tar/h": "caption_encoding",
        "00001.tar/i": None,
    }
    return root, expected


TWINS = ("00000.tar/b", "00001.tar/g")


def _resolve_twins(expected, rejects):
    """The expectation with the later-committed twin marked duplicate; returns (expected, kept twin, duplicate)."""
    first, copy = TWINS if TWINS[1] in rejects else TWINS[::-1]
    assert rejects[copy]["reason"] == "duplicate" and rejects[copy]["detail"] == f"same image bytes as {first}"
    return {**expected, copy: "duplicate"}, first, copy


def _outputs(out):
    """Kept and rejected rows by key; files are read one by one (their metadata columns may differ)."""
    kept = [r for p in (out / "shards").glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    rejects = [r for p in (out / "rejects").glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    return {r["key"]: r for r in kept}, {r["key"]: r for r in rejects}


def test_pretokenize_accounting_reasons_tokens_and_resume(ray_local, corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "out"
    cfg = PretokenizeConfig(
        input=[str(root)],
        output=str(out),
        tokenizer="preset:tiny",
        tokenizer_actors=1,
        batch_size=4,
        target_file_mb=1e-6,  # one part per input shard
    )
    manifest = run(cfg)
    kept, rejects = _outputs(out)
    expected, first, copy = _resolve_twins(expected, rejects)

    # nothing lost: every input sample is in exactly one of the two
    assert set(kept) | set(rejects) == set(expected) and not set(kept) & set(rejects)
    assert {k: r["reason"] for k, r in rejects.items()} == {k: v for k, v in expected.items() if v}
    assert manifest["counts"]["samples"] == len(expected) and manifest["counts"]["kept"] == 3
    assert manifest["counts"]["reasons"]["duplicate"] == 1

    # tokens equal direct encoding of the same file with the same tokenizer
    tok = load_tokenizer("preset:tiny")
    names = {"00000.tar/a": "astronaut", first: "chelsea", "00001.tar/i": "rocket"}
    for key, name in names.items():
        direct = tok.encode(tok.preprocess([Image.open(io.BytesIO(PHOTOS[name]))]))[0]
        assert torch.equal(torch.tensor(kept[key]["tokens"], dtype=torch.long), direct), key
    a = kept["00000.tar/a"]
    # metadata: a column when the first committed part had it (00000.tar first), else kept in meta_extra as JSON
    punsafe = a["punsafe"] if "punsafe" in a else json.loads(a["meta_extra"])["punsafe"]
    assert a["caption"] == "an astronaut" and punsafe == 0.1
    assert (kept["00000.tar/a"]["width"], kept["00000.tar/a"]["height"]) == (160, 120)

    # one committed part per input shard (the target size is tiny); file metadata identifies the tokenizer
    records = {r["name"]: r for r in (json.loads(p.read_text()) for p in (out / "_progress").glob("*.json"))}
    assert sorted(s for r in records.values() for s in r["shards"]) == ["00000.tar", "00001.tar"]
    assert sorted(f["path"] for f in manifest["files"]) == sorted(
        f"{d}/{name}.parquet" for name in records for d in ("shards", "rejects")
    )
    assert not (out / "_staging").exists()
    for path in (out / "shards").glob("*.parquet"):
        schema = pq.read_schema(path)
        assert schema.metadata[b"tokenizer_id"].decode() == tok.fingerprint()
        assert json.loads(schema.metadata[b"scales"]) == [1, 2, 4, 6, 8]
        assert schema.field("tokens").type.value_type == "uint16"

    # a second run on the finished output does nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run(cfg)
    assert again.pop("nothing_to_do") is True and again == manifest
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}  # not a byte written

    # a shard whose part is not committed (killed before the commit) is redone; the result is identical
    (name,) = [n for n, r in records.items() if copy.split("/")[0] in r["shards"]]
    for path in (
        out / "_progress" / f"{name}.json",
        out / "shards" / f"{name}.parquet",
        out / "rejects" / f"{name}.parquet",
    ):
        path.unlink()
    run(cfg)
    kept2, rejects2 = _outputs(out)
    assert kept2.keys() == kept.keys() and rejects2.keys() == rejects.keys()
    assert rejects2[copy]["reason"] == "duplicate"  # the duplicate index was rebuilt from the committed shard
    assert kept2["00001.tar/i"]["tokens"] == kept["00001.tar/i"]["tokens"]


def test_resuming_with_another_tokenizer_is_refused(ray_local, corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    run(
        PretokenizeConfig(input=[str(root / "00000.tar")], output=str(out), tokenizer="preset:tiny", tokenizer_actors=1)
    )
    with pytest.raises(ValueError, match="already holds shards made with tokenizer"):
        run(PretokenizeConfig(input=[str(root)], output=str(out), tokenizer="preset:tiny_unitok", tokenizer_actors=1))


def test_dedup_index_partitioned_over_actors(ray_local, corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "out"
    cfg = PretokenizeConfig(
        input=[str(root)], output=str(out), tokenizer="preset:tiny", tokenizer_actors=1, dedup_partitions=3
    )
    run(cfg)
    kept, rejects = _outputs(out)
    expected, first, _ = _resolve_twins(expected, rejects)
    assert {k: r["reason"] for k, r in rejects.items()} == {k: v for k, v in expected.items() if v}
    assert sorted(kept) == sorted(["00000.tar/a", first, "00001.tar/i"])
