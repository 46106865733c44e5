"""Sample images from a trained text-to-image model: prompts through Ray Data on an actor pool (one per GPU).

    rows (index, prompt, seed) -> ImageSampler actors (model + image tokenizer + text tokenizer, loaded once)
                               -> tokens and PNG bytes -> the driver writes them as they arrive

Output (`GenerateConfig.output`):
- `images/00000.png ...` (the row index), `samples.parquet` (index, prompt, seed, tokens);
- with `geneval_layout`: GenEval's evaluator layout instead of `images/`, `<prompt index:05d>/metadata.jsonl` (the
  prompt's metadata line, as GenEval's prompt file gives it) and `<prompt index:05d>/samples/<image:04d>.png`.

Each image has its own seed (`seed + row index`) and its own random stream, so an image can be regenerated from
its (prompt, seed) alone, whatever else shared its batch (same device and batch size).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("generate")


@dataclass(kw_only=True)
class GenerateConfig:
    model: str
    """A `T2IModel` directory (`jobs/train_t2i.py` output, or `jobs/convert_checkpoint.py --kind tokenflow-t2i`)."""
    tokenizer: str
    """The image tokenizer the model was trained with (its id must match the one the model records)."""
    output: str
    prompts: list[str]
    metadata: list[dict] | None = None
    """One dict per prompt (GenEval's metadata lines); written with the geneval layout."""
    images_per_prompt: int = 1
    seed: int = 0
    cfg: float = 7.5
    loop: int = 1
    top_k: list[int] | None = None
    """Per pass (overrides the preset's); e.g. [1200, 100, 1] with loop 3."""
    top_p: list[float] | None = None
    batch_size: int = 8
    actors: int = 1
    gpus_per_actor: float = 0.0
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32."""
    geneval_layout: bool = False

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts: give --prompt or --prompts")
        if self.metadata is not None and len(self.metadata) != len(self.prompts):
            raise ValueError("metadata needs one entry per prompt")
        if min(self.images_per_prompt, self.batch_size, self.actors) < 1:
            raise ValueError("images_per_prompt, batch_size and actors must be >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")
        self.sampling_config()  # validates loop / top_k / top_p

    def sampling_config(self):
        from tokenflow.llm.sampling import SamplingConfig

        preset = SamplingConfig.preset(self.loop, self.cfg)
        return SamplingConfig(
            cfg=self.cfg,
            top_k=tuple(self.top_k) if self.top_k is not None else preset.top_k,
            top_p=tuple(self.top_p) if self.top_p is not None else preset.top_p,
        )

    def rows(self) -> list[dict]:
        """One row per image: index, prompt index, image index within the prompt, prompt, seed."""
        out = []
        for p, prompt in enumerate(self.prompts):
            for i in range(self.images_per_prompt):
                index = p * self.images_per_prompt + i
                out.append({"index": index, "prompt_index": p, "image": i, "prompt": prompt, "seed": self.seed + index})
        return out


def check_pair(model_dir: str, image_tok) -> dict:
    """The model's config.json, after checking it was trained on this image tokenizer (a converted release
    records no id: then only the scales are checked)."""
    from tokenflow.llm.t2i import read_model_config

    payload = read_model_config(model_dir)
    expected = payload.get("image_tokenizer_id")
    if expected is not None and image_tok.fingerprint() != expected:
        raise ValueError(
            f"{model_dir} was trained on image tokenizer {expected!r}, but --tokenizer is "
            f"{image_tok.fingerprint()!r}: pass the tokenizer the model was trained with"
        )
    scales = tuple(payload["config"]["scales"])
    if scales != tuple(image_tok.scales):
        raise ValueError(f"the model predicts scales {scales}, the image tokenizer has {tuple(image_tok.scales)}")
    return payload


def load_generation_model(model_dir: str, tokenizer_dir: str, device="cpu"):
    """(T2IModel, image Tokenizer, text tokenizer, layout), checked to belong together."""
    from transformers import AutoTokenizer

    from tokenflow import Tokenizer
    from tokenflow.llm.layout import T2ILayout
    from tokenflow.llm.t2i import T2IModel

    image_tok = Tokenizer.from_pretrained(tokenizer_dir, device=device)
    payload = check_pair(model_dir, image_tok)
    model = T2IModel.from_pretrained(model_dir, device=device)
    text_tok = AutoTokenizer.from_pretrained(model_dir)
    layout = T2ILayout.from_tokenizer(text_tok, image_tok.scales, payload.get("max_text_tokens", 128))
    if model.config.head == "unified":  # the released layout pads with its own [PAD] id
        layout = dataclasses.replace(layout, pad_id=model.config.pad_token_id)
    return model, image_tok, text_tok, layout


class ImageSampler:
    """A Ray Data actor: rows (prompt, seed) -> tokens and PNG bytes."""

    def __init__(self, cfg: GenerateConfig):
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        if use_bf16 and self.device.type != "cuda":
            raise ValueError("bf16 sampling needs a GPU (gpus_per_actor >= 1); use precision fp32 on CPU")
        self.amp = torch.bfloat16 if use_bf16 else None
        self.model, self.image_tok, self.text_tok, self.layout = load_generation_model(
            cfg.model, cfg.tokenizer, self.device
        )
        from tokenflow.llm.sampling import T2ISampler

        self.sampler = T2ISampler(self.model, self.image_tok.model.quantizer, self.layout)
        self.config = cfg.sampling_config()

    def __call__(self, batch: dict) -> dict:
        import contextlib

        from PIL import Image

        from tokenflow.image import to_uint8
        from tokenflow.llm.sampling import seeded_generators

        torch = self.torch
        prompts = [str(p) for p in batch["prompt"]]
        ids, valid = self.layout.encode_prompts(self.text_tok, prompts)
        generators = seeded_generators([int(s) for s in batch["seed"]], self.device)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            tokens = self.sampler.sample(ids.to(self.device), valid.to(self.device), self.config, generators)
        images = to_uint8(self.image_tok.decode(tokens).float().cpu() * 2 - 1)
        pngs = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        out = {k: np.asarray(batch[k]) for k in ("index", "prompt_index", "image", "prompt", "seed")}
        out["tokens"] = tokens.cpu().numpy().astype(np.int32)
        out["png"] = np.array(pngs, dtype=object)
        return out


class OutputWriter:
    """Writes each generated image as it arrives (plain or GenEval layout), then `samples.parquet` on close."""

    def __init__(self, cfg: GenerateConfig):
        import fsspec

        self.cfg = cfg
        self.fs, self.root = fsspec.core.url_to_fs(cfg.output)
        self.fs.makedirs(self.root, exist_ok=True)
        self.records: list[tuple] = []

    def add(self, index: int, prompt_index: int, image: int, prompt: str, seed: int, tokens, png: bytes) -> str:
        cfg, fs = self.cfg, self.fs
        if cfg.geneval_layout:
            folder = f"{self.root}/{prompt_index:05d}"
            fs.makedirs(f"{folder}/samples", exist_ok=True)
            meta = cfg.metadata[prompt_index] if cfg.metadata is not None else {"prompt": cfg.prompts[prompt_index]}
            with fs.open(f"{folder}/metadata.jsonl", "w") as fh:
                fh.write(json.dumps(meta) + "\n")
            path = f"{folder}/samples/{image:04d}.png"
        else:
            fs.makedirs(f"{self.root}/images", exist_ok=True)
            path = f"{self.root}/images/{index:05d}.png"
        with fs.open(path, "wb") as fh:
            fh.write(png)
        self.records.append((index, prompt, seed, [int(t) for t in tokens]))
        return path

    def close(self) -> int:
        records = sorted(self.records)
        table = pa.table(
            {
                "index": pa.array([r[0] for r in records], pa.int64()),
                "prompt": pa.array([r[1] for r in records], pa.string()),
                "seed": pa.array([r[2] for r in records], pa.int64()),
                "tokens": pa.array([r[3] for r in records], pa.list_(pa.int32())),
            }
        )
        with self.fs.open(f"{self.root}/samples.parquet", "wb") as fh:
            pq.write_table(table, fh)
        return len(records)


def generate(cfg: GenerateConfig) -> dict:
    """Sample every (prompt, image) row on an actor pool and write the outputs; returns a summary."""
    import ray

    from tokenflow import Tokenizer

    check_pair(cfg.model, Tokenizer.from_pretrained(cfg.tokenizer))  # fail here, not inside an actor
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(cfg.rows()).map_batches(
        ImageSampler,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=cfg.gpus_per_actor,
        batch_format="numpy",
    )
    writer = OutputWriter(cfg)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for j in range(len(batch["index"])):
            writer.add(
                int(batch["index"][j]),
                int(batch["prompt_index"][j]),
                int(batch["image"][j]),
                str(batch["prompt"][j]),
                int(batch["seed"][j]),
                batch["tokens"][j],
                batch["png"][j],
            )
    return {"images": writer.close(), "output": cfg.output}
