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
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipelines.ray_train import (
    RayTrainConfig,
    all_have,
    counter_metrics,
    flat_params,
    gather_counts,
    git_commit,
    latest_checkpoint,
    make_trainer,
    report_checkpoint,
    restore_rng,
    start_plan,
    warm_up,
    worker_device,
)
from pipelines.train_data import TrainDataConfig
from tokenflow.train.config import TrainConfig

log = logging.getLogger("train_tokenizer")


@dataclass(kw_only=True)
class TrainTokenizerConfig(RayTrainConfig):
    """Everything `jobs/train_tokenizer.py` does; YAML keys and `--set key=value` overrides use these names (the
    run's workers, storage, checkpoints and tracking: `RayTrainConfig`)."""

    tokenizer: str = "preset:tiny"
    """The model to train: preset:NAME (random init; the semantic encoder loads the pretrained weights its
    preset names) or a saved tokenizer directory (path or URI) to start from, e.g. for the decoder stages."""
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "tokenizer"
    image_every: int = 1000
    """Steps between a reconstruction grid and a codebook usage histogram (a multiple of log_every)."""
    eval_every: int = 1000
    """Steps between evaluations on the held-out images (0: only at the end)."""
    mlflow_experiment: str = "tokenizer"
    dataset_name: str | None = None
    """The `dataset` tag of the MLflow run (default: the inputs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_every < 1 or self.eval_every < 0:
            raise ValueError("image_every must be >= 1, eval_every >= 0")
        if self.image_every % self.log_every:
            raise ValueError(f"image_every ({self.image_every}) must be a multiple of log_every ({self.log_every})")

    @property
    def tokenizer_dir(self) -> str:
        """Where the trained tokenizer is written (`jobs/pretokenize.py --tokenizer` takes it)."""
        return f"{self.run_dir}/tokenizer"


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
    device, amp = worker_device(cfg)  # before DeepSpeed's import: it picks its accelerator then
    import ray.train
    import torch

    from pipelines.train_data import DataPosition, MicroBatches
    from pipelines.train_tracking import RunTracker
    from tokenflow.losses import TokenizerLoss
    from tokenflow.train import TrainStep, prepare_stage
    from tokenflow.train.deepspeed import build_engines

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    # ---- restore, the data stream, the model --------------------------------------------------------------------
    fresh = {"step": 0, "epoch": 0, "position": None, "mlflow_run_id": None, "rejects": {}, "restarts": 0}
    with latest_checkpoint(world) as (checkpoint_dir, saved):
        state = saved or fresh
        if saved is not None:
            state["restarts"] = state.get("restarts", 0) + 1
        batches = MicroBatches(ray.train.get_dataset_shard("train"), cfg.micro_batch, config["image_size"])
        epoch, position = state["epoch"], state["position"]

        def open_stream() -> None:
            batches.start_epoch(epoch)
            if rank == 0 and position is not None and position.get("epoch") == epoch:
                batches.position = DataPosition.from_dict(position)  # keys consumed before the restart stay so
            batches.fill(cfg.micro_batch * cfg.train.grad_accum)

        data_ready = warm_up(config["plan"], epoch, open_stream, position)

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
            tok, loss_fn, cfg.train, zero_stage=cfg.zero_stage, micro_batch=cfg.micro_batch, world_size=world,
            bf16=False,
        )  # fmt: skip
        step_fn = TrainStep(tok, loss_fn, gen, disc, teacher=teacher, stage=cfg.train.stage, amp_dtype=amp)
        if checkpoint_dir is not None:
            gen.load_checkpoint(os.path.join(checkpoint_dir, "generator"), tag="state")
            disc.load_checkpoint(os.path.join(checkpoint_dir, "discriminator"), tag="state")
            restore_rng(checkpoint_dir, rank)
            log.info("rank %d resumed at step %d (epoch %d)", rank, state["step"], state["epoch"])
        else:
            # The same seed on every rank, and the ranks draw the same random numbers in the same order: the random
            # scale drop must agree across ranks, because ZeRO-3 gathers parameters collectively per module call
            # (a quantizer running a different number of scales on one rank deadlocks the all-gathers).
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
    data_ready()

    tracker = RunTracker.disabled()
    if rank == 0:
        tracker = RunTracker.start(
            cfg.mlflow_uri,
            experiment=cfg.mlflow_experiment,
            run_id=state["mlflow_run_id"],
            run_name=cfg.name,
            params=flat_params(cfg),
            tags={
                "git_commit": git_commit(),
                "dataset": cfg.dataset_name or ",".join(cfg.data.input),
                "tokenizer": cfg.tokenizer,
                "stage": cfg.train.stage,
                "zero_stage": str(cfg.zero_stage),
            },
        )
        state["mlflow_run_id"] = tracker.run_id

    # ---- data -----------------------------------------------------------------------------------------------
    size = tok.preprocessor.size
    if size != config["image_size"]:
        raise RuntimeError(
            f"the tokenizer reads {size} px images but the data stream was made for {config['image_size']}"
        )
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

    def start_epoch(epoch: int) -> None:
        start_plan(plan, epoch)
        batches.start_epoch(epoch)

    step, epoch = state["step"], state["epoch"]  # the stream of this epoch is open (`warm_up`)
    need = cfg.micro_batch * cfg.train.grad_accum
    window = _Window(tok.scales, tok.codebook_size, tok.num_codebooks)
    last_x = None
    while step < cfg.train.max_steps:
        if not all_have(batches, need):
            epoch += 1
            start_epoch(epoch)
            if not all_have(batches, need):
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
            logged.update(counter_metrics(base_rejects, batches.rejects, "data/rejected"))
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
    """Every rank saves its engine shards (and RNG state); rank 0 adds the merged data position, reject counts and
    MLflow run id; Ray Train merges the ranks' files into one checkpoint directory."""
    import torch.distributed as dist

    positions: list = [None] * world
    dist.all_gather_object(positions, batches.position)
    rejects = base_rejects + gather_counts(batches.rejects)
    with report_checkpoint(rank, state["step"], metrics) as tmp:
        gen.save_checkpoint(os.path.join(tmp, "generator"), tag="state")
        disc.save_checkpoint(os.path.join(tmp, "discriminator"), tag="state")
        if rank == 0:
            saved = {**state, "position": positions[0].merged(positions[1:]).to_dict(), "rejects": dict(rejects)}
            with open(os.path.join(tmp, "state.json"), "w") as fh:
                json.dump(saved, fh)


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
    from ray.train import DataConfig

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
    trainer, cfg = make_trainer(
        cfg,
        train_loop,
        {"plan": plan, "has_eval": has_eval, "image_size": preprocess.size},
        datasets,
        DataConfig(datasets_to_split=["train"]),  # every worker reads all of "eval", takes its part
    )
    result = trainer.fit()
    return {"tokenizer": cfg.tokenizer_dir, "checkpoint": result.checkpoint.path if result.checkpoint else None}
