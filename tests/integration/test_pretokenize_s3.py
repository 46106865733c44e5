"""The pretokenize job reading Parquet from S3 and writing its shards to S3 (moto server on 127.0.0.1)."""

import io
import json

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image
from skimage import data

from pipelines.pretokenize import PretokenizeConfig, run


@pytest.fixture(scope="module")
def ray_with_s3_env(s3_endpoint, ray_local):
    """Ray started after the S3 fixture set the AWS environment (fixture order), so workers get the credentials."""
    return s3_endpoint


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).resize((96, 80)).save(buf, "JPEG")
    return buf.getvalue()


def test_parquet_on_s3_to_shards_on_s3(ray_with_s3_env):
    endpoint = ray_with_s3_env
    table = pa.table(
        {
            "jpg": [_jpeg(data.astronaut()), _jpeg(data.coffee()), b"broken", None],
            "caption": ["an astronaut", "coffee", "broken image", "no image"],
            "punsafe": [0.01, 0.9, 0.0, 0.0],
            "url": ["http://a", "http://b", "http://c", "http://d"],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    boto3.client("s3", endpoint_url=endpoint).put_object(
        Bucket="tokenflow-test", Key="laion/part-0.parquet", Body=buf.getvalue()
    )
    cfg = PretokenizeConfig(
        input=["s3://tokenflow-test/laion/"],
        output="s3://tokenflow-test/tokens",
        tokenizer="preset:tiny",
        s3_endpoint=endpoint,
        tokenizer_actors=1,
    )
    cfg.filters.metadata_max = {"punsafe": 0.5}
    manifest = run(cfg)
    assert manifest["counts"] == {
        "samples": 4,
        "kept": 1,
        "rejected": 3,
        "reasons": {"decode_error": 1, "image_missing": 1, "metadata_filter": 1},
    }
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    (shards_file,) = fs.glob("tokenflow-test/tokens/shards/*.parquet")
    kept = pq.read_table(shards_file, filesystem=fs).to_pylist()
    assert [(r["key"], r["caption"], r["url"], r["punsafe"]) for r in kept] == [
        ("part-0.parquet#0", "an astronaut", "http://a", 0.01)
    ]
    assert len(kept[0]["tokens"]) == 121
    (rejects_file,) = fs.glob("tokenflow-test/tokens/rejects/*.parquet")
    rejects = pq.read_table(rejects_file, filesystem=fs).to_pylist()
    assert sorted(r["key"] for r in rejects) == ["part-0.parquet#1", "part-0.parquet#2", "part-0.parquet#3"]
    (record,) = fs.glob("tokenflow-test/tokens/_progress/*.json")
    assert json.loads(fs.cat(record))["shards"]["part-0.parquet"]["kept"] == 1
    assert not fs.glob("tokenflow-test/tokens/**/*.tmp") and not fs.glob("tokenflow-test/tokens/_staging/**")
