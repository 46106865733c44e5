"""Convert the published TokenFlow and UniTok checkpoints into this project's `save_pretrained` format.

    tok = convert_checkpoint("tokenflow", "tokenflow_clipb_32k_enhanced.pt", "tokenizers/clipb_256")
    tok = Tokenizer.from_pretrained("tokenizers/clipb_256")           # what pretokenize --tokenizer takes

| kind | official file | preset |
|---|---|---|
| tokenflow | `tokenflow_clipb_32k_enhanced.pt` (CLIP ViT-B/16 semantic encoder, enhanced decoder) | `clipb_256` |
| tokenflow | a clipb checkpoint with the normal decoder | `clipb_224` |
| tokenflow | `tokenflow_siglip_32k.pt` (TokenFlow-XL, SigLIP-SO400M-14-384) | `siglip_384` |
| unitok | UniTok's released `unitok_tokenizer.pth` (ViTamin-L) | `unitok` |

Reading is safe: `torch.load(weights_only=True)`, which unpickles tensors and plain containers only. TokenFlow's
training files also carry `args`, an `argparse.Namespace`; that one class is allowed (it holds plain values and
runs no code when unpickled). Anything else a file asks for is refused with the name of the class, never
unpickled. Files are memory-mapped when local, so a 2 GB checkpoint does not need 2 GB of extra RAM.

Every official tensor is either mapped to exactly one project tensor or on an explicit drop list (training
statistics, constants whose value is checked, UniTok's CLIP text tower); the result must then match the
preset's state dict exactly. Any leftover, missing or mis-shaped tensor fails the conversion with the full
list, so a changed layout is never loaded partially.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import torch
from torch import Tensor

from tokenflow.config import TokenizerConfig, preset
from tokenflow.tokenizer import Tokenizer, check_state_dict

Transform = Callable[[list[Tensor]], Tensor]

# --------------------------------------------------------------------------------------------------------------
# reading official files


def load_official(path: str | os.PathLike, *, storage_options: dict | None = None) -> dict[str, Any]:
    """The unpickled object of an official checkpoint (local path or fsspec URI), read with weights_only=True.

    Remote files are copied to a local temporary file first so they can be memory-mapped like local ones."""
    with local_copy(path, storage_options) as local:
        return _torch_load(local, source=os.fspath(path))


@contextlib.contextmanager
def local_copy(path: str | os.PathLike, storage_options: dict | None = None) -> Iterator[str]:
    """A local path for `path`: the file itself when local, else a temporary copy that lives for the block."""
    path = os.fspath(path)
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not fs.exists(root):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if "file" in fs.protocol:
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="tokenflow-convert-") as tmp:
        local = os.path.join(tmp, os.path.basename(root) or "checkpoint.pt")
        with fs.open(root, "rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        yield local


def _torch_load(local: str, *, source: str) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(local, map_location="cpu", weights_only=True, mmap=_is_zip(local))
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"the class {found.group(1)}" if found else "an object that is not a tensor or plain container"
        raise ValueError(
            f"{source}: refusing to load: the file asks to unpickle {what}, which weights_only loading does not "
            "allow (it could run arbitrary code). Official TokenFlow and UniTok checkpoints need only tensors, "
            "plain containers and argparse.Namespace; re-save the weights alone with torch.save(state_dict) "
            "from a trusted environment if this file is yours."
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a checkpoint dict, got {type(obj).__name__}")
    return obj


def _is_zip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"  # mmap needs the zip format of torch.save since 1.6


def official_weights(kind: str, checkpoint: dict[str, Any], *, source: str = "checkpoint") -> dict[str, Tensor]:
    """The model state dict inside an official checkpoint: TokenFlow tries `ema`, `model`, `state_dict` (the
    official loaders' order) or takes a flat tensor dict; UniTok reads `trainer.unitok`. A `module.` or
    `_orig_mod.` prefix (DDP, torch.compile) is stripped."""
    if kind == "tokenflow":
        candidates = [checkpoint.get(k) for k in ("ema", "model", "state_dict")]
        state = next((c for c in candidates if isinstance(c, dict)), None)
        if state is None and checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
            state = checkpoint
    elif kind == "unitok":
        trainer = checkpoint.get("trainer")
        state = trainer.get("unitok") if isinstance(trainer, dict) else None
        if state is None and checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
            state = checkpoint
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}; use 'tokenflow' or 'unitok'")
    if state is None:
        raise ValueError(
            f"{source}: no {kind} weights found (top-level keys: {sorted(checkpoint)[:20]}); expected "
            + ("'ema', 'model' or 'state_dict'" if kind == "tokenflow" else "'trainer' -> 'unitok'")
        )
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if not isinstance(value, Tensor):
            raise ValueError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# mapping rules: (official key pattern, project key template or None to drop, transform)
#
# A rule's template may be shared by several official keys (SigLIP's q, k and v projections become one packed
# qkv tensor): those sources are gathered in pattern order and passed to the transform together.


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts, dim=0)


def _unsqueeze(parts: list[Tensor]) -> Tensor:
    return parts[0].unsqueeze(0)


def _rows(start: int, stop: int | None) -> Transform:
    return lambda parts: parts[0][start:stop]


TOKENFLOW_COMMON = [
    (r"quantize\.codebook_used", None, None),  # usage FIFO of the training statistics, not a weight
    (r"encoder\.(.+)", r"pixel_encoder.\1", None),
    (r"decoder\.(.+)", r"pixel_decoder.\1", None),
    (r"decoder_vqkd\.patch_embed\.proj\.(weight|bias)", r"semantic_decoder.patch_embed.\1", None),
    (r"decoder_vqkd\.(.+)", r"semantic_decoder.\1", None),
    (r"quantize\.embedding_vqkd\.weight", "quantizer.quantizer.codebooks.0.weight", None),
    (r"quantize\.embedding_vqgan\.weight", "quantizer.quantizer.codebooks.1.weight", None),
    (r"(quant_conv|post_quant_conv|encode_task_layer|decode_task_layer)\.(.+)", r"\1.\2", None),
]

# OpenAI CLIP layout -> open_clip VisionTransformer: the same names (packed in_proj, no transpose).
CLIP_TOWER = [(r"encoder_vqkd\.(.+)", r"semantic_encoder.visual.\1", None)]


def _siglip_tower(width: int) -> list:
    """transformers' SiglipVisionModel -> open_clip's timm trunk (ViT-SO400M-14-SigLIP-384)."""
    o, t = r"encoder_vqkd\.vision_model\.", "semantic_encoder.visual.trunk."
    layer = o + r"encoder\.layers\.(\d+)\."
    return [
        (r"scaling_layer\.(shift|scale)", None, None),  # fixed 0.5 / 0.5 input scaling, checked, = input_norm
        (o + r"embeddings\.patch_embedding\.(weight|bias)", t + r"patch_embed.proj.\1", None),
        (o + r"embeddings\.position_embedding\.weight", t + "pos_embed", _unsqueeze),
        (layer + r"layer_norm1\.(weight|bias)", t + r"blocks.\1.norm1.\2", None),
        (layer + r"layer_norm2\.(weight|bias)", t + r"blocks.\1.norm2.\2", None),
        (layer + r"self_attn\.q_proj\.(weight|bias)", t + r"blocks.\1.attn.qkv.\2", _cat),
        (layer + r"self_attn\.k_proj\.(weight|bias)", t + r"blocks.\1.attn.qkv.\2", _cat),
        (layer + r"self_attn\.v_proj\.(weight|bias)", t + r"blocks.\1.attn.qkv.\2", _cat),
        (layer + r"self_attn\.out_proj\.(weight|bias)", t + r"blocks.\1.attn.proj.\2", None),
        (layer + r"mlp\.(fc1|fc2)\.(weight|bias)", t + r"blocks.\1.mlp.\2.\3", None),
        (o + r"post_layernorm\.(weight|bias)", t + r"norm.\1", None),
        # the pooling head: unused by TokenFlow (it reads block -2) but part of the tower, so mapped
        (o + r"head\.probe", t + "attn_pool.latent", None),
        (o + r"head\.attention\.in_proj_(weight|bias)", t + r"attn_pool.q.\1", _rows(0, width)),
        (o + r"head\.attention\.in_proj_(weight|bias)", t + r"attn_pool.kv.\1", _rows(width, None)),
        (o + r"head\.attention\.out_proj\.(weight|bias)", t + r"attn_pool.proj.\1", None),
        (o + r"head\.layernorm\.(weight|bias)", t + r"attn_pool.norm.\1", None),
        (o + r"head\.mlp\.(fc1|fc2)\.(weight|bias)", t + r"attn_pool.mlp.\1.\2", None),
    ]


UNITOK = [
    # the CLIP half of UniTok (text tower, image head, temperature) is not part of the tokenizer
    (r"(text_encoder|fc_norm|projection)\..+|logit_scale", None, None),
    (r"quantizer\.codebooks\.(\d+)\.vocab_usage", None, None),  # usage statistics
    (r"(quant_proj|post_quant_proj)\.attn\.zero_k_bias", None, None),  # a constant zero buffer, checked
    (r"encoder\.pos_embed", None, None),  # a frozen all-zero table, checked
    (r"quantizer\.codebooks\.(\d+)\.codebook\.weight", r"quantizer.quantizer.codebooks.\1.weight", None),
    (r"(encoder|decoder|quant_proj|post_quant_proj)\.(.+)", r"\1.\2", None),
]

# Dropped tensors whose value the converted model silently assumes: check them instead of trusting them.
CONSTANTS = {
    r"scaling_layer\.(shift|scale)": 0.5,
    r"(quant_proj|post_quant_proj)\.attn\.zero_k_bias": 0.0,
    r"encoder\.pos_embed": 0.0,
}


# The open_clip tags of the towers the released TokenFlow tokenizers were initialised from (their teachers).
TEACHER_TAGS = {"clipb_224": "openai", "clipb_256": "openai", "siglip_384": "webli"}


def detect_preset(kind: str, state: dict[str, Tensor]) -> str:
    """The preset an official state dict belongs to, from its keys and shapes."""
    if kind == "unitok":
        return "unitok"
    if any(k.startswith("encoder_vqkd.vision_model.") for k in state):
        return "siglip_384"
    if "encoder_vqkd.conv1.weight" in state:
        conv_out = state.get("decoder.conv_out.weight")
        enhanced = conv_out is not None and conv_out.shape[1] == 256
        return "clipb_256" if enhanced else "clipb_224"
    if any(k.startswith("encoder_vqkd.") for k in state):
        raise ValueError(
            "a TokenFlow checkpoint with a semantic encoder this project has no preset for (supported: the CLIP "
            "ViT-B/16 tokenizers and TokenFlow-XL's SigLIP; TokenFlow-L's ViTamin-XL is not one yet)"
        )
    raise ValueError(
        "not a TokenFlow checkpoint: no semantic encoder (encoder_vqkd.*) found; for UniTok use kind 'unitok'"
    )


def _rules(kind: str, preset_name: str, config: TokenizerConfig) -> list:
    if kind == "unitok":
        return UNITOK
    tower = _siglip_tower(config.semantic_encoder.width) if preset_name == "siglip_384" else CLIP_TOWER
    return tower + TOKENFLOW_COMMON


def convert_state_dict(
    kind: str, state: dict[str, Tensor], *, preset_name: str | None = None
) -> tuple[TokenizerConfig, dict[str, Tensor]]:
    """Map an official state dict onto this project's names: (preset config, project state dict).

    Fails with every unmapped official key, every dropped constant of the wrong value, and every missing,
    unexpected or mis-shaped project tensor."""
    if kind not in ("tokenflow", "unitok"):
        raise ValueError(f"unknown checkpoint kind {kind!r}; use 'tokenflow' or 'unitok'")
    name = preset_name or detect_preset(kind, state)
    config = preset(name)
    if config.kind != kind:
        raise ValueError(f"preset {name!r} is a {config.kind} tokenizer, not {kind}")
    if name in TEACHER_TAGS:  # what make_teacher() rebuilds the frozen teacher from when fine-tuning
        config.semantic_encoder.pretrained = TEACHER_TAGS[name]

    rules = [(re.compile(p), tpl, fn) for p, tpl, fn in _rules(kind, name, config)]
    gathered: dict[str, tuple[Transform | None, list[tuple[int, Tensor]]]] = {}
    unmapped, bad_constants = [], []
    for key in sorted(state):
        hits = [(i, r) for i, r in enumerate(rules) if r[0].fullmatch(key)]
        if not hits:
            unmapped.append(key)
            continue
        first = hits[0][1]
        if first[1] is None:  # dropped
            want = next((v for p, v in CONSTANTS.items() if re.fullmatch(p, key)), None)
            if want is not None and not torch.all(state[key] == want):
                bad_constants.append(f"{key} (expected all {want})")
            continue
        # one key may feed several targets: SigLIP's pooling-head in_proj splits into q and kv (same pattern twice)
        for i, (pattern, template, fn) in hits:
            if pattern.pattern == first[0].pattern:
                target = "model." + pattern.fullmatch(key).expand(template)
                gathered.setdefault(target, (fn, []))[1].append((i, state[key]))
    if unmapped or bad_constants:
        parts = []
        if unmapped:
            parts.append(f"{len(unmapped)} official tensor(s) with no mapping: {unmapped[:50]}")
        if bad_constants:
            parts.append(f"dropped constants with unexpected values: {bad_constants}")
        raise ValueError(f"cannot convert this {kind} checkpoint to {name}: " + " | ".join(parts))

    out: dict[str, Tensor] = {}
    for target, (fn, parts) in gathered.items():
        tensors = [t for _, t in sorted(parts, key=lambda p: p[0])]  # q, k, v in rule order
        if fn is None and len(tensors) != 1:
            raise ValueError(f"{len(tensors)} official tensors map onto {target}")
        value = tensors[0] if fn is None else fn(tensors)
        out[target] = value.detach().to(torch.float32).contiguous()

    with torch.device("meta"):
        expected = Tokenizer(config).state_dict()
    check_state_dict(expected, out, source=f"converted {kind} checkpoint (preset {name})")
    return config, out


def tokenizer_from_official(kind: str, state: dict[str, Tensor], *, preset_name: str | None = None) -> Tokenizer:
    """A `Tokenizer` holding an official state dict's weights (fp32, CPU, eval mode)."""
    config, converted = convert_state_dict(kind, state, preset_name=preset_name)
    with torch.device("meta"):
        tok = Tokenizer(config)
    tok.load_state_dict(converted, strict=True, assign=True)
    return tok.eval()


def convert_checkpoint(
    kind: str,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    preset_name: str | None = None,
    storage_options: dict | None = None,
) -> Tokenizer:
    """Read an official checkpoint, convert it, and write a `save_pretrained` directory to `output` (local or
    fsspec URI), recording the source file's name and sha256 in `config.json`. Returns the tokenizer."""
    source = os.fspath(source)
    with local_copy(source, storage_options) as local:  # a remote file is downloaded once for both
        checkpoint = _torch_load(local, source=source)
        digest = _sha256(local)
    tok = tokenizer_from_official(kind, official_weights(kind, checkpoint, source=source), preset_name=preset_name)
    provenance = {"converted_from": source, "sha256": digest, "kind": kind}
    tok.save_pretrained(output, storage_options=storage_options, provenance=provenance)
    return tok


def _sha256(local: str) -> str:
    h = hashlib.sha256()
    with open(local, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()
