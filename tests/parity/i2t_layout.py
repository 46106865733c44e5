"""The released understanding model's layout (`Tokenflow-llava-qwen2.5-14B-finetuning`): its config.json and the
name and shape of every tensor, from shared/reference/official-llm.md §3. Used by tests/unit/test_convert_i2t.py
(the 14 B layout maps exactly) and bench/convert_memory.py (a smaller release of the same layout)."""

from __future__ import annotations

# Qwen2.5-14B-Instruct's config.json fields with the LLaVA ones of the release (shared/reference/official-llm.md §3)
RELEASED_14B = {
    "architectures": ["LlavaQwenForCausalLM"],
    "model_type": "llava_qwen",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "max_window_layers": 70,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vocab_size": 152064,
    "torch_dtype": "bfloat16",
    "mm_hidden_size": 40,
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_tower": "",
    "mm_vision_vq_type": "TOKENFLOW",
    "mm_patch_merge_type": "flat",
    "mm_vision_select_layer": -2,
    "mm_use_im_start_end": False,
    "image_aspect_ratio": "pad",
    "tokenizer_model_max_length": 2048,
}


def released_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a release with `config`'s sizes (Qwen2 with q/k/v biases, untied head, LLaVA's mlp2x_gelu
    projector from the 40-d codes), by its official name."""
    h, f = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    vocab = config["vocab_size"]
    shapes = {
        "model.embed_tokens.weight": (vocab, h),
        "lm_head.weight": (vocab, h),
        "model.norm.weight": (h,),
        "model.mm_projector.0.weight": (h, config["mm_hidden_size"]),
        "model.mm_projector.0.bias": (h,),
        "model.mm_projector.2.weight": (h, h),
        "model.mm_projector.2.bias": (h,),
    }
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, rows in [("q", h), ("k", kv), ("v", kv)]:
            shapes[f"{p}self_attn.{name}_proj.weight"] = (rows, h)
            shapes[f"{p}self_attn.{name}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes
