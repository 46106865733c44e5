"""Train an image tokenizer on Ray Train + DeepSpeed, fed by Ray Data, tracked in MLflow from rank 0.

    driver (`run`)      expand the inputs, build the train/eval datasets and the epoch plan, TorchTrainer.fit()
    each worker         build the tokenizer, teacher and losses (seeded alike), DeepSpeed engines for the
    (`train_loop`)      tokenizer and the discriminator, restore the latest checkpoint, then loop:
                          fill a batch on every worker (the epoch ends for all when one runs dry)
                          TrainStep (generator, then discriminator) per micro-batch
                          every log_every steps: losses, lr, grad norms, images/s and exact codebook
                            statistics of the window, all-reduced over the workers
                          every eval_every steps: PSNR, SSIM and codebook usage on the held-out images
                          every checkpoint_every steps: both engines, every rank's RNG state, the merged data
                            position and the MLflow run id, through ray.train.report(checkpoint=...)
                        at the end: the weights gathered (ZeRO-3 included) into a `save_pretrained` directory

Resume: run the same command again (same name and storage_path) and Ray Train hands the latest checkpoint to
the workers; FailureConfig does the same after a worker dies.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from pipelines.train_data import TrainDataConfig
from tokenflow.config import to_dict
from tokenflow.train.config import TrainConfig

log = logging.getLogger("train_tokenizer")


@dataclass(kw_only=True)
class TrainTokenizerConfig:
    """Everything `jobs/train_tokenizer.py` does; YAML keys and `--set key=value` overrides use these names."""

    tokenizer: str = "preset:tiny"
    """The model to train: preset:NAME (random init; the semantic encoder loads the pretrained weights its
    preset names) or a saved tokenizer directory (path or URI) to start from, e.g. for the decoder stages."""
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (both engines)."""
    micro_batch: int = 8
    """Images per worker per forward."""
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
    name: str = "tokenizer"
    """The run's name: checkpoints go to storage_path/name; the same name resumes."""
    storage_path: str = "runs"
    """Where checkpoints and the final tokenizer go: a local path (shared storage on multi-node clusters, e.g.
    NFS) or an s3:// URI."""
    s3_endpoint: str | None = None
    """Endpoint URL of an S3-compatible store for storage_path (data.s3_endpoint is the inputs')."""
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    max_failures: int = 3
    """Worker-group restarts from the latest checkpoint before the run fails."""
    log_every: int = 50
    """Steps per metrics window (losses averaged, codebook statistics counted exactly over it)."""
    image_every: int = 1000
    """Steps between a reconstruction grid and a codebook usage histogram (a multiple of log_every)."""
    eval_every: int = 1000
    """Steps between evaluations on the held-out images (0: only at the end)."""
    mlflow_uri: str | None = None
    """Tracking URI (http://host:5000, sqlite:///path/mlflow.db); None: no tracking."""
    mlflow_experiment: str = "tokenizer"
    dataset_name: str | None = None
    """The `dataset` tag of the MLflow run (default: the inputs)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch < 1 or self.workers < 1:
            raise ValueError("micro_batch and workers must be >= 1")
        if min(self.checkpoint_every, self.log_every, self.image_every) < 1 or self.eval_every < 0:
            raise ValueError("checkpoint_every, log_every and image_every must be >= 1, eval_every >= 0")
        if self.image_every % self.log_every:
            raise ValueError(f"image_every ({self.image_every}) must be a multiple of log_every ({self.log_every})")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ValueError("gpus_per_worker and cpus_per_worker must be >= 0")

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def tokenizer_dir(self) -> str:
        """Where the trained tokenizer is written (`jobs/pretokenize.py --tokenizer` takes it)."""
        return f"{self.run_dir}/tokenizer"

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.s3_endpoint} if self.s3_endpoint else {}


# ---- building the model on a worker ----------------------------------------------------------------------------


def build_tokenizer(spec: str, *, seed: int, storage_options: dict | None = None):
    """A preset (random init from `seed`) or a saved tokenizer."""
    import torch

    from tokenflow import Tokenizer

    torch.manual_seed(seed)
    if spec.startswith("preset:"):
        return Tokenizer.from_preset(spec.removeprefix("preset:"))
    return Tokenizer.from_pretrained(spec, storage_options=storage_options)


def tokenizer_preprocess(spec: str, storage_options: dict | None = None):
    """The input convention (`tokenflow.image.Preprocess`) of a preset or saved tokenizer, without its weights."""
    from tokenflow.config import TokenizerConfig, preset
    from tokenflow.tokenizer import preprocess_of

    if spec.startswith("preset:"):
        return preprocess_of(preset(spec.removeprefix("preset:")))
    import fsspec

    with fsspec.open(f"{spec.rstrip('/')}/config.json", "r", **(storage_options or {})) as fh:
        return preprocess_of(TokenizerConfig.from_dict(json.load(fh)["config"]))


# ---- the worker loop -------------------------------------------------------------------------------------------


def _rng_state() -> dict:
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


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _Window:
    """What happened since the last log line on this worker: sums of each metric, images, codebook counts."""

    def __init__(self, scales, codebook_size: int, num_codebooks: int):
        from tokenflow.stats import CodebookStats

        self.stats = CodebookStats.empty(scales, codebook_size, num_codebooks)
        self.sums: Counter[str] = Counter()
        self.micro_steps = 0
        self.images = 0
        self.t0 = time.time()

    def add(self, metrics: dict[str, float], quant, images: int) -> None:
        self.sums.update(metrics)
        self.micro_steps += 1
        self.images += images
        if quant is not None:
            self.stats.update(quant.per_scale_indices, quant.scales)
            if quant.part_distances is not None:
                for name, d in zip(("semantic", "pixel"), quant.part_distances.tolist()):
                    self.sums[f"codebook/distance_{name}"] += d


def train_loop(config: dict) -> None:
    """The Ray Train worker function: `config` holds the job config, the epoch-plan actor and the image size."""
    cfg: TrainTokenizerConfig = config["cfg"]
    use_cuda = cfg.gpus_per_worker > 0
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train
    import ray.train.torch
    import torch

    from pipelines.train_data import MicroBatches
    from pipelines.train_tracking import RunTracker
    from tokenflow.losses import TokenizerLoss
    from tokenflow.train import TrainStep, prepare_stage
    from tokenflow.train.deepspeed import build_engines

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if use_cuda else torch.device("cpu")
    amp = torch.bfloat16 if (cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)) else None
    if amp is not None and device.type != "cuda":
        raise ValueError("bf16 training needs GPUs (gpus_per_worker >= 1); use precision fp32 on CPU")

    # every worker builds the same initial weights (DeepSpeed also broadcasts them)
    tok = prepare_stage(
        build_tokenizer(cfg.tokenizer, seed=cfg.seed, storage_options=cfg.storage_options), cfg.train.stage
    )
    tok.to(device)
    teacher = None
    if cfg.train.stage == "full" and tok.config.kind == "tokenflow" and cfg.train.loss.semantic_weight > 0:
        teacher = tok.make_teacher().to(device)
    loss_fn = TokenizerLoss(cfg.train.loss).to(device)
    gen, disc = build_engines(
        tok, loss_fn, cfg.train, zero_stage=cfg.zero_stage, micro_batch=cfg.micro_batch, world_size=world, bf16=False
    )
    step_fn = TrainStep(tok, loss_fn, gen, disc, teacher=teacher, stage=cfg.train.stage, amp_dtype=amp)

    # ---- restore --------------------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "position": None, "mlflow_run_id": None, "rejects": {}, "restarts": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            gen.load_checkpoint(os.path.join(d, "generator"), tag="state")
            disc.load_checkpoint(os.path.join(d, "discriminator"), tag="state")
            with open(os.path.join(d, "state.json")) as fh:
                state = json.load(fh)
            rng_file = os.path.join(d, "rng", f"rank_{rank}.pt")
            if os.path.exists(rng_file):
                _set_rng_state(torch.load(rng_file, weights_only=True))
        state["restarts"] = state.get("restarts", 0) + 1
        log.info("rank %d resumed at step %d (epoch %d)", rank, state["step"], state["epoch"])
    else:
        # The same seed on every rank, and the ranks draw the same random numbers in the same order: the random
        # scale drop must agree across ranks, because ZeRO-3 gathers parameters collectively per module call
        # (a quantizer running a different number of scales on one rank deadlocks the all-gathers).
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

    tracker = RunTracker.disabled()
    if rank == 0:
        tracker = RunTracker.start(
            cfg.mlflow_uri,
            experiment=cfg.mlflow_experiment,
            run_id=state["mlflow_run_id"],
            run_name=cfg.name,
            params=_flat_params(cfg),
            tags={
                "git_commit": _git_commit(),
                "dataset": cfg.dataset_name or ",".join(cfg.data.input),
                "tokenizer": cfg.tokenizer,
                "stage": cfg.train.stage,
                "zero_stage": str(cfg.zero_stage),
            },
        )
        state["mlflow_run_id"] = tracker.run_id

    # ---- data -----------------------------------------------------------------------------------------------
    size = tok.preprocessor.size
    batches = MicroBatches(ray.train.get_dataset_shard("train"), cfg.micro_batch, size)
    eval_images = _eval_images(ray.train.get_dataset_shard("eval") if config["has_eval"] else None, size, rank, world)
    base_rejects = Counter(state.get("rejects", {}))

    try:
        plan = config["plan"]
        _train(
            cfg,
            plan,
            tok,
            gen,
            disc,
            step_fn,
            batches,
            eval_images,
            state,
            base_rejects,
            tracker,
            device,
            amp,
            rank,
            world,
        )
    except BaseException:
        tracker.end("FAILED")  # a restart after a failure reopens the same run
        raise
    if rank == 0:
        tracker.end()


def _train(
    cfg, plan, tok, gen, disc, step_fn, batches, eval_images, state, base_rejects, tracker, device, amp, rank, world
):
    """The step loop of `train_loop`, from the restored state to max_steps, then the export."""
    import ray
    import torch
    import torch.distributed as dist

    from pipelines.train_data import DataPosition

    def start_epoch(epoch: int, position: dict | None) -> None:
        if rank == 0:
            ray.get(plan.start.remote(epoch, position))
        dist.barrier()
        batches.start_epoch(epoch)
        if rank == 0 and position is not None and position.get("epoch") == epoch:
            batches.position = DataPosition.from_dict(position)  # keys consumed before the restart stay consumed

    def all_have(n: int) -> bool:
        flag = torch.tensor([1 if batches.fill(n) else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    step, epoch = state["step"], state["epoch"]
    need = cfg.micro_batch * cfg.train.grad_accum
    start_epoch(epoch, state["position"])
    window = _Window(tok.scales, tok.codebook_size, tok.num_codebooks)
    last_x = None
    while step < cfg.train.max_steps:
        if not all_have(need):
            epoch += 1
            start_epoch(epoch, None)
            if not all_have(need):
                raise RuntimeError(
                    f"one epoch of the training data gives some worker fewer than {need} images (micro_batch x "
                    f"grad_accum): add data, or lower micro_batch, grad_accum or workers"
                )
        for _ in range(cfg.train.grad_accum):
            x, _keys = batches.take()
            last_x = x
            metrics = step_fn(x.to(device), step)
            window.add(metrics, step_fn.last_quant, len(x))
        step += 1
        if step % cfg.log_every == 0 or step == cfg.train.max_steps:
            logged = _reduce_window(window, gen, disc, world)
            logged.update(_reject_metrics(base_rejects, batches.rejects))
            logged["data/epoch"] = epoch
            logged["data/samples_seen"] = step * need * world
            tracker.metrics(logged, step)
            if rank == 0:
                log.info("step %d: %s", step, _short(logged))
            if step % cfg.image_every == 0 or step == cfg.train.max_steps:
                _log_images(tracker, window, last_x, step_fn.last_reconstruction, step)
            window = _Window(tok.scales, tok.codebook_size, tok.num_codebooks)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.train.max_steps:
            tracker.metrics(_evaluate(tok, eval_images, device, amp, world, tracker, step), step)
        if step % cfg.checkpoint_every == 0 or step == cfg.train.max_steps:
            state.update(step=step, epoch=epoch)
            _save_checkpoint(gen, disc, batches, state, base_rejects, rank, world, {"step": step, "epoch": epoch})

    _export(tok, cfg, rank, tracker, state)


def _short(metrics: dict) -> str:
    keys = ("loss/total", "loss/rec", "lr", "throughput/images_per_s", "codebook/usage/all")
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)


def _flat_params(cfg: TrainTokenizerConfig) -> dict[str, str]:
    from pipelines.tracking import flatten

    return {k: v[:6000] for k, v in flatten(to_dict(cfg)).items()}


def _git_commit() -> str:
    import subprocess

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


def _reduce_window(window: _Window, gen, disc, world: int) -> dict[str, float]:
    """Window means over all workers, exact pooled codebook statistics, throughput, lr and grad norms."""
    import torch
    import torch.distributed as dist

    keys = sorted(window.sums)
    sums = torch.tensor([window.sums[k] for k in keys] + [window.micro_steps, window.images], dtype=torch.float64)
    dist.all_reduce(sums)
    dist.all_reduce(window.stats.counts)
    *values, micro, images = sums.tolist()
    out = {k: v / max(micro, 1) for k, v in zip(keys, values)}
    out.update({f"codebook/{k}": v for k, v in window.stats.summary().items()})
    elapsed = max(time.time() - window.t0, 1e-9)
    out["throughput/images_per_s"] = images / elapsed
    out["lr"] = gen.get_lr()[0]
    out["lr_disc"] = disc.get_lr()[0]
    for name, engine in (("grad_norm", gen), ("grad_norm_disc", disc)):
        norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else engine.grad_norm
        if norm is not None:
            out[name] = float(norm)
    return out


def _reject_metrics(base: Counter, mine: Counter) -> dict[str, float]:
    """Bad samples skipped so far, summed over workers (and over the runs before a restart)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(mine))
    total = Counter(base)
    for c in gathered:
        total.update(c)
    out = {f"data/rejected.{r}": float(n) for r, n in total.items()}
    out["data/rejected"] = float(sum(total.values()))
    return out


def _log_images(tracker, window: _Window, x, x_hat, step: int) -> None:
    if not tracker.enabled:
        return
    from tokenflow.train.visuals import reconstruction_grid, usage_histogram

    if x is not None and x_hat is not None:
        tracker.image(reconstruction_grid(x, x_hat.float().cpu()), f"train/reconstructions/step_{step:08d}.png")
    hist = usage_histogram(window.stats.counts, window.stats.scales, title=f"codebook usage, steps to {step}")
    tracker.image(hist, f"codebook/usage_step_{step:08d}.png")


def _eval_images(dataset, size: int, rank: int, world: int):
    """This worker's held-out images, read once: every world-th of the whole (unsplit, ordered) eval set, so none
    is dropped to even out the workers. (N, 3, S, S) in [-1, 1]."""
    import torch

    from pipelines.train_data import pixels_to_tensor

    if dataset is None:
        return torch.zeros(0, 3, size, size)
    rows = [row for t in dataset.iter_batches(batch_format="pyarrow", batch_size=None) for row in t.to_pylist()]
    rows.sort(key=lambda r: (r["shard_id"], r["key"]))
    blobs = [row["pixels"] for row in rows[rank::world]]
    return pixels_to_tensor(blobs, size) if blobs else torch.zeros(0, 3, size, size)


def _evaluate(tok, images, device, amp, world: int, tracker, step: int, chunk: int = 16) -> dict[str, float]:
    """PSNR, SSIM (data range 2 for [-1, 1] images) and codebook usage on the held-out images, all workers.
    Every worker runs the same number of forwards (ZeRO-3 gathers weights collectively)."""
    import torch
    import torch.distributed as dist

    from tokenflow.metrics import psnr, ssim
    from tokenflow.stats import CodebookStats

    n_chunks = torch.tensor([-(-len(images) // chunk)])
    dist.all_reduce(n_chunks, op=dist.ReduceOp.MAX)
    stats = CodebookStats.empty(tok.scales, tok.codebook_size, tok.num_codebooks)
    sums = torch.zeros(3, dtype=torch.float64)  # psnr, ssim, images
    grid = None
    was_training = tok.training
    tok.eval()
    with torch.no_grad():
        for i in range(int(n_chunks.item())):
            x = images[i * chunk : (i + 1) * chunk]
            real = len(x)
            if real == 0:  # keep step with the other workers
                x = torch.zeros(1, 3, images.shape[-2], images.shape[-1])
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = tok(x.to(device))
            if real == 0:
                continue
            x_hat = out.reconstruction.float().clamp(-1, 1).cpu()
            sums += torch.tensor([float(psnr(x_hat, x).sum()), float(ssim(x_hat, x).sum()), real], dtype=torch.float64)
            stats.update(out.quant.per_scale_indices, out.quant.scales)
            if grid is None:
                grid = (x, x_hat)
    tok.train(was_training)
    dist.all_reduce(sums)
    dist.all_reduce(stats.counts)
    if sums[2] == 0:
        return {}
    if grid is not None and tracker.enabled:
        from tokenflow.train.visuals import reconstruction_grid

        tracker.image(reconstruction_grid(*grid), f"eval/reconstructions/step_{step:08d}.png")
    out = {"eval/psnr": float(sums[0] / sums[2]), "eval/ssim": float(sums[1] / sums[2]), "eval/images": float(sums[2])}
    out.update({f"eval/codebook/{k}": v for k, v in stats.summary().items()})
    return out


def _save_checkpoint(gen, disc, batches, state: dict, base_rejects: Counter, rank: int, world: int, metrics) -> None:
    """Every rank saves its engine shards and RNG state; rank 0 adds the merged data position, reject counts and
    MLflow run id; Ray Train merges the ranks' files into one checkpoint directory."""
    import ray.train
    import torch
    import torch.distributed as dist

    positions: list = [None] * world
    dist.all_gather_object(positions, batches.position)
    rejects: list = [None] * world
    dist.all_gather_object(rejects, dict(batches.rejects))
    tmp = tempfile.mkdtemp(prefix=f"tokenizer_ckpt_rank{rank}_")
    try:
        gen.save_checkpoint(os.path.join(tmp, "generator"), tag="state")
        disc.save_checkpoint(os.path.join(tmp, "discriminator"), tag="state")
        os.makedirs(os.path.join(tmp, "rng"))
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank}.pt"))
        if rank == 0:
            total = Counter(base_rejects)
            for c in rejects:
                total.update(c)
            saved = {**state, "position": positions[0].merged(positions[1:]).to_dict(), "rejects": dict(total)}
            with open(os.path.join(tmp, "state.json"), "w") as fh:
                json.dump(saved, fh)
        dist.barrier()
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{state['step']:08d}",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export(tok, cfg: TrainTokenizerConfig, rank: int, tracker, state: dict) -> None:
    """Gather the full weights (ZeRO-3 partitions included) and write the plain tokenizer directory."""
    import deepspeed
    import torch.distributed as dist

    from tokenflow import __version__

    params = list(tok.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.zero_stage == 3):
        if rank == 0:
            tok.save_pretrained(
                cfg.tokenizer_dir,
                storage_options=cfg.storage_options,
                provenance={
                    "trained_by": f"tokenflow {__version__} jobs/train_tokenizer.py",
                    "run": cfg.name,
                    "steps": state["step"],
                    "stage": cfg.train.stage,
                    "mlflow_run_id": state.get("mlflow_run_id"),
                    "init": cfg.tokenizer,
                },
            )
    dist.barrier()
    if rank == 0:
        tracker.remote_directory(cfg.tokenizer_dir, "tokenizer", cfg.storage_options)


# ---- the driver ------------------------------------------------------------------------------------------------


def run(cfg: TrainTokenizerConfig) -> dict:
    """Train (or resume) and return a summary: the tokenizer directory, steps, the Ray Train result path."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.sources import expand_inputs
    from pipelines.train_data import EpochPlan, eval_dataset, train_dataset

    if not cfg.data.input:
        raise ValueError("data.input is required: the training shards, directories or globs")
    opts = cfg.data.storage_options
    shards = expand_inputs(cfg.data.input, format=cfg.data.format, storage_options=opts)
    eval_shards = (
        expand_inputs(cfg.data.eval_input, format=cfg.data.format, storage_options=opts)
        if cfg.data.eval_input
        else shards
    )
    preprocess = tokenizer_preprocess(cfg.tokenizer, cfg.storage_options)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False  # progress goes to the log line and MLflow
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus - cfg.workers * cfg.cpus_per_worker < 1:
        log.warning(
            "the %d training workers take %.1f of the cluster's %.1f CPUs and leave none for reading and decoding "
            "images: the run waits until the cluster grows (an autoscaling cluster adds nodes); on a fixed cluster "
            "lower cpus_per_worker or workers",
            cfg.workers,
            cfg.workers * cfg.cpus_per_worker,
            cpus,
        )
    plan = ray.remote(num_cpus=0)(EpochPlan).remote([s.shard_id for s in shards], cfg.data.seed)
    datasets = {"train": train_dataset(cfg.data, shards, preprocess.size, plan)}
    has_eval = cfg.data.eval_images > 0 and (bool(cfg.data.eval_input) or cfg.data.eval_fraction > 0)
    if has_eval:
        datasets["eval"] = eval_dataset(cfg.data, eval_shards, preprocess)
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
        train_loop_config={"cfg": cfg, "plan": plan, "has_eval": has_eval},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),  # every worker reads all of "eval", takes its part
    )
    result = trainer.fit()
    return {"tokenizer": cfg.tokenizer_dir, "checkpoint": result.checkpoint.path if result.checkpoint else None}
