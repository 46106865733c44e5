"""The pretokenize pipeline: corpus shards -> filter -> tokenize -> token shards, on Ray Data.

    read (one task per input shard, streamed in blocks)            pipelines.read_tasks, pipelines.sources.read_shard
         decode, validate, filter, resize + crop (in the read task)  pipelines.filters.filter_sample
      -> optional CLIP score (actor pool)                            pipelines.clip_score.ClipScoreStage
      -> tokenize (actor pool: one actor per GPU, or CPU actors)     pipelines.tokenize.TokenizeStage
      -> driver: deduplicate, pack into parts, commit                pipelines.writer.ShardWriter
                                                                     pipelines.dedup.DedupIndex (driver or actors)

Every input shard ends with an end-of-shard row carrying its sample count, so the writer knows when a shard is
complete whatever order Ray delivers rows in. Committed shards are skipped on the next run (resume). The driver
holds the rows of the shards in flight and of one open part (about `target_file_mb`), whatever the corpus size.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa
import ray

from pipelines.clip_score import ClipScoreConfig, ClipScoreStage
from pipelines.cpu_allocator import CPU_WORKER_ENV
from pipelines.dedup import DedupIndex, partition_of
from pipelines.filters import FilterConfig, filter_sample
from pipelines.read_tasks import read_shards
from pipelines.sources import LLAVA_ENTRIES_PER_SHARD, Shard, expand_inputs, read_shard, resolve_directory
from pipelines.tokenize import TokenizeStage, load_tokenizer, token_dtype
from pipelines.writer import Claim, ShardWriter
from tokenflow import __version__ as tokenflow_version
from tokenflow.config import to_dict
from tokenflow.image import Preprocess

log = logging.getLogger("pretokenize")


@dataclass(kw_only=True)
class PretokenizeConfig:
    """Everything the pretokenize job does; YAML keys and `--set key=value` overrides use these names."""

    input: list[str] = field(default_factory=list)
    """Input shards: files, directories, globs, brace ranges ({00000..01023}.tar); local paths or s3:// URIs."""
    output: str = ""
    """Output root (local path or s3:// URI): shards/, rejects/, _progress/, manifest.json."""
    tokenizer: str = ""
    """A saved tokenizer directory (path or URI), or preset:NAME (random weights; smoke tests only)."""
    format: str | None = None
    """webdataset, parquet, folder or llava; None detects it from the inputs (llava only for a named .json/.jsonl
    file: directories of the other formats hold .json sidecars)."""
    image_column: str | None = None
    """Parquet: the image column (default: detect jpg, image, image_bytes, ...)."""
    caption_column: str | None = None
    """Parquet: the caption column (default: detect caption, TEXT, text, ...)."""
    image_root: str | None = None
    """llava: the directory (path or s3:// URI) the annotations' `image` paths are relative to (LLaVA's
    --image_folder); None: each annotation file's own directory."""
    llava_entries_per_shard: int = LLAVA_ENTRIES_PER_SHARD
    """llava: annotation entries per input shard (a read task and a unit of resume: keep it when resuming)."""
    s3_endpoint: str | None = None
    """Endpoint URL of an S3-compatible store (MinIO, Ceph, ...); credentials come from the AWS environment."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    clip: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    """Optional CLIP-score filter (off by default)."""
    dedup: bool = True
    """Drop exact duplicates (same image bytes) across the whole job; the first committed sample is kept."""
    dedup_partitions: int = 0
    """0: the duplicate index lives in the driver (60-100 bytes per kept sample); N: in N Ray actors, each
    holding 1/N of it (corpora of billions)."""
    target_file_mb: float = 256.0
    """Size of the output files: input shards are packed into parts until their rows reach this many MiB."""
    row_group_mb: float = 32.0
    """Parquet row groups of about this many MiB (the unit readers fetch and Ray Data splits on)."""
    read_batch_rows: int = 256
    """Rows per block a read task yields, after decoding and filtering (bounds the memory of a read task)."""
    batch_size: int = 64
    """Images per tokenizer forward."""
    tokenizer_actors: int | None = None
    """Size of the tokenize actor pool; default one per GPU in the cluster, else a quarter of the CPUs (>= 1).
    When the actors ask for GPUs or custom resources the cluster does not have yet (an autoscaling cluster that
    starts without GPU nodes), set it: it is how many actors, and so nodes, the job scales up to."""
    tokenizer_gpus: float | None = None
    """GPUs each tokenize actor asks for. None: 1 when the cluster has GPUs as the job starts, else 0. Set 1 on
    an autoscaling cluster without GPU nodes yet: the actors' GPU requests are what make the autoscaler add them."""
    tokenizer_resources: dict[str, float] = field(default_factory=dict)
    """Custom resources each tokenize actor asks for, e.g. {tokenize_gpu: 1}: the stage runs only on node types
    that advertise them (ray_cluster.yaml), and an autoscaler adds those nodes for it."""
    tokenizer_threads: int | None = None
    """CPU actors only: torch threads per tokenize actor; default a node's CPUs divided by the actors per node.
    (Decoding runs in the read tasks, and a model-bound stage should use the cores the reads leave idle.)"""
    device: str = "auto"
    """auto (CUDA when the actor has a GPU), cpu or cuda."""
    precision: str = "auto"
    """Tokenizer weights: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32; the quantizer's search is always fp32."""
    progress_every_s: float = 30.0
    """Seconds between one-line progress summaries."""

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if self.batch_size < 1 or self.read_batch_rows < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.llava_entries_per_shard < 1:
            raise ValueError("llava_entries_per_shard must be >= 1")
        if self.target_file_mb <= 0 or self.row_group_mb <= 0:
            raise ValueError("target_file_mb and row_group_mb must be > 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")
        if self.dedup_partitions < 0:
            raise ValueError("dedup_partitions must be >= 0")
        if self.tokenizer_gpus is not None and self.tokenizer_gpus < 0:
            raise ValueError("tokenizer_gpus must be >= 0")
        if self.tokenizer_gpus and self.device == "cpu":
            raise ValueError("tokenizer_gpus > 0 with device cpu: the actors would hold GPUs they never use")
        if any(not isinstance(v, (int, float)) or v <= 0 for v in self.tokenizer_resources.values()):
            raise ValueError(f"tokenizer_resources amounts must be numbers > 0, got {self.tokenizer_resources}")
        if self.tokenizer_actors is not None and self.tokenizer_actors < 1:
            raise ValueError("tokenizer_actors must be >= 1")

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.s3_endpoint} if self.s3_endpoint else {}


# ---- Ray Data stage functions (module level so Ray can pickle them by reference) -----------------------------
# Stages exchange pyarrow tables with explicit schemas: inferred from Python objects, a column that happens to be
# all null in one block (say `reason` in a shard without rejects) becomes Arrow's null type, which Ray turns
# into float NaN in numpy batches, and NaN is truthy.

READ_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.binary()),
        ("conversations", pa.string()),  # llava: the entry's turns as JSON text; null for the other formats
        ("meta", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("shard_id", pa.string()),
        ("end_of_shard", pa.int64()),  # -1 for samples; the shard's sample count on its last row
    ]
)
FILTERED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("conversations", pa.string()),
        ("meta", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("shard_id", pa.string()),
        ("end_of_shard", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_sha256", pa.string()),
        ("clip_score", pa.float32()),  # set by the optional CLIP-score stage
        ("pixels", pa.binary()),  # uint8 S x S x 3 in the tokenizer's convention; null for rejects and text-only
    ]
)


def read_shard_tables(shard: Shard, cfg: PretokenizeConfig) -> Iterator[pa.Table]:
    """One input shard -> tables of at most `read_batch_rows` reader rows (READ_SCHEMA), then the shard's
    end-of-shard row."""
    rows, n = [], 0
    for row in read_shard(
        shard,
        image_column=cfg.image_column,
        caption_column=cfg.caption_column,
        image_root=cfg.image_root,
        storage_options=cfg.storage_options,
    ):
        rows.append({**row, "shard_id": shard.shard_id, "end_of_shard": -1})
        n += 1
        if len(rows) >= cfg.read_batch_rows:
            yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
            rows = []
    end = {"key": f"{shard.shard_id}#end", "source": shard.path, "shard_id": shard.shard_id, "end_of_shard": n}
    yield pa.Table.from_pylist([*rows, end], schema=READ_SCHEMA)


def read_and_filter(shard: Shard, cfg: PretokenizeConfig, preprocess: Preprocess) -> Iterator[pa.Table]:
    """A read task's work: one input shard read, decoded, validated and filtered (FILTERED_SCHEMA blocks)."""
    for table in read_shard_tables(shard, cfg):
        yield filter_batch(table, filters=cfg.filters, preprocess=preprocess)


def filter_batch(batch: pa.Table, *, filters: FilterConfig, preprocess: Preprocess) -> pa.Table:
    """Decode, validate and filter; the image bytes are replaced by the preprocessed pixels."""
    out = []
    for row in batch.to_pylist():
        if row["end_of_shard"] < 0:
            row = filter_sample(row, filters, preprocess)
            row["pixels"] = None if row["pixels"] is None else row["pixels"].tobytes()
        out.append(row)
    return pa.Table.from_pylist(out, schema=FILTERED_SCHEMA)


# ---- the driver ---------------------------------------------------------------------------------------------


def run(cfg: PretokenizeConfig) -> dict:
    """Run (or resume) the job; returns the manifest. Starts a local Ray unless one is running or RAY_ADDRESS
    points at a cluster."""
    if not cfg.input or not cfg.output or not cfg.tokenizer:
        raise ValueError("input, output and tokenizer are required")
    t0 = time.time()
    opts = cfg.storage_options
    shards = expand_inputs(
        cfg.input, format=cfg.format, storage_options=opts, entries_per_shard=cfg.llava_entries_per_shard
    )
    conversations = any(s.format == "llava" for s in shards)
    if conversations and cfg.clip.enabled:
        raise ValueError("the CLIP-score filter scores images against captions, and llava inputs have conversations")
    if cfg.image_root is not None:
        if not conversations:
            raise ValueError(f"image_root applies to llava inputs only; these are {shards[0].format}")
        # resolved here: a relative local path would mean another directory in the read tasks' working directory
        cfg = replace(cfg, image_root=resolve_directory(cfg.image_root, storage_options=opts))
    tok = load_tokenizer(cfg.tokenizer, storage_options=opts)
    dtype = token_dtype(tok.codebook_size)
    tokenizer_id = tok.fingerprint()
    file_metadata = {
        "tokenizer_id": tokenizer_id,
        "tokenizer": cfg.tokenizer,
        "scales": json.dumps(list(tok.scales)),
        "codebook_size": str(tok.codebook_size),
        "num_codebooks": str(tok.num_codebooks),
        "token_layout": "scale-major, row-major within a scale" + (", then codebook" if tok.num_codebooks > 1 else ""),
        "preprocess": json.dumps(to_dict(tok.preprocessor)),
        "filters": json.dumps(to_dict(cfg.filters)),
        "tokenflow_version": tokenflow_version,
    }
    writer = ShardWriter(
        cfg.output,
        file_metadata=file_metadata,
        token_dtype=dtype,
        target_file_mb=cfg.target_file_mb,
        row_group_mb=cfg.row_group_mb,
        conversations=conversations,
        storage_options=opts,
    )
    done = writer.recover()
    _check_same_ranges(shards, done, cfg.output)
    other = sorted({m.get("tokenizer_id") for m in done.values()} - {tokenizer_id})
    if other:
        raise ValueError(
            f"{cfg.output} already holds shards made with tokenizer {other}, this run's is {tokenizer_id}: "
            "resume with the same tokenizer, or write to a new output"
        )
    pending = [s for s in shards if s.shard_id not in done]
    preprocess, scales = tok.preprocessor, list(tok.scales)
    del tok  # the actors load their own copy; the driver keeps no model (GBs for the large presets)
    extra = {
        "tokenizer_id": tokenizer_id,
        "tokenizer": cfg.tokenizer,
        "scales": scales,
        "codebook_size": int(file_metadata["codebook_size"]),
        "inputs": {"shards": len(shards)},
        "config": to_dict(cfg),
        "tokenflow_version": tokenflow_version,
    }
    if not pending:
        log.warning("nothing to do: all %d input shards are already committed in %s", len(shards), cfg.output)
        manifest = writer.read_manifest()  # a run killed after its last commit has not written one yet
        if manifest is None:
            manifest = writer.write_manifest({**extra, "wall_time_s": None})
        return {**manifest, "nothing_to_do": True}  # the flag is for the caller; the file is left as it was
    log.info("%d of %d shards to process (%d already committed)", len(pending), len(shards), len(done))
    writer.remove_manifest()  # written again at the end; until then the commit records are the truth

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    if cfg.dedup:
        writer.claim = _dedup_index(cfg.dedup_partitions)
        for digests, keys in writer.committed_digests():
            writer.claim(digests, keys)
    ds = _build_dataset(cfg, pending, preprocess)
    progress = _Progress(cfg.progress_every_s)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        progress.update(batch)
        writer.add(batch)
    if writer.unfinished():
        raise RuntimeError(f"shards incomplete at the end of the stream: {writer.unfinished()}")
    writer.close()
    wall = time.time() - t0
    manifest = writer.write_manifest(
        {**extra, "wall_time_s": round(wall, 3), "samples_per_s": round(progress.samples / wall, 2) if wall else None}
    )
    progress.log_line(final=True)
    return manifest


def _check_same_ranges(shards: list[Shard], done: dict[str, dict], output: str) -> None:
    """A llava annotation file split into other entry ranges than those committed (another
    llava_entries_per_shard, or the file changed) would have entries written twice under other keys: refuse."""
    ranges: dict[str, set[str]] = defaultdict(set)
    for shard in shards:
        if shard.format == "llava":
            ranges[shard.path].add(shard.shard_id)
    other = sorted(sid for sid, info in done.items() if sid not in ranges.get(info.get("source"), {sid}))
    if other:
        raise ValueError(
            f"{output} holds entry ranges {other[:3]} of annotation files that this run splits otherwise: resume with "
            "the llava_entries_per_shard of the first run, or write a changed file's samples to a new output"
        )


def _dedup_index(partitions: int) -> Claim:
    """The job's duplicate index as a claim function: in the driver, or split by digest over Ray actors."""
    if partitions == 0:
        return DedupIndex().claim
    # a little CPU so the actors land on worker nodes, never on a head started with num-cpus 0
    actors = [ray.remote(num_cpus=0.1)(DedupIndex).remote() for _ in range(partitions)]

    def claim(digests: list[str], keys: list[str]) -> list[str | None]:
        owned = defaultdict(list)
        for i, digest in enumerate(digests):
            owned[partition_of(digest, partitions)].append(i)
        refs = {p: actors[p].claim.remote([digests[i] for i in ix], [keys[i] for i in ix]) for p, ix in owned.items()}
        out: list[str | None] = [None] * len(digests)
        for p, ref in refs.items():
            for i, first in zip(owned[p], ray.get(ref)):
                out[i] = first
        return out

    return claim


def tokenize_pool(cfg: PretokenizeConfig, cluster: dict[str, float]) -> tuple[int, float]:
    """(actors, GPUs per actor) of the tokenize stage, given the cluster's resources as the job starts."""
    gpus = float(cluster.get("GPU", 0))
    per_actor = cfg.tokenizer_gpus
    if per_actor is None:
        per_actor = 1.0 if gpus > 0 and cfg.device != "cpu" else 0.0
    if cfg.tokenizer_actors is not None:
        return cfg.tokenizer_actors, per_actor
    wanted = {**cfg.tokenizer_resources, **({"GPU": per_actor} if per_actor else {})}
    if not wanted:
        return max(1, int(cluster.get("CPU", 0)) // 4), per_actor
    actors = min(int(float(cluster.get(k, 0)) // v) for k, v in wanted.items())
    if actors < 1:
        have = {k: cluster.get(k, 0) for k in wanted}
        raise ValueError(
            f"each tokenize actor asks for {wanted} and the cluster has {have} now: set tokenizer_actors to the "
            "number of actors to scale up to (an autoscaling cluster adds the nodes they need)"
        )
    return actors, per_actor


def _placement(resources: dict[str, float]) -> dict:
    """Ray remote args for custom resources (none when empty)."""
    return {"resources": dict(resources)} if resources else {}


def tokenize_actor_args(cfg: PretokenizeConfig, gpus_per_actor: float) -> dict:
    """Ray remote args of a tokenize actor: its share of a GPU, one CPU, the custom resources that place it; a
    CPU actor also runs with one malloc arena (`CPU_WORKER_ENV`: Ray calls the actor in a thread of its own, and
    `TokenizeStage` keeps the model's freed buffers in that arena's heap)."""
    args = {"num_gpus": gpus_per_actor, "num_cpus": 1, **_placement(cfg.tokenizer_resources)}
    if not gpus_per_actor:
        args["runtime_env"] = {"env_vars": dict(CPU_WORKER_ENV)}
    return args


def _build_dataset(cfg: PretokenizeConfig, pending: list[Shard], preprocess: Preprocess):
    cluster = ray.cluster_resources()
    cpus = int(cluster.get("CPU", 0))
    actors, gpus_per_actor = tokenize_pool(cfg, cluster)
    use_gpu = gpus_per_actor > 0
    clip_actors = (cfg.clip.actors or actors) if cfg.clip.enabled else 0
    if actors + clip_actors >= cpus:  # every actor holds a CPU; read tasks need one more
        log.warning(
            "the actor pools take %d of the %d CPUs the cluster has now and leave none for the read/decode tasks: "
            "the job waits until the cluster grows (an autoscaling cluster adds nodes); on a fixed cluster lower "
            "tokenizer_actors or clip.actors",
            actors + clip_actors,
            cpus,
        )
    threads = cfg.tokenizer_threads
    if not use_gpu and threads is None:
        node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
        per_node = -(-actors // max(1, len(node_cpus)))
        threads = max(1, int(max(node_cpus, default=1)) // per_node)
    # one read task per input shard, which reads, decodes and filters it in a stream of blocks (decoding there
    # keeps it off the tokenize actors, where it would run in series with the model)
    reads = [functools.partial(read_and_filter, shard, cfg, preprocess) for shard in pending]
    ds = read_shards(reads, FILTERED_SCHEMA, input_files=[shard.path for shard in pending])
    if cfg.clip.enabled:
        ds = ds.map_batches(
            ClipScoreStage,
            fn_constructor_kwargs={"cfg": cfg.clip, "image_size": preprocess.size, "device": cfg.device},
            compute=ray.data.ActorPoolStrategy(size=clip_actors),
            batch_size=cfg.clip.batch_size,
            batch_format="pyarrow",
            # a CLIP forward is small next to the tokenizer's: a quarter of a tokenize actor's GPU and placement
            num_gpus=gpus_per_actor / 4,
            num_cpus=1,
            **_placement({k: v / 4 for k, v in cfg.tokenizer_resources.items()}),
        )
    return ds.map_batches(
        TokenizeStage,
        fn_constructor_kwargs={
            "tokenizer": cfg.tokenizer,
            "device": cfg.device,
            "precision": cfg.precision,
            "threads": None if use_gpu else threads,
            "storage_options": cfg.storage_options,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        **tokenize_actor_args(cfg, gpus_per_actor),
    )


class _Progress:
    """A periodic one-line summary: samples/s, kept %, top reject reasons."""

    def __init__(self, every_s: float):
        self.every_s, self.t0, self.last = every_s, time.time(), time.time()
        self.samples, self.kept, self.reasons = 0, 0, Counter()

    def update(self, batch: pa.Table) -> None:
        for end, reason in zip(batch["end_of_shard"].to_pylist(), batch["reason"].to_pylist()):
            if end >= 0:
                continue
            self.samples += 1
            if reason:
                self.reasons[reason] += 1
            else:
                self.kept += 1
        if time.time() - self.last >= self.every_s:
            self.log_line()

    def log_line(self, final: bool = False) -> None:
        self.last = time.time()
        rate = self.samples / max(self.last - self.t0, 1e-9)
        top = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common(3)) or "none"
        kept = 100.0 * self.kept / self.samples if self.samples else 0.0
        log.info(
            "%s%d samples, %.1f/s, kept %.1f%% (before dedup), top rejects: %s",
            "done: " if final else "",
            self.samples,
            rate,
            kept,
            top,
        )
