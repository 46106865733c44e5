"""Convert the released TokenFlow understanding model (`Tokenflow-llava-qwen2.5-14B-finetuning`, ByteFlow-AI) into
an `I2TModel` directory.

    model = convert_i2t_checkpoint("Tokenflow-llava-qwen2.5-14B-finetuning/", "models/i2t")
    # or: jobs/convert_checkpoint.py --kind tokenflow-llava --input DIR --output DIR

The release is a LLaVA (`i2t/llava`) Hugging Face directory: `config.json` (model_type `llava_qwen`: a
Qwen2.5-14B-Instruct with the LLaVA fields `mm_projector_type` mlp2x_gelu, `mm_hidden_size` 40,
`mm_vision_vq_type` TOKENFLOW, `mm_vision_tower` ""), bf16 safetensors shards with an index (or
`pytorch_model*.bin`, read with `torch.load(weights_only=True)` only) and the Qwen2 tokenizer files. The weights
map one to one (shared/reference/official-llm.md §3):

    model.embed_tokens.weight, model.layers.N.*, model.norm.weight  -> llm.model.(same name)
    lm_head.weight                                                   -> llm.lm_head.weight (absent when tied)
    model.mm_projector.{0,2}.{weight,bias}                           -> projector.{0,2}.{weight,bias}
    model.vision_tower.*                                             -> dropped: the image tokenizer's weights

(the release was not seen to hold `model.vision_tower.*` tensors; a LLaVA save can, and they are the image
tokenizer's, converted on their own with `--kind tokenflow`). Every other key must map and every model tensor must
be filled: otherwise the error lists the missing and unexpected keys, by their official names.

Image features: the released model reads TokenFlow-XL's continuous features, `encode(image)[0]` (the sum of all
scales' 40-d codes upsampled to the final 27 x 27 grid): 729 rows per image (`image_tokens`), spliced at the
`<image>` position of the `qwen_2_5` (ChatML) prompt. Pair it with the image tokenizer converted from the released
`tokenflow_siglip_32k.pt` (`jobs/convert_checkpoint.py --kind tokenflow`, preset siglip_384), whose
`Tokenizer.features` gives exactly those rows, and preprocess images as the release did (`image_aspect_ratio`
pad: pad to a square with grey, then 384 px). Proven against the official code on a tiny seeded model in the
released layout: tests/unit/test_convert_i2t.py with tests/fixtures/i2t_official/.

What is not carried over, on purpose: `rope_scaling` (the official `LlavaQwenForCausalLM.__init__` sets it to None,
so the released model runs plain RoPE whatever config.json says).

Memory: the weights keep the release's dtype (bf16: 30 GB for 14 B, not 59 GB in fp32), the model takes over the
file's tensors instead of copying them, and the output is written one tensor at a time, so converting the release
needs about one model's worth of memory. `I2TModel.from_pretrained` loads the directory in fp32.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import fsspec
import torch
from torch import Tensor

from tokenflow.llm.checkpoint import restore_buffers
from tokenflow.llm.convert import _join, read_released
from tokenflow.llm.i2t import I2TConfig, I2TModel

CODE_DIM = 40  # TokenFlow's code features (32-d semantic + 8-d pixel halves)
RELEASED_IMAGE_TOKENS = 27 * 27  # TokenFlow-XL (siglip_384): the final grid
QWEN2_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_theta",
    "hidden_act",
    "initializer_range",
    "attention_dropout",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
INDEX_NAME = "model.safetensors.index.json"

_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"model\.mm_projector\.([02])\.(weight|bias)"), r"projector.\1.\2"),
    (re.compile(r"model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)"), r"llm.model.\1"),
    (re.compile(r"lm_head\.weight"), r"llm.lm_head.weight"),
]
_DROPPED = re.compile(r"model\.vision_tower\..+")


def official_name(key: str) -> str:
    """This project's key -> the released checkpoint's (the inverse of the rules above)."""
    if key.startswith("projector."):
        return "model.mm_" + key
    return key.removeprefix("llm.")


def check_layout(config: dict, template: str) -> None:
    """The LLaVA fields must describe TokenFlow features through an mlp2x_gelu projector, spliced flat."""
    from tokenflow.llm.templates import get_template

    if config.get("model_type") != "llava_qwen":
        raise ValueError(
            f"expected a llava_qwen (TokenFlow llava, Qwen2) config, got model_type {config.get('model_type')!r}"
        )
    problems = []
    if config.get("mm_projector_type") != "mlp2x_gelu":
        problems.append(f"mm_projector_type {config.get('mm_projector_type')!r} (expected 'mlp2x_gelu')")
    if config.get("mm_hidden_size") != CODE_DIM:
        problems.append(f"mm_hidden_size {config.get('mm_hidden_size')!r} (expected {CODE_DIM}: TokenFlow's code dim)")
    if config.get("mm_vision_vq_type", "TOKENFLOW") != "TOKENFLOW":
        problems.append(f"mm_vision_vq_type {config.get('mm_vision_vq_type')!r} (expected 'TOKENFLOW')")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        problems.append(f"mm_patch_merge_type {config.get('mm_patch_merge_type')!r} (expected 'flat')")
    if config.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end true (the release adds no image start/end tokens)")
    if problems:
        raise ValueError("not the released TokenFlow llava layout: " + "; ".join(problems))
    get_template(template)  # an unknown name fails here, before any weight is read


def i2t_config(config: dict, state: dict[str, Tensor], *, image_tokens: int, template: str) -> I2TConfig:
    """The `I2TConfig` of a released config.json (`check_layout` first): its Qwen2 fields as the decoder's config
    (model_type qwen2), the vocabulary size from the embedding when the weights are given."""
    check_layout(config, template)
    embed = state.get("model.embed_tokens.weight")
    vocab = int(embed.shape[0]) if embed is not None else int(config["vocab_size"])
    llm = {k: config[k] for k in QWEN2_FIELDS if k in config}
    theta = llm.pop("rope_theta", 10000.0)  # transformers 5 reads RoPE from rope_parameters only
    llm["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
    llm.update(model_type="qwen2", vocab_size=vocab)
    return I2TConfig(llm=llm, image_tokens=image_tokens, code_dim=CODE_DIM, template=template)


def map_keys(state: dict[str, Tensor], expected: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], int]:
    """(official names -> this project's, in the file's dtype; the number of dropped image-tokenizer tensors).
    `state` is emptied as it goes (a 14 B release is not held twice). Fails listing missing, unexpected and
    misshapen keys."""
    unexpected, dropped, out = [], 0, {}
    for key in sorted(state):
        if _DROPPED.fullmatch(key):
            dropped += 1
            del state[key]
            continue
        target = next((m.expand(t) for p, t in _RULES if (m := p.fullmatch(key))), None)
        if target is None or target not in expected:
            unexpected.append(key)
            continue
        out[target] = state.pop(key).detach().contiguous()
    missing = sorted(official_name(k) for k in expected if k not in out)
    wrong = [
        f"{official_name(k)}: file {tuple(v.shape)} vs config {tuple(expected[k].shape)}"
        for k, v in out.items()
        if v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [f"missing: {missing}"] if missing else []
        parts += [f"unexpected: {unexpected}"] if unexpected else []
        parts += ["shape mismatch: " + "; ".join(wrong)] if wrong else []
        raise ValueError(f"cannot convert the TokenFlow llava checkpoint {source}: " + " | ".join(parts))
    return out, dropped


def _check_weights(state: dict, source: str, fs, root: str) -> None:
    """Every value a tensor; with an index, its tensors exactly the shards' (a shard missing or left over fails)."""
    odd = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if odd:
        raise ValueError(f"{source}: the weights hold non-tensor values under {odd[:20]}")
    if fs.exists(_join(root, INDEX_NAME)):
        with fs.open(_join(root, INDEX_NAME), "r") as fh:
            listed = set(json.load(fh)["weight_map"])
        absent, extra = sorted(listed - set(state)), sorted(set(state) - listed)
        if absent or extra:
            parts = [f"listed in {INDEX_NAME} but in no shard: {absent[:50]}"] if absent else []
            parts += [f"in a shard but not in {INDEX_NAME}: {extra[:50]}"] if extra else []
            raise ValueError(f"{source}: the shards do not match their index: " + " | ".join(parts))


def i2t_from_official(
    config: dict,
    state: dict[str, Tensor],
    *,
    image_tokens: int = RELEASED_IMAGE_TOKENS,
    template: str = "qwen_2_5",
    source: str = "checkpoint",
) -> tuple[I2TModel, int]:
    """(`I2TModel` on the CPU in eval mode, holding the released tensors in their own dtype; dropped image-tokenizer
    tensors). `state` is consumed. Strict: missing, unexpected or misshapen keys fail, named."""
    cfg = i2t_config(config, state, image_tokens=image_tokens, template=template)
    with torch.device("meta"):  # no random init: every weight comes from the release
        model = I2TModel(cfg)
    projector_in = state.get("model.mm_projector.0.weight")
    if projector_in is not None and projector_in.ndim == 2 and projector_in.shape[1] != CODE_DIM:
        raise ValueError(f"the projector reads {projector_in.shape[1]}-d features, not TokenFlow's {CODE_DIM}")
    tied = bool(getattr(model.llm.config, "tie_word_embeddings", False))
    expected = model.state_dict()
    if tied:  # a tied head is the embedding; a copy in the file is dropped, as the official loader ties it too
        expected.pop("llm.lm_head.weight")
        state.pop("lm_head.weight", None)
    mapped, dropped = map_keys(state, expected, source)
    model.load_state_dict(mapped, strict=False, assign=True)  # the release's tensors, not copies
    restore_buffers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{source}: no value for {left}")
    return model, dropped


def convert_i2t_checkpoint(
    source: str,
    output: str,
    *,
    image_tokens: int = RELEASED_IMAGE_TOKENS,
    template: str = "qwen_2_5",
    image_tokenizer_id: str | None = None,
    storage_options: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> I2TModel:
    """Read a released directory (local or fsspec URI), convert it, and write an `I2TModel.save_pretrained`
    directory plus the text tokenizer's files (copied as they are). `image_tokenizer_id`: the fingerprint of the
    converted TokenFlow-XL tokenizer to record (None: the pairing is left unchecked by the jobs)."""
    opts = storage_options or {}
    fs_in, root_in = fsspec.core.url_to_fs(source, **opts)
    with fs_in.open(_join(root_in, "config.json"), "r") as fh:
        check_layout(json.load(fh), template)  # before reading (for the release: 30 GB of) weights
    config, state = read_released(source, opts)
    _check_weights(state, source, fs_in, root_in)
    model, dropped = i2t_from_official(config, state, image_tokens=image_tokens, template=template, source=source)
    if dropped and log:
        log(f"dropped {dropped} model.vision_tower.* tensors (the image tokenizer's: convert it with --kind tokenflow)")
    provenance = {
        "converted_from": source,
        "kind": "tokenflow-llava",
        "image_aspect_ratio": config.get("image_aspect_ratio"),
        "dropped_vision_tower_tensors": dropped,
    }
    extra = {
        "image_tokenizer_id": image_tokenizer_id,
        "max_length": config.get("tokenizer_model_max_length"),
        "provenance": provenance,
    }
    model.save_pretrained(output, extra=extra, storage_options=opts)
    fs_out, root_out = fsspec.core.url_to_fs(output, **opts)
    for name in TOKENIZER_FILES:
        if fs_in.exists(_join(root_in, name)):
            with fs_in.open(_join(root_in, name), "rb") as src, fs_out.open(_join(root_out, name), "wb") as dst:
                dst.write(src.read())
            if log:
                log(f"copied {name}")
    return model
