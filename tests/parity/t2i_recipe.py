"""Tiny official-shaped TokenFlow text-to-image LLM: ids, prompts and a seeded state dict for parity fixtures.

The official model is ByteFlow-AI/TokenFlow @9812da0, `t2i/llava_t2i` (`LlavaLlamaForCausalLM`: a Llama with
post-attention RMSNorms, per-head QK-norm, an `mlp2x_gelu` projector of the 40-d cascaded TokenFlow code
features, a scale embedding `lvl_embed` and an absolute position table `pos_1LC` over the 817 image positions).
This module is the stand-in for the released weights (which cannot be downloaded here), shrunk to a 2-layer,
128-wide Llama over a 512-id text vocabulary. It imports only torch and runs in both this project's venv and the
official one; `bench/official/t2i.py` builds the official model from it and `bench/t2i_parity.py` made
`tests/fixtures/t2i_official/tiny.npz` with `official_t2i_state_dict(seed=0)`.

Vocabulary (the official train.py order: text, then [PAD], then the 32,768 `<vq_token_k>`):

    0 unk, 1 BOS, 2 EOS, 3..511 text pieces | 512 [PAD] | 513 + k = image code k (k < 32,768)  -> 33,281 ids

No text tokenizer is involved: captions are given as ids. `IMAGE_OPEN` / `IMAGE_CLOSE` stand for
`tokenizer.encode("<img>")` / `tokenizer.encode("</img>")` (three SentencePiece pieces each with Llama-2's
tokenizer, e.g. `▁<`, `img`, `>` and `</`, `img`, `>`; the last two pieces are shared, so they are here too).

`prefix_ids(caption)` reproduces the official `crop_and_encode_text_and_img(tokenizer, caption, image=None,
max_text_token_num=128)` (`t2i/llava_t2i/dataset/process.py`): BOS + caption, cut to its first 128 ids if longer
(no EOS), else left-padded with [PAD] to 128 ids, then `<img>`: always 131 ids. The training sequence
(`image=` the 817 vq tokens) continues with the 817 image ids, `</img>` and EOS (`training_ids`).

Weights (`official_t2i_state_dict(seed)`): one `torch.Generator().manual_seed(seed)`, keys in sorted order, one
`torch.randn(shape, generator=gen)` draw per key, scaled by its role:

- RMSNorm gains (`input_layernorm`, `post_attention_layernorm`, `model.norm`) and the QK-norm gains
  (`qknorm.query_norm`, `qknorm.key_norm`): 1 + 0.1 N(0,1) (not ones, so a test can tell every norm apart);
- `model.embed_tokens.weight`: 0.5 N(0,1);
- `model.lvl_embed.weight`, `model.pos_1LC`: 0.2 N(0,1);
- `lm_head.weight`: N(0,1) / sqrt(H);
- the projector biases `model.mm_projector.{0,2}.bias`: 0.02 N(0,1);
- every other weight (q/k/v/o, gate/up/down, projector) N(0,1) / sqrt(fan_in), fan_in = shape[1].

Where each key is defined in the official tree (t2i/llava_t2i/model/):

- `language_model/modeling_llama.py`: `model.embed_tokens.weight` (LlamaModel), `model.layers.N.self_attn.
  {q,k,v,o}_proj.weight` (LlamaAttention, no bias), `model.layers.N.mlp.{gate,up,down}_proj.weight` (LlamaMLP),
  `model.layers.N.{input,post_attention}_layernorm.weight` (LlamaDecoderLayer), `model.norm.weight` (LlamaModel);
  the rotary `inv_freq` buffers (LlamaModel.rotary_emb and each LlamaAttention.rotary_emb) are non-persistent;
- `language_model/llava_llama.py`: `lm_head.weight` (LlavaLlamaForCausalLM, untied);
- `llava_arch.py` (LlavaMetaModel.__init__): `model.layers.N.self_attn.qknorm.{query_norm,key_norm}.weight`
  (QKNorm: two LlamaRMSNorm(head_dim, eps=1e-6)), `model.lvl_embed.weight` (nn.Embedding(9 scales + 1, H)),
  `model.pos_1LC` (a bare Parameter (817, H)), and `model.mm_projector` built by
  `multimodal_projector/builder.py` ("mlp2x_gelu": Linear(40, H), GELU, Linear(H, H) -> `.0.` and `.2.`).

Not in the state dict: the VQTower (`model.vision_tower`) keeps the TokenFlow tokenizer in a list, so it has no
tensors of its own; the tokenizer's weights are `tests/parity/tokenflow_recipe.official_state_dict("clipb_256")`.
The released checkpoint also stores two 0-d int64 buffers `image_token_start` / `image_token_end` (registered by
`initialize_vision_tokenizer` at training time); the official loader drops them as unexpected keys and re-derives
the ids (`reinit_image_token_start_end`), so they are left out here (513 and 33,280 in this vocabulary).
"""

from __future__ import annotations

import math

import torch

TEXT_VOCAB = 512
PAD_ID = 512  # [PAD], added right after the text vocabulary (train.py: smart_tokenizer_and_embedding_resize)
IMAGE_TOKEN_START = 513  # <vq_token_0>
CODEBOOK = 32_768
VOCAB = TEXT_VOCAB + 1 + CODEBOOK  # 33,281
IMAGE_TOKEN_END = IMAGE_TOKEN_START + CODEBOOK - 1  # <vq_token_32767> = 33,280
BOS_ID = 1
EOS_ID = 2
MAX_TEXT_TOKENS = 128

# The clipb_256 tokenizer's scales (1, 2, 4, ..., 16): 817 image positions, lvl_embed rows 0 (text) + 1..9.
SCALES = (1, 2, 4, 6, 8, 10, 12, 14, 16)
IMAGE_TOKENS = sum(s * s for s in SCALES)  # 817
CODE_DIM = 40  # TokenFlow code features: 32-d semantic + 8-d pixel halves, each L2-normalised

LLM = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    vocab_size=VOCAB,
    tie_word_embeddings=False,
)
# model.config.tokenizer_model_max_length: the sampler's context (prepare_generation_inputs) and the truncation
# length of prepare_inputs_labels_for_multimodal_generation.
CONTEXT = 2048

# "<img>" and "</img>" as three pieces each (▁< img > / </ img >): "img" and ">" are shared.
IMAGE_OPEN = (71, 402, 94)
IMAGE_CLOSE = (305, 402, 94)


def _caption(seed: int, n: int) -> list[int]:
    """n pseudo-random text ids in 3..511 from a fixed LCG (no library RNG, so identical everywhere)."""
    state = seed
    out = []
    for _ in range(n):
        state = (1103515245 * state + 12345) % 2**31
        out.append(3 + (state >> 8) % (TEXT_VOCAB - 3))
    return out


# Caption ids without BOS: 5, 17 and 140 ids (the last is cut to BOS + its first 127 ids).
PROMPTS = [_caption(11, 5), _caption(22, 17), _caption(33, 140)]


def prefix_ids(caption_ids) -> list[int]:
    """The official `crop_and_encode_text_and_img(..., image=None, max_text_token_num=128)` on ids: 131 ids."""
    text = [BOS_ID] + [int(i) for i in caption_ids]
    if len(text) > MAX_TEXT_TOKENS:
        text = text[:MAX_TEXT_TOKENS]
    else:
        text = [PAD_ID] * (MAX_TEXT_TOKENS - len(text)) + text
    return text + list(IMAGE_OPEN)


# The unconditional branch of the fixture's CFG runs: the empty caption (127 [PAD], BOS, <img>). Not the official
# negative prompt (eval/run_llava_samples.py), which would need the real tokenizer.
NULL_PREFIX = prefix_ids([])
PREFIX_LEN = MAX_TEXT_TOKENS + len(IMAGE_OPEN)  # 131


def training_ids(caption_ids, codes) -> list[int]:
    """The official training sequence (`crop_and_encode_text_and_img(..., image=<817 vq tokens>)`):
    prefix (131) + (IMAGE_TOKEN_START + codes) (817) + `</img>` (3) + EOS: 952 ids."""
    codes = [int(c) for c in codes]
    if len(codes) != IMAGE_TOKENS:
        raise ValueError(f"expected {IMAGE_TOKENS} codes, got {len(codes)}")
    return prefix_ids(caption_ids) + [IMAGE_TOKEN_START + c for c in codes] + list(IMAGE_CLOSE) + [EOS_ID]


def official_t2i_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the official `LlavaLlamaForCausalLM.state_dict()` (tiny `LLM` config)."""
    h, f = LLM["hidden_size"], LLM["intermediate_size"]
    head = h // LLM["num_attention_heads"]
    kv = head * LLM["num_key_value_heads"]
    o: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VOCAB, h),
        "model.norm.weight": (h,),
        "model.mm_projector.0.weight": (h, CODE_DIM),
        "model.mm_projector.0.bias": (h,),
        "model.mm_projector.2.weight": (h, h),
        "model.mm_projector.2.bias": (h,),
        "model.lvl_embed.weight": (len(SCALES) + 1, h),
        "model.pos_1LC": (IMAGE_TOKENS, h),
        "lm_head.weight": (VOCAB, h),
    }
    for n in range(LLM["num_hidden_layers"]):
        p = f"model.layers.{n}."
        o[p + "self_attn.q_proj.weight"] = (h, h)
        o[p + "self_attn.k_proj.weight"] = (kv, h)
        o[p + "self_attn.v_proj.weight"] = (kv, h)
        o[p + "self_attn.o_proj.weight"] = (h, h)
        o[p + "self_attn.qknorm.query_norm.weight"] = (head,)
        o[p + "self_attn.qknorm.key_norm.weight"] = (head,)
        o[p + "mlp.gate_proj.weight"] = (f, h)
        o[p + "mlp.up_proj.weight"] = (f, h)
        o[p + "mlp.down_proj.weight"] = (h, f)
        o[p + "input_layernorm.weight"] = (h,)
        o[p + "post_attention_layernorm.weight"] = (h,)
    return o


def official_t2i_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic fp32 values for every key of `official_t2i_shapes()` (recipe in the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = official_t2i_shapes()
    h = LLM["hidden_size"]
    out: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if key.endswith(("layernorm.weight", "_norm.weight")) or key == "model.norm.weight":
            value = 1.0 + 0.1 * noise
        elif key == "model.embed_tokens.weight":
            value = 0.5 * noise
        elif key in ("model.lvl_embed.weight", "model.pos_1LC"):
            value = 0.2 * noise
        elif key == "lm_head.weight":
            value = noise / math.sqrt(h)
        elif key.endswith(".bias"):
            value = 0.02 * noise
        else:
            value = noise / math.sqrt(shape[1])
        out[key] = value
    return out
