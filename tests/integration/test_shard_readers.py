"""The token shards open as one table with pyarrow, pandas, DuckDB, Hugging Face `datasets` and Ray Data, even when
the input shards carry different metadata fields: every file of a job has the same schema, and no metadata value
is lost."""

import io
import json
import tarfile

import duckdb
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
from datasets import load_dataset
from PIL import Image
from skimage import data

from pipelines.pretokenize import PretokenizeConfig, run

META = {  # per sample: the shards disagree on fields and on one field's type
    "00000.tar/a": {"punsafe": 0.1, "url": "http://a", "similarity": 0.31},
    "00000.tar/b": {"punsafe": 0.2, "url": "http://b", "similarity": 0.29},
    "00001.tar/c": {"punsafe": 0.3, "url": "http://c", "status": "success"},
    "00001.tar/d": {"punsafe": "unknown", "url": "http://d", "tags": ["x", "y"]},
}


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").resize((96, 72)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    (root / "corpus").mkdir()
    photos = iter([data.astronaut(), data.chelsea(), data.coffee(), data.rocket()])
    for shard in ("00000.tar", "00001.tar"):
        with tarfile.open(root / "corpus" / shard, "w") as tf:
            for key, meta in META.items():
                if not key.startswith(shard):
                    continue
                member = key.split("/")[1]
                for name, payload in (
                    (f"{member}.jpg", _jpeg(next(photos))),
                    (f"{member}.txt", f"caption {member}".encode()),
                    (f"{member}.json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    out = root / "out"
    cfg = PretokenizeConfig(
        input=[str(root / "corpus")], output=str(out), tokenizer="preset:tiny", tokenizer_actors=1, target_file_mb=1e-6
    )
    manifest = run(cfg)
    assert manifest["counts"]["kept"] == 4
    files = sorted((out / "shards").glob("*.parquet"))
    assert len(files) == 2  # one part per input shard
    return out / "shards", files


def test_every_file_has_the_same_schema_and_no_metadata_is_lost(shards):
    directory, files = shards
    schemas = [pq.read_schema(f).remove_metadata() for f in files]
    assert all(s == schemas[0] for s in schemas)
    # the schema comes from whichever shard committed first: read each value back through its column's type
    record = json.loads(next((directory.parent / "_progress").glob("*.json")).read_text())
    kinds = record["meta_fields"]
    rows = {r["key"]: r for f in files for r in pq.read_table(f).to_pylist()}
    for key, meta in META.items():
        row = rows[key]
        extra = json.loads(row["meta_extra"]) if row["meta_extra"] else {}
        got = {}
        for name in meta:
            if name in extra:
                got[name] = extra[name]
            elif name in kinds:
                got[name] = json.loads(row[name]) if kinds[name] == "json" else row[name]
        assert got == meta, key


def test_the_shards_read_as_one_table_with_every_reader(shards):
    directory, files = shards
    want = sorted(META)
    table = pads.dataset(directory, format="parquet").to_table()
    assert sorted(table["key"].to_pylist()) == want
    assert sorted(table.to_pandas()["key"]) == want
    assert sorted(duckdb.sql(f"SELECT key FROM read_parquet('{directory}/*.parquet')").fetchnumpy()["key"]) == want
    hf = load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    assert sorted(hf["key"]) == want and len(hf[0]["tokens"]) == 121
    ds = ray.data.read_parquet(str(directory))
    assert sorted(r["key"] for r in ds.take_all()) == want
    assert set(ds.columns()) == set(table.column_names)
