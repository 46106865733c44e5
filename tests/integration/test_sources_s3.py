"""pipelines.sources against a real S3 API (moto server): s3:// inputs give the same shards and rows as local copies."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.sources import Shard, expand_inputs, read_shard

BUCKET = "tokenflow-test"
PREFIX = "sources"


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet_bytes(columns, row_group_size=None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, row_group_size=row_group_size)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, s3_endpoint):
    """The same files written under a local root and uploaded under s3://tokenflow-test/sources/."""
    import boto3

    files = {}
    for part, n in (("wds/part1/00000.tar", 3), ("wds/part1/00001.tar", 2), ("wds/part2/00000.tar", 2)):
        members = []
        for i in range(n):
            members += [(f"{i:05d}.jpg", _jpeg(i)), (f"{i:05d}.txt", f"{part} {i}".encode())]
            members += [(f"{i:05d}.json", json.dumps({"i": i}).encode())]
        files[part] = _tar_bytes(members + [("99999.txt", b"caption without image")])
    files["pq/a.parquet"] = _parquet_bytes(
        {
            "jpg": [_jpeg(10), None, _jpeg(12), _jpeg(13)],
            "caption": ["one", "two", None, "four"],
            "similarity": [0.3, 0.2, 0.1, float("nan")],
            "url": [f"http://x/{i}" for i in range(4)],
        },
        row_group_size=3,
    )
    files["pq/b/c.parquet"] = _parquet_bytes({"jpg": [_jpeg(20)], "caption": ["five"]})
    files["img/a.jpg"] = _jpeg(30)
    files["img/a.txt"] = b"folder caption"
    files["img/stray.txt"] = b"not a sample"
    files["img/cats/b.png"] = _jpeg(31)
    files["img/cats/b.json"] = b'{"k": 1}'

    local = tmp_path_factory.mktemp("sources_local")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}", Body=data)
    return local, {"endpoint_url": s3_endpoint}


def _rows(shards, storage_options=None):
    rows = [row for shard in shards for row in read_shard(shard, storage_options=storage_options)]
    return [{k: v for k, v in row.items() if k != "source"} for row in rows]


@pytest.mark.parametrize(
    "pattern, n_shards, n_rows",
    [
        ("wds", 3, 3 + 2 + 2 + 3),  # directory, scanned recursively
        ("wds/part1/*.tar", 2, 3 + 2 + 2),  # glob
        ("wds/**/0000[0].tar", 2, 3 + 2 + 2),  # recursive glob
        ("wds/part1/{00000..00001}.tar", 2, 3 + 2 + 2),  # brace range
        ("pq", 2, 4 + 1),
        ("img", 2, 2),  # one folder shard per directory
    ],
)
def test_s3_matches_local(dataset, pattern, n_shards, n_rows):
    local_root, opts = dataset
    local = expand_inputs([f"{local_root}/{pattern}"])
    remote = expand_inputs([f"s3://{BUCKET}/{PREFIX}/{pattern}"], storage_options=opts)
    assert len(remote) == n_shards
    assert [(s.shard_id, s.format) for s in remote] == [(s.shard_id, s.format) for s in local]
    assert all(s.path.startswith(f"s3://{BUCKET}/{PREFIX}/") for s in remote)

    remote_rows = _rows(remote, opts)
    assert len(remote_rows) == n_rows
    assert remote_rows == _rows(local)
    assert len({r["key"] for r in remote_rows}) == n_rows
    assert not any(r["reason"] == "shard_error" for r in remote_rows)


def test_s3_source_is_the_shard_uri(dataset):
    _, opts = dataset
    (shard,) = expand_inputs([f"s3://{BUCKET}/{PREFIX}/wds/part2/00000.tar"], storage_options=opts)
    assert shard == Shard(f"s3://{BUCKET}/{PREFIX}/wds/part2/00000.tar", "00000.tar", "webdataset")
    rows = list(read_shard(shard, storage_options=opts))
    assert {r["source"] for r in rows} == {shard.path}
    assert [r["key"] for r in rows] == ["00000.tar/00000", "00000.tar/00001", "00000.tar/99999"]
    assert rows[-1]["reason"] == "image_missing"


def test_s3_faults(dataset):
    _, opts = dataset
    with pytest.raises(FileNotFoundError, match="nothing"):
        expand_inputs([f"s3://{BUCKET}/{PREFIX}/nope/*.tar"], storage_options=opts)
    for fmt in ("webdataset", "parquet"):
        gone = Shard(f"s3://{BUCKET}/{PREFIX}/gone.bin", "gone.bin", fmt)
        (row,) = read_shard(gone, storage_options=opts)
        assert row["reason"] == "shard_error" and row["key"] == "gone.bin#shard"
