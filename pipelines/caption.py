"""Caption (or ask one question about) a whole corpus with an understanding model: Ray Data on an actor pool.

    images (a glob of files) or token shards (the pretokenize job's output)
        -> Captioner actors (model + image tokenizer + text tokenizer, loaded once; one per GPU)
        -> Parquet rows: key, source, prompt, answer, reason, detail

Recaptioning is how the TokenFlow paper made its generation data. Token shards need no image decoding: their
`tokens` are the features' source (`Assistant.answer_tokens`); their file metadata must name the image tokenizer
the model was trained with. Every input gives exactly one row: an image that does not decode, a shard row without
tokens (a text-only conversation) or tokens of another tokenizer's length carry a `reason` and no answer.
The driver writes the rows as they arrive to `OUTPUT/answers.parquet` (answers are small: the model is the cost).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

log = logging.getLogger("caption")

OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),  # null when the row has a reason
        ("reason", pa.string()),  # unreadable, decode_error, no_image, tokens_length
        ("detail", pa.string()),
    ]
)


@dataclass(kw_only=True)
class CaptionConfig:
    model: str
    """An understanding model directory (`jobs/train_i2t.py` output, or a converted release)."""
    tokenizer: str
    """The image tokenizer the model was trained with."""
    prompt: str = "Describe the image."
    output: str = ""
    images: str | None = None
    """A glob of image files (local or URI): keys are the paths relative to the glob's fixed prefix."""
    shards: list[str] | None = None
    """Token shards: a pretokenize output directory (its shards/), Parquet files or globs."""
    batch_size: int = 8
    actors: int = 1
    gpus_per_actor: float = 0.0
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    storage_options: dict | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.shards is None):
            raise ValueError("give images (a glob) or shards (token shards), not both")
        if not self.output:
            raise ValueError("output is required: the directory the answers are written to")
        if min(self.batch_size, self.actors, self.max_new_tokens) < 1:
            raise ValueError("batch_size, actors and max_new_tokens must be >= 1")


class Captioner:
    """A Ray Data actor: rows (key, source, and image bytes or tokens) -> answers."""

    def __init__(self, cfg: CaptionConfig):
        import torch

        from tokenflow.llm.chat import Assistant

        device = "cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.assistant = Assistant.load(cfg.model, cfg.tokenizer, device=device, storage_options=cfg.storage_options)
        self.tokens_per_image = self.assistant.image_tokenizer.tokens_per_image

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = table.to_pydict()  # None stays None (numpy batches turn a column of None into NaN)
        n = len(batch["key"])
        answers: list = [None] * n
        reasons: list = [None] * n
        details: list = [None] * n
        inputs: list = [None] * n
        if "image" in batch:
            preprocessor = self.assistant.image_tokenizer.preprocessor
            for i, (data, error) in enumerate(zip(batch["image"], batch["error"], strict=True)):
                if error is not None:
                    reasons[i], details[i] = "unreadable", error
                    continue
                try:  # the tokenizer's own decode path, once: a broken file is a reason, not a crash
                    inputs[i] = preprocessor.load(data)[0]
                except Exception as e:  # noqa: BLE001 - any decode failure is recorded
                    reasons[i], details[i] = "decode_error", f"{type(e).__name__}: {e}"
        else:
            for i, tokens in enumerate(batch["tokens"]):
                if tokens is None:
                    reasons[i], details[i] = "no_image", "a text-only sample: no tokens to describe"
                elif len(tokens) != self.tokens_per_image:
                    reasons[i] = "tokens_length"
                    details[i] = f"{len(tokens)} tokens, the image tokenizer makes {self.tokens_per_image}"
                else:
                    inputs[i] = np.array(tokens, dtype=np.int64)  # a writable copy
        todo = [i for i in range(n) if inputs[i] is not None]
        if todo:
            questions = [self.cfg.prompt] * len(todo)
            kwargs = dict(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                          top_p=self.cfg.top_p, seed=self.cfg.seed)  # fmt: skip
            if "image" in batch:  # Assistant.answer's encoding, from the images decoded above
                from tokenflow.image import to_tensor

                tok = self.assistant.image_tokenizer
                tokens = list(tok.encode(to_tensor([inputs[i] for i in todo]).to(tok.device)))
            else:
                tokens = [inputs[i] for i in todo]
            out = self.assistant.answer_tokens(tokens, questions, **kwargs)
            for i, a in zip(todo, out, strict=True):
                answers[i] = a
        columns = {
            "key": [str(k) for k in batch["key"]],
            "source": [str(x) for x in batch["source"]],
            "prompt": [self.cfg.prompt] * n,
            "answer": answers,
            "reason": reasons,
            "detail": details,
        }
        return pa.table({name: pa.array(columns[name], OUTPUT_SCHEMA.field(name).type) for name in OUTPUT_SCHEMA.names})


def image_rows(pattern: str, storage_options: dict | None = None) -> list[dict]:
    """(key, source) of every file the glob matches; the key is the path relative to the glob's fixed prefix."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(pattern, **(storage_options or {}))
    files = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
    if not files:
        raise FileNotFoundError(f"no file matches {pattern}")
    fixed = path.split("*")[0].split("?")[0].split("[")[0]
    root = fixed if fixed.endswith("/") else os.path.dirname(fixed) + "/"
    protocol = pattern.split("://")[0] + "://" if "://" in pattern else ""
    return [{"key": f[len(root) :] if f.startswith(root) else f, "source": protocol + f} for f in files]


def _read_image(row: dict, storage_options: dict | None) -> dict:
    import fsspec

    try:
        with fsspec.open(row["source"], "rb", **(storage_options or {})) as fh:
            return {**row, "image": fh.read(), "error": None}
    except OSError as e:
        return {**row, "image": None, "error": f"{type(e).__name__}: {e}"}


def _read_token_shard(row: dict, storage_options: dict | None) -> list[dict]:
    """The key and tokens of every row of one token shard (a task per shard: bounded by the shard's size)."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(row["path"], "rb", **(storage_options or {})) as fh:
        table = pq.read_table(fh, columns=["key", "tokens"])
    return [
        {"key": k, "source": row["path"], "tokens": t}
        for k, t in zip(*(table.column(c).to_pylist() for c in ("key", "tokens")))
    ]


def run(cfg: CaptionConfig) -> dict:
    """Answer the prompt for every input and write the rows under `cfg.output`; returns a summary."""
    import pyarrow.parquet as pq
    import ray

    from pipelines.t2i_data import check_tokenizer_id, token_shards
    from tokenflow.llm.checkpoint import read_model_config

    payload = read_model_config(
        cfg.model, storage_options=cfg.storage_options, kind="i2t"
    )  # fail here, not in an actor
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    opts = cfg.storage_options
    if cfg.images is not None:
        ds = ray.data.from_items(image_rows(cfg.images, opts)).map(_read_image, fn_kwargs={"storage_options": opts})
    else:
        shards = token_shards(cfg.shards, opts)
        if payload.get("image_tokenizer_id") is not None:
            for shard in shards:
                check_tokenizer_id(shard, payload["image_tokenizer_id"], opts)
        paths = [{"path": shard.path} for shard in shards]
        ds = ray.data.from_items(paths).flat_map(_read_token_shard, fn_kwargs={"storage_options": opts})
    answered = ds.map_batches(
        Captioner,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=cfg.gpus_per_actor,
        batch_format="pyarrow",
    )
    import fsspec

    fs, root = fsspec.core.url_to_fs(cfg.output, **(opts or {}))
    fs.makedirs(root, exist_ok=True)
    rows, answered_n, reasons = 0, 0, {}
    with fs.open(f"{root.rstrip('/')}/answers.parquet", "wb") as fh:
        with pq.ParquetWriter(fh, OUTPUT_SCHEMA) as writer:
            for table in answered.iter_batches(batch_size=None, batch_format="pyarrow"):
                table = table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
                writer.write_table(table)
                rows += table.num_rows
                for r in table.column("reason").to_pylist():
                    if r is None:
                        answered_n += 1
                    else:
                        reasons[r] = reasons.get(r, 0) + 1
    log.info("%d inputs: %d answered, rejected %s", rows, answered_n, reasons or "none")
    return {
        "rows": rows,
        "answered": answered_n,
        "reasons": reasons,
        "output": f"{cfg.output.rstrip('/')}/answers.parquet",
    }
