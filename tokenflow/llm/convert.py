"""Convert the released TokenFlow text-to-image model (`TokenFlow-t2i`, ByteFlow-AI) into a `T2IModel` directory.

    model = convert_t2i_checkpoint("TokenFlow-t2i/", "models/t2i")  # or jobs/convert_checkpoint.py --kind tokenflow-t2i

The release is a Hugging Face directory: `config.json` (model_type `llava_llama`, a Llama-2-7B with vocab 64,769 =
32,000 text + [PAD] + 32,768 codes), bf16 safetensors shards with an index (or `pytorch_model*.bin`, read with
`torch.load(weights_only=True)` only), and the Llama-2 SentencePiece tokenizer files. The weights map one to one
(shared/reference/official-llm.md §2):

    model.embed_tokens.weight, model.layers.N.*, model.norm.weight, lm_head.weight  -> llm.(same name)
    model.layers.N.self_attn.qknorm.{query,key}_norm.weight                       -> qk_norm.N.{query,key}_norm.weight
    model.mm_projector.{0,2}.{weight,bias}                                          -> projector.{0,2}.{weight,bias}
    model.lvl_embed.weight                                                          -> level_embed.weight
    model.pos_1LC                                                                   -> pos_embed.weight

`image_token_start` / `image_token_end` (0-d buffers some saves carry) are checked against the layout and dropped,
as the official loader drops them. The result uses the "unified" head (the released single vocabulary). Every
key must map and every model tensor must be filled: otherwise the error lists what is missing and unexpected.
The weights keep the release's dtype (bf16: 13.5 GB for the 7B model, not 27 GB in fp32), the model takes over the
file's tensors, and the output is written one tensor at a time; `T2IModel.from_pretrained` loads it in fp32.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import fsspec
import torch
from torch import Tensor

from tokenflow import safetensors_io
from tokenflow.llm.t2i import T2IConfig, T2IModel

# The text-to-image tokenizer of the release: TokenFlow-B clipb at 256 px (infer_interpolate), 9 scales.
RELEASED_SCALES = (1, 2, 4, 6, 8, 10, 12, 14, 16)
CODE_DIM = 40
LLAMA_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "hidden_act",
    "initializer_range",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
)
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)

_RULES: list[tuple[str, str]] = [
    (r"model\.layers\.(\d+)\.self_attn\.qknorm\.(query_norm|key_norm)\.weight", r"qk_norm.\1.\2.weight"),
    (r"model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)", r"llm.model.\1"),
    (r"lm_head\.weight", r"llm.lm_head.weight"),
    (r"model\.mm_projector\.([02])\.(weight|bias)", r"projector.\1.\2"),
    (r"model\.lvl_embed\.weight", r"level_embed.weight"),
    (r"model\.pos_1LC", r"pos_embed.weight"),
]
_BUFFERS = ("image_token_start", "image_token_end", "model.image_token_start", "model.image_token_end")


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def read_released(path: str, storage_options: dict | None = None) -> tuple[dict, dict[str, Tensor]]:
    """(config.json, every tensor) of a released directory: safetensors (sharded or not), else .bin files loaded
    with weights_only=True (a file that needs anything else unpickled is refused, naming why)."""
    opts = storage_options or {}
    fs, root = fsspec.core.url_to_fs(path, **opts)
    with fs.open(_join(root, "config.json"), "r") as fh:
        config = json.load(fh)
    names = sorted(os.path.basename(p) for p in fs.ls(root, detail=False))
    shards = [n for n in names if n.endswith(".safetensors")]
    state: dict[str, Tensor] = {}
    if shards:
        for name in shards:
            with fs.open(_join(root, name), "rb") as fh:
                state.update(safetensors_io.read(fh))
        return config, state
    bins = [n for n in names if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", n)]
    if not bins:
        raise FileNotFoundError(f"{path} holds no *.safetensors or pytorch_model*.bin weights")
    for name in bins:
        with fs.open(_join(root, name), "rb") as fh:
            try:
                part = torch.load(fh, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - the unpickler's refusal, reported with its reason
                raise ValueError(
                    f"{name} cannot be read with torch.load(weights_only=True) ({e}); refusing to unpickle "
                    "arbitrary objects: re-save the weights as safetensors"
                ) from e
        state.update(part)
    return config, state


def scales_of(state: dict[str, Tensor]) -> tuple[int, ...]:
    """The tokenizer scales the release was trained with, from its position table (817 rows: clipb_256)."""
    rows = state["model.pos_1LC"].shape[0] if "model.pos_1LC" in state else None
    if rows == sum(s * s for s in RELEASED_SCALES):
        return RELEASED_SCALES
    raise ValueError(f"cannot tell the tokenizer scales from a position table of {rows} rows: pass scales")


def t2i_config(config: dict, state: dict[str, Tensor], scales: tuple[int, ...] | None = None) -> T2IConfig:
    """The `T2IConfig` of a released config.json (unified head; text vocabulary = vocab - [PAD] - codebook)."""
    if config.get("model_type") not in ("llava_llama", "llama"):
        raise ValueError(f"expected a llava_llama (TokenFlow-t2i) config, got model_type {config.get('model_type')!r}")
    codebook = int(config.get("vq_codebook_size") or 32768)
    vocab = int(state["lm_head.weight"].shape[0]) if "lm_head.weight" in state else int(config["vocab_size"])
    llm = {k: config[k] for k in LLAMA_FIELDS if k in config}
    llm.update(model_type="llama", vocab_size=vocab)
    theta = llm.pop("rope_theta", 10000.0)  # transformers 5 reads RoPE from rope_parameters only
    if llm.pop("rope_scaling", None):
        raise ValueError("a RoPE-scaled checkpoint is not the released TokenFlow-t2i (Llama-2, plain RoPE)")
    llm["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
    return T2IConfig(
        llm=llm,
        scales=scales or scales_of(state),
        codebook_size=codebook,
        code_dim=int(config.get("mm_hidden_size") or CODE_DIM),
        head="unified",
        text_vocab_size=vocab - 1 - codebook,
    )


def map_keys(state: dict[str, Tensor], config: T2IConfig) -> dict[str, Tensor]:
    """Official names -> this project's; every official key must match a rule (or be a checked id buffer)."""
    rules: list[tuple[re.Pattern, str]] = [(re.compile(p), t) for p, t in _RULES]
    out, unmapped, bad = {}, [], []
    start = config.image_token_start
    expect = {"image_token_start": start, "image_token_end": start + config.codebook_size - 1}
    for key in sorted(state):
        if key in _BUFFERS:
            want = expect[key.removeprefix("model.")]
            if int(state[key]) != want:
                bad.append(f"{key} = {int(state[key])}, expected {want}")
            continue
        target = next((m.expand(t) for p, t in rules if (m := p.fullmatch(key))), None)
        if target is None:
            unmapped.append(key)
        else:
            out[target] = state[key].detach().contiguous()
    if unmapped or bad:
        parts = [f"{len(unmapped)} tensor(s) with no mapping: {unmapped[:50]}"] if unmapped else []
        parts += [f"id buffers disagree with the layout: {bad}"] if bad else []
        raise ValueError("cannot convert this TokenFlow-t2i checkpoint: " + " | ".join(parts))
    return out


def t2i_from_official(
    config: dict, state: dict[str, Tensor], scales: tuple[int, ...] | None = None, *, source: str = "checkpoint"
) -> T2IModel:
    """A `T2IModel` (CPU, eval) holding a released state dict's tensors in their own dtype (`from_pretrained` of
    the written directory loads fp32); strict: missing/unexpected keys fail."""
    from tokenflow.codes import check_state_dict
    from tokenflow.llm.checkpoint import restore_buffers

    cfg = t2i_config(config, state, scales)
    mapped = map_keys(state, cfg)
    with torch.device("meta"):
        model = T2IModel(cfg)
    check_state_dict(model.state_dict(), mapped, source=source)
    model.load_state_dict(mapped, strict=True, assign=True)  # the release's tensors, not copies
    model._rebuild_buffers("cpu")
    return restore_buffers(model)


def convert_t2i_checkpoint(
    source: str,
    output: str,
    *,
    scales: tuple[int, ...] | None = None,
    storage_options: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> T2IModel:
    """Read a released directory, convert it, and write a `T2IModel.save_pretrained` directory plus the text
    tokenizer's files (copied as they are)."""
    opts = storage_options or {}
    config, state = read_released(source, opts)
    model = t2i_from_official(config, state, scales, source=source)
    model.save_pretrained(output, extra={"provenance": {"converted_from": source, "kind": "tokenflow-t2i"}})
    fs_in, root_in = fsspec.core.url_to_fs(source, **opts)
    fs_out, root_out = fsspec.core.url_to_fs(output, **opts)
    for name in TOKENIZER_FILES:
        if fs_in.exists(_join(root_in, name)):
            with fs_in.open(_join(root_in, name), "rb") as src, fs_out.open(_join(root_out, name), "wb") as dst:
                dst.write(src.read())
            if log:
                log(f"copied {name}")
    return model
