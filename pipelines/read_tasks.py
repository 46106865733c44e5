"""A Ray Data source of given read tasks: one per input shard in every job (pretokenize, the tokenizer's training
and evaluation images, the two LLMs' token shards).

Each task is a picklable function of no arguments (a `functools.partial` over a module-level reader) that yields
the shard's rows as Arrow tables of one schema. A read operator, not `map_batches` over a list of shards: Ray
fuses consecutive map stages and bundles their input up to the largest batch size among them, which would hand
dozens of shards to one task; a read task per shard keeps shards apart and starts streaming at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


class ShardTasks(Datasource):
    """`tasks[i]()` reads shard i; `input_files[i]` (optional) names its file for Ray's metadata."""

    def __init__(
        self,
        tasks: Sequence[Callable[[], Iterator[pa.Table]]],
        schema: pa.Schema,
        input_files: Sequence[str] | None = None,
    ):
        super().__init__()
        if input_files is not None and len(input_files) != len(tasks):
            raise ValueError(f"{len(tasks)} read tasks but {len(input_files)} input files")
        self.tasks, self.schema, self.input_files = list(tasks), schema, input_files

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        def meta(i: int) -> BlockMetadata:
            files = [self.input_files[i]] if self.input_files is not None else None
            return BlockMetadata(num_rows=None, size_bytes=None, input_files=files, exec_stats=None)

        return [ReadTask(task, meta(i), schema=self.schema) for i, task in enumerate(self.tasks)]


def read_shards(tasks: Sequence[Callable[[], Iterator[pa.Table]]], schema: pa.Schema, input_files=None):
    """The Ray Dataset of these read tasks (`ShardTasks`)."""
    return ray.data.read_datasource(ShardTasks(tasks, schema, input_files))
