"""`ShardTasks`: one Ray Data read task per given shard reader, in order, with the shard's file in the metadata
(no cluster needed to plan them)."""

import functools

import pyarrow as pa
import pytest

from pipelines.read_tasks import ShardTasks

SCHEMA = pa.schema([("key", pa.string())])


def read(name: str, rows: int):
    yield pa.Table.from_pylist([{"key": f"{name}/{i}"} for i in range(rows)], schema=SCHEMA)


def test_one_task_per_shard_in_order_with_its_file():
    source = ShardTasks([functools.partial(read, "a", 2), functools.partial(read, "b", 1)], SCHEMA, ["a.tar", "b.tar"])
    tasks = source.get_read_tasks(parallelism=1)
    assert [list(t.metadata.input_files) for t in tasks] == [["a.tar"], ["b.tar"]]
    assert [[row["key"] for block in t() for row in block.to_pylist()] for t in tasks] == [["a/0", "a/1"], ["b/0"]]
    assert source.estimate_inmemory_data_size() is None
    assert ShardTasks([functools.partial(read, "a", 1)], SCHEMA).get_read_tasks(8)[0].metadata.input_files is None


def test_files_must_match_tasks():
    with pytest.raises(ValueError, match="2 read tasks but 1 input files"):
        ShardTasks([functools.partial(read, "a", 1)] * 2, SCHEMA, ["a.tar"])
