"""What both LLMs build the same way: the Hugging Face decoder (pretrained, or new from a config dict) and the
`mlp2x_gelu` projector that maps the tokenizer's 40-d code features into it."""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED_DECODERS = ("llama", "qwen2")


def build_llm_config(llm: dict):
    """A transformers config from a dict with `model_type` (Llama or Qwen2)."""
    from transformers import AutoConfig

    data = dict(llm)
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported: the image block needs the whole prefix")
    return cfg


def check_decoder_type(model_type: str | None) -> None:
    if model_type not in SUPPORTED_DECODERS:
        raise ValueError(f"the decoder must be one of {SUPPORTED_DECODERS}, got {model_type!r}")


def decoder(llm_config: dict, llm: nn.Module | None = None) -> nn.Module:
    """`llm` when given (a loaded HF causal LM), else a new one with random weights from `llm_config`; SDPA
    attention, fp32 weights. Under ZeRO-3, call inside `deepspeed.zero.Init`."""
    from transformers import AutoModelForCausalLM

    if llm is None:
        llm = AutoModelForCausalLM.from_config(
            build_llm_config(llm_config), attn_implementation="sdpa", dtype=torch.float32
        )
    check_decoder_type(llm.config.model_type)
    return llm


def mlp2x_gelu(in_dim: int, hidden: int, std: float) -> nn.Sequential:
    """LLaVA's projector: Linear(in, H), GELU, Linear(H, H); weights N(0, std), biases 0."""
    proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    for lin in (proj[0], proj[2]):
        nn.init.normal_(lin.weight, std=std)
        nn.init.zeros_(lin.bias)
    return proj
