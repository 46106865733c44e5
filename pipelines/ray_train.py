"""The Ray Train plumbing both training jobs share (`train_tokenizer`, `train_t2i`).

Driver side: `make_trainer` (worker resources, local or `s3://` storage, failure and checkpoint policy ->
`TorchTrainer`). Worker side: device and precision (`worker_device`), RNG states that round-trip through a
`weights_only` load, the collective "does every worker have a full batch" test, counters pooled over workers,
and `report_checkpoint`, which writes one rank's part of a checkpoint and hands it to `ray.train.report`.

The job configs derive from `RayTrainConfig`, the fields every training run on Ray Train has.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from pipelines.cpu_allocator import CPU_WORKER_ENV, keep_large_buffers


@dataclass(kw_only=True)
class RayTrainConfig:
    """What every training job configures about its run: workers, precision, storage, checkpoints, tracking."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    micro_batch: int = 8
    """Samples per worker per forward."""
    workers: int = 2
    """Ray Train workers (one per GPU on GPU clusters)."""
    gpus_per_worker: float = 0.0
    """0 trains on CPU (fp32); >= 1 on GPUs with bf16 autocast (fp32 weights and optimiser states)."""
    cpus_per_worker: float = 1.0
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom resources each worker asks for, e.g. {train_slot: 1}, to place workers on a node type."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32."""
    seed: int = 0
    """Seeds the model initialisation (identical on every worker) and the training randomness."""
    name: str = "run"
    """The run's name: checkpoints go to storage_path/name; the same name resumes."""
    storage_path: str = "runs"
    """Where checkpoints and the final model go: a local path (shared storage on multi-node clusters, e.g. NFS)
    or an s3:// URI."""
    s3_endpoint: str | None = None
    """Endpoint URL of an S3-compatible store for storage_path (data.s3_endpoint is the inputs')."""
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    max_failures: int = 3
    """Worker-group restarts from the latest checkpoint before the run fails."""
    log_every: int = 50
    """Steps per metrics window (pooled over the workers)."""
    mlflow_uri: str | None = None
    """Tracking URI (http://host:5000, sqlite:///path/mlflow.db); None: no tracking."""
    mlflow_experiment: str = "train"

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch < 1 or self.workers < 1:
            raise ValueError("micro_batch and workers must be >= 1")
        if min(self.checkpoint_every, self.log_every) < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ValueError("gpus_per_worker and cpus_per_worker must be >= 0")

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.s3_endpoint} if self.s3_endpoint else {}


# ---- driver ------------------------------------------------------------------------------------------------------


def make_trainer(cfg, train_loop, loop_config: dict, datasets: dict, dataset_config):
    """(TorchTrainer, cfg with a local storage_path made absolute). The workers get `cfg` in loop_config["cfg"]."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker, **cfg.worker_resources}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    storage_path, storage_fs = cfg.storage_path, None
    if cfg.storage_path.startswith("s3://") and cfg.s3_endpoint:
        import pyarrow.fs

        storage_fs = pyarrow.fs.S3FileSystem(endpoint_override=cfg.s3_endpoint)
        storage_path = cfg.storage_path.removeprefix("s3://")
    elif "://" not in cfg.storage_path:
        storage_path = os.path.abspath(cfg.storage_path)
        cfg = replace(cfg, storage_path=storage_path)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**loop_config, "cfg": cfg},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": CPU_WORKER_ENV} if not cfg.gpus_per_worker else None,
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )
    return trainer, cfg


def flat_params(cfg) -> dict[str, str]:
    """A job config as MLflow params (flat strings, each within MLflow's length limit)."""
    from pipelines.tracking import flatten
    from tokenflow.config import to_dict

    return {k: v[:6000] for k, v in flatten(to_dict(cfg)).items()}


def git_commit() -> str:
    """The commit of the code the job runs from ("unknown" outside a git checkout, e.g. a Ray working_dir)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---- worker ------------------------------------------------------------------------------------------------------


def worker_device(cfg):
    """(device, autocast dtype or None) of this worker: CUDA with bf16 autocast when it has GPUs (precision
    "auto"), the CPU in fp32 otherwise. Sets DS_ACCELERATOR=cpu before DeepSpeed is imported on CPU workers."""
    use_cuda = cfg.gpus_per_worker > 0
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        keep_large_buffers()
    import ray.train.torch
    import torch

    device = ray.train.torch.get_device() if use_cuda else torch.device("cpu")
    amp = torch.bfloat16 if (cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)) else None
    if amp is not None and device.type != "cuda":
        raise ValueError("bf16 training needs GPUs (gpus_per_worker >= 1); use precision fp32 on CPU")
    return device, amp


def rng_state() -> dict:
    """Every random stream of this process, as tensors and plain values (loadable with weights_only=True)."""
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_rng(checkpoint_dir: str, rank: int) -> None:
    """This rank's RNG state from a checkpoint written by `report_checkpoint` (absent in very old ones)."""
    import torch

    path = os.path.join(checkpoint_dir, "rng", f"rank_{rank}.pt")
    if os.path.exists(path):
        set_rng_state(torch.load(path, weights_only=True))


def all_have(batches, n: int) -> bool:
    """True when every worker's batch source can fill n samples (collective: the epoch ends for all at once)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if batches.fill(n) else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_counts(mine: Counter) -> Counter:
    """A counter summed over all workers (collective)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(mine))
    total = Counter()
    for c in gathered:
        total.update(c)
    return total


def counter_metrics(base: Counter, mine: Counter, prefix: str) -> dict[str, float]:
    """`prefix.<key>` per key and `prefix` in all: base (the runs before a restart) plus every worker's now."""
    total = base + gather_counts(mine)
    out = {f"{prefix}.{r}": float(n) for r, n in total.items()}
    out[prefix] = float(sum(total.values()))
    return out


@contextlib.contextmanager
def report_checkpoint(rank: int, step: int, metrics: dict):
    """Yields a fresh directory for this rank's part of the checkpoint (its RNG state is already in it); on exit
    every rank waits for the others and `ray.train.report` merges the parts into `step_<step>` in storage."""
    import ray.train
    import torch
    import torch.distributed as dist

    tmp = tempfile.mkdtemp(prefix=f"ckpt_rank{rank}_")
    try:
        os.makedirs(os.path.join(tmp, "rng"))
        torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{rank}.pt"))
        yield tmp
        dist.barrier()
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step_{step:08d}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def start_plan(plan, epoch: int, position: dict | None = None) -> None:
    """Rank 0 fixes the epoch's shard order in the `EpochPlan` (and the data position a resumed run starts from);
    every rank waits for it (collective)."""
    import ray
    import torch.distributed as dist

    if dist.get_rank() == 0:
        ray.get(plan.start.remote(epoch, position))
    dist.barrier()


def warm_up(plan, epoch: int, open_stream, position: dict | None = None):
    """`start_plan`, then `open_stream()` (this worker opens its epoch stream and reads its first batches) in a
    background thread, so that Ray Data's read tasks start while the model is built and loaded (minutes for a
    large model; the first batch's wait otherwise comes after). Returns a function that waits for it and raises
    what it raised. `open_stream` must do no collective operation and draw from no global random stream: the
    main thread's DeepSpeed set-up and seeding run meanwhile."""
    start_plan(plan, epoch, position)
    return in_background(open_stream, name="data-warm-up")


def in_background(fn, *, name: str):
    """Run `fn()` in a daemon thread; returns a function that waits for it and raises what it raised. A daemon: if
    the caller fails before waiting (say, the model does not load), the process can still exit, whereas a pool's
    thread would be joined at exit, and a stream read may block for as long as the cluster lives."""
    import threading

    outcome: dict = {}

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]

    return wait


@contextlib.contextmanager
def latest_checkpoint(world: int, positions: str | None = None):
    """(directory, state) of the run's latest checkpoint, kept on local disk while open (a checkpoint in S3 is
    downloaded once), or (None, None) on a fresh start. `state` is rank 0's state.json; its `positions` list (each
    rank's place in the data), when named, must have one entry per worker."""
    import json

    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None, None
        return
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, "state.json")) as fh:
            state = json.load(fh)
        if positions is not None and len(state[positions]) != world:
            raise ValueError(
                f"the checkpoint was written by {len(state[positions])} workers; resume with the same number"
            )
        yield d, state
