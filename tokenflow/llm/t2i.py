"""The text-to-image model: a Llama-family decoder extended as TokenFlow's `t2i/llava_t2i` (ref tokenflow.md §4).

What is added to the Hugging Face decoder (Llama or Qwen2, pretrained or built from a config):

- `projector`: mlp2x_gelu, code_dim (40) -> H -> H, applied to the cascaded teacher-forcing features
  (`MultiScaleQuantizer.teacher_forcing_inputs`); image positions never use token embeddings;
- `level_embed` ((K + 1) x H): row 0 is added to every text position, row k + 1 to the image positions that
  predict scale k (so row 1 is unused, as in the official model);
- `pos_embed` (T x H): row r is added at the position that predicts image token r;
- QK-norm: an RMSNorm (eps 1e-6) over the head dim on q and k, before RoPE, in every layer;
- post-sublayer norm: x + norm1(attn(x)), then x + norm2(mlp(x)), reusing the decoder's two norm weights;
- attention through `F.scaled_dot_product_attention` with a 4-D boolean mask (`tokenflow.llm.mask`), or through
  FlexAttention with a `BlockMask` made from the same rule: never eager attention (which misreads boolean
  masks), never FlashAttention (which cannot take this mask).

The output head, `head`:
- "image" (the default for new models): `image_head` = Linear(H, codebook) scores image tokens only; the
  decoder's own text head scores `</img>`, EOS and the (logged) text loss. No input rows are added to the
  vocabulary (the official layout carries 32,768 input rows that are never read), no text id or pad can ever be
  sampled, and the image logits are half the size.
- "unified" (the released TokenFlow-t2i layout): the vocabulary is extended by [PAD] and one id per code, and
  `lm_head` scores everything; image logits are its code rows (`image_token_start` ...).

The decoder's layers are driven by `backbone` (not by the HF forward), so the same code runs training with the
dense block-causal mask and cached sampling one scale at a time. Every parameter is reached through a module
call, so DeepSpeed ZeRO-3 gathers it.

Attention, a runtime choice (`T2IModel(..., attention=)`, `from_pretrained(..., attention=)` or
`model.set_attention(...)`; not saved with the model, the weights do not depend on it):
- "sdpa" (the default): the training forward builds the dense (B, 1, L, L) boolean mask; SDPA then runs its
  memory-efficient or math kernel. Works everywhere, in training and sampling.
- "flex": the training forward builds a `BlockMask` from the same `mask_mod` and the layers call FlexAttention,
  compiled once per process on CUDA. It skips the blocks the mask leaves empty (the text never sees the image,
  the causal upper triangle) and never materialises an L x L mask: use it for training on GPU when
  `bench/t2i_attention.py` shows it faster. On CPU torch runs FlexAttention eagerly, forward only (it refuses
  the backward there), so CPU training stays on "sdpa".
The type of the mask picks the kernel in every layer: a `BlockMask` goes to FlexAttention, a tensor to SDPA. Cached
sampling (`KVCache`, `tokenflow.llm.sampling`) always passes dense step masks, so it runs SDPA under either choice.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from tokenflow.llm.checkpoint import load_model, save_model, tied
from tokenflow.llm.checkpoint import read_model_config as _read_model_config
from tokenflow.llm.decoder import check_decoder_type, decoder, mlp2x_gelu
from tokenflow.llm.kv_cache import KVCache
from tokenflow.llm.mask import scale_index, t2i_attention_mask, t2i_mask_mod

ATTENTION = ("sdpa", "flex")


@dataclass
class T2IConfig:
    llm: dict
    """The decoder's Hugging Face config as a dict (`PretrainedConfig.to_dict()`), `model_type` llama or qwen2."""
    scales: tuple[int, ...]
    codebook_size: int
    code_dim: int
    head: str = "image"
    """"image" (separate image head, the default) or "unified" (the released layout: one extended vocabulary)."""
    text_vocab_size: int | None = None
    """The text vocabulary, before any extension (set from `llm` when built)."""
    qk_norm_eps: float = 1e-6
    activation_checkpointing: bool = False

    def __post_init__(self):
        self.scales = tuple(int(s) for s in self.scales)
        if self.head not in ("image", "unified"):
            raise ValueError(f"head must be 'image' or 'unified', got {self.head!r}")
        check_decoder_type(self.llm.get("model_type"))
        if self.text_vocab_size is None:
            self.text_vocab_size = int(self.llm["vocab_size"])

    @property
    def image_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def pad_token_id(self) -> int | None:
        """unified: the [PAD] id the extension adds (ids: text, [PAD], one per code). image: none is added."""
        return self.text_vocab_size if self.head == "unified" else None

    @property
    def image_token_start(self) -> int | None:
        return self.text_vocab_size + 1 if self.head == "unified" else None

    def to_dict(self) -> dict:
        return {**asdict(self), "scales": list(self.scales)}

    @classmethod
    def from_dict(cls, data: dict) -> T2IConfig:
        return cls(**data)


@dataclass
class T2ILoss:
    """Sums and counts of one micro-batch; the training step divides by the global count of supervised tokens."""

    loss_sum: Tensor
    """CE summed over the supervised tokens (image tokens, `</img>`, EOS): the optimised quantity."""
    count: Tensor
    image_loss_sum: Tensor
    image_count: Tensor
    text_loss_sum: Tensor
    """CE summed over the caption's next-token targets: logged, never optimised (no gradient)."""
    text_count: Tensor
    correct_per_scale: Tensor
    """(K,) next-scale argmax hits per scale."""
    tokens_per_scale: Tensor
    extras: dict = field(default_factory=dict)


class QKNorm(nn.Module):
    """RMSNorm over the head dim of q and k (shared over heads), computed in fp32 as the decoder's own norms."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, eps)
        self.key_norm = RMSNorm(head_dim, eps)

    def forward(self, q: Tensor, k: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(dtype), self.key_norm(k).to(dtype)


class RMSNorm(nn.Module):
    """The Llama RMSNorm (fp32 statistics, then `weight * x` in the input dtype)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class PositionEmbedding(nn.Module):
    """One learned row per image token, read through a module call (so ZeRO-3 gathers it)."""

    def __init__(self, rows: int, dim: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std)

    def forward(self, first: int, count: int) -> Tensor:
        return self.weight[first : first + count]


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process: eager FlexAttention is an unfused reference that materialises the
    whole score matrix. Static shapes: every training batch has the layout's one length."""
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float) -> Tensor:
    """FlexAttention, compiled on CUDA; elsewhere eager (compiling it on CPU takes a minute and gives no backward).
    q and k leave RoPE in the residual stream's dtype: cast to v's, as autocast does for SDPA (flex wants one)."""
    attend = compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    q, k = q.to(v.dtype), k.to(v.dtype)
    return attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class T2IModel(nn.Module):
    def __init__(self, config: T2IConfig, llm: nn.Module | None = None, *, attention: str = "sdpa"):
        """`llm`: a loaded HF causal LM (e.g. `AutoModelForCausalLM.from_pretrained(dir)`); built from
        `config.llm` (random weights) when None. For ZeRO-3, construct inside `deepspeed.zero.Init`.
        `attention`: "sdpa" or "flex", the kernel of the training forward (module docstring; `set_attention`)."""
        super().__init__()
        self.config = config
        self.llm = llm = decoder(config.llm, llm)
        hidden = llm.config.hidden_size
        head_dim = getattr(llm.config, "head_dim", None) or hidden // llm.config.num_attention_heads
        std = math.sqrt(1.0 / (3 * hidden))  # the official init of the level and position embeddings
        init_std = getattr(llm.config, "initializer_range", 0.02)
        self.projector = mlp2x_gelu(config.code_dim, hidden, init_std)
        self.level_embed = nn.Embedding(len(config.scales) + 1, hidden)
        nn.init.trunc_normal_(self.level_embed.weight, mean=0.0, std=std)
        self.pos_embed = PositionEmbedding(config.image_tokens, hidden, std)
        self.qk_norm = nn.ModuleList(QKNorm(head_dim, config.qk_norm_eps) for _ in range(llm.config.num_hidden_layers))
        if config.head == "image":
            self.image_head = nn.Linear(hidden, config.codebook_size, bias=False)
            nn.init.normal_(self.image_head.weight, std=init_std)
        else:
            self.image_head = None
            want = config.text_vocab_size + 1 + config.codebook_size
            if llm.get_input_embeddings().num_embeddings != want:
                llm.resize_token_embeddings(want, mean_resizing=False)
        self.register_buffer("_scale_of_token", scale_index(config.scales), persistent=False)
        self.set_attention(attention)

    def set_attention(self, attention: str) -> T2IModel:
        """How `forward` attends: "sdpa" or "flex" (cached sampling is SDPA either way). A runtime choice, like the
        device: it is not written by `save_pretrained`."""
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if attention == "flex" and getattr(self.llm.config, "attention_dropout", 0.0):
            raise ValueError("FlexAttention has no attention dropout: use attention='sdpa' with attention_dropout > 0")
        self.attention = attention
        return self

    # ---- sizes ----------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.llm.config.num_hidden_layers

    @property
    def image_tokens(self) -> int:
        return self.config.image_tokens

    @property
    def num_scales(self) -> int:
        return len(self.config.scales)

    # ---- inputs ---------------------------------------------------------------------------------------------

    def embed_text(self, ids: Tensor) -> Tensor:
        """Token embeddings plus level row 0 (every text position carries it, as in the official model)."""
        x = self.llm.get_input_embeddings()(ids)
        return x + self.level_embed(torch.zeros_like(ids))

    def embed_prefix(self, ids: Tensor) -> Tensor:
        """The text prefix (ending with <img>): its last position predicts image token 0 and carries pos row 0."""
        x = self.embed_text(ids)
        return torch.cat([x[:, :-1], x[:, -1:] + self.pos_embed(0, 1)], dim=1)

    def embed_image(self, inputs: Tensor, first: int) -> Tensor:
        """Image positions predicting tokens first .. first + n - 1 (1 <= first), from their (B, n, code_dim)
        teacher-forcing inputs: projector + level row (scale + 1) + position row (token index)."""
        n = inputs.shape[1]
        if first < 1 or first + n > self.image_tokens:
            raise ValueError(f"image positions predict tokens 1..{self.image_tokens - 1}, got {first}..{first + n - 1}")
        level = self._scale_of_token[first : first + n] + 1
        x = self.projector(inputs.to(self.projector[0].weight.dtype))
        return x + self.level_embed(level).unsqueeze(0) + self.pos_embed(first, n).unsqueeze(0)

    def embed_image_end(self, batch: int, like: Tensor) -> Tensor:
        """The last image position (it predicts `</img>`): a zero input, plus level row 0."""
        zero = torch.zeros(batch, 1, dtype=torch.long, device=like.device)
        return like.new_zeros(batch, 1, like.shape[-1]) + self.level_embed(zero)

    def embed_sequence(self, input_ids: Tensor, image_inputs: Tensor, image_start: int) -> Tensor:
        """The whole training sequence: prefix ids, T image positions, suffix ids (`input_ids` (B, L) holds any
        id at the image positions; they are not read)."""
        t = self.image_tokens
        prefix = self.embed_prefix(input_ids[:, :image_start])
        image = self.embed_image(image_inputs, 1)
        end = self.embed_image_end(input_ids.shape[0], image)
        suffix = self.embed_text(input_ids[:, image_start + t :])
        return torch.cat([prefix, image, end, suffix], dim=1)

    # ---- the decoder ----------------------------------------------------------------------------------------

    def training_mask(self, key_valid: Tensor, image_start: int) -> Tensor | BlockMask:
        """The block-causal mask of whole training sequences (`tokenflow.llm.mask`) in the form the chosen attention
        takes: dense (B, 1, L, L) bool for SDPA, a `BlockMask` (broadcast over heads) for FlexAttention. Lengths
        that are not a multiple of the 128-token block are fine: FlexAttention masks the last partial block."""
        if self.attention == "sdpa":
            return t2i_attention_mask(key_valid, image_start, self.config.scales)
        b, length = key_valid.shape
        mask_mod = t2i_mask_mod(key_valid, image_start, self.config.scales)
        return create_block_mask(mask_mod, b, None, length, length, device=key_valid.device)

    def backbone(
        self, x: Tensor, mask: Tensor | BlockMask, position_ids: Tensor, cache: KVCache | None = None
    ) -> Tensor:
        """Run the decoder layers and the final norm. x (B, n, H); mask (B, 1, n, keys) bool, True = attend, or a
        `BlockMask` over the whole sequence (no cache); position_ids (1 or B, n). With a cache, keys are the
        cached positions then these n."""
        if isinstance(mask, BlockMask) and cache is not None:
            raise ValueError("a BlockMask (FlexAttention) serves whole sequences only: cached steps take a dense mask")
        inner = self.llm.model
        cos, sin = inner.rotary_emb(x, position_ids=position_ids)
        for i in range(self.num_layers):
            if self.config.activation_checkpointing and self.training and cache is None:
                x = checkpoint(self._layer, i, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = self._layer(i, x, cos, sin, mask, cache)
        return inner.norm(x)

    def _layer(
        self, i: int, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | BlockMask, cache: KVCache | None
    ) -> Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        layer = self.llm.model.layers[i]
        attn = layer.self_attn
        b, n, _ = x.shape
        shape = (b, n, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self.qk_norm[i](q, k, v.dtype)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, k, v)
        if isinstance(mask, BlockMask):
            o = flex_attend(q, k, v, mask, attn.scaling)
        else:
            o = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=attn.attention_dropout if self.training else 0.0,
                scale=attn.scaling,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        o = attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
        x = x + layer.input_layernorm(o)  # post-sublayer norm: the sublayers see the raw residual stream
        return x + layer.post_attention_layernorm(layer.mlp(x))

    # ---- heads ----------------------------------------------------------------------------------------------

    def image_logits(self, h: Tensor) -> Tensor:
        """(..., codebook) logits over the image codes only: text ids and [PAD] cannot be scored."""
        if self.image_head is not None:
            return self.image_head(h).float()
        start = self.config.image_token_start
        return self.llm.lm_head(h)[..., start : start + self.config.codebook_size].float()

    def text_logits(self, h: Tensor) -> Tensor:
        return self.llm.lm_head(h).float()

    # ---- training -------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        key_valid: Tensor,
        image_tokens: Tensor,
        image_inputs: Tensor,
        image_start: int,
        text_labels: Tensor | None = None,
    ) -> T2ILoss:
        """Teacher-forced loss sums for sequences laid out as `tokenflow.llm.layout` (input_ids and key_valid
        (B, L), image_tokens (B, T), image_inputs (B, T - 1, code_dim), text_labels (B, image_start) from
        `T2ILayout.text_targets`)."""
        b, length = input_ids.shape
        t = self.image_tokens
        x = self.embed_sequence(input_ids, image_inputs, image_start)
        mask = self.training_mask(key_valid, image_start)
        positions = torch.arange(length, device=x.device).unsqueeze(0)
        h = self.backbone(x, mask, positions)

        # image tokens: positions image_start - 1 .. image_start + T - 2
        h_img = h[:, image_start - 1 : image_start - 1 + t]
        if self.image_head is not None:
            img_logits = code_logits = self.image_logits(h_img)
            img_targets = image_tokens
        else:  # the released model's loss: the full extended vocabulary
            start = self.config.image_token_start
            img_logits = self.text_logits(h_img)
            code_logits = img_logits[..., start : start + self.config.codebook_size]
            img_targets = image_tokens + start
        img_ce = F.cross_entropy(img_logits.flatten(0, 1), img_targets.flatten(), reduction="none").view(b, t)
        # </img> and EOS: predicted by the last image position and the suffix (bar its last)
        h_suf = h[:, image_start + t - 1 : length - 1]
        suf_targets = input_ids[:, image_start + t :]
        suf_ce = F.cross_entropy(self.text_logits(h_suf).flatten(0, 1), suf_targets.flatten(), reduction="sum")

        with torch.no_grad():
            hits = (code_logits.argmax(-1) == image_tokens).float()  # among the codes, as sampling draws
            level = self._scale_of_token.unsqueeze(0).expand(b, -1)
            k = self.num_scales
            correct = torch.zeros(k, device=h.device).index_add_(0, level.flatten(), hits.flatten())
            per_scale = torch.bincount(level.flatten(), minlength=k).float()
            text_sum, text_count = self._text_loss(h[:, :image_start].detach(), text_labels)

        image_sum = img_ce.sum()
        count = torch.tensor(float(img_ce.numel() + suf_targets.numel()), device=h.device)
        return T2ILoss(
            loss_sum=image_sum + suf_ce,
            count=count,
            image_loss_sum=image_sum.detach(),
            image_count=torch.tensor(float(img_ce.numel()), device=h.device),
            text_loss_sum=text_sum,
            text_count=text_count,
            correct_per_scale=correct,
            tokens_per_scale=per_scale,
        )

    def _text_loss(self, h_prefix: Tensor, text_labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """Next-token CE of the caption (position p predicts label p + 1), over the supervised targets only."""
        zero = torch.zeros((), device=h_prefix.device)
        if text_labels is None:
            return zero, zero
        targets = text_labels[:, 1:]
        keep = targets != -100
        # always run the head (on zero rows when nothing is supervised) so every ZeRO-3 rank calls it
        logits = self.text_logits(h_prefix[:, :-1][keep])
        if logits.shape[0] == 0:
            return zero + logits.sum(), zero
        return F.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum().float()

    # ---- save and load --------------------------------------------------------------------------------------

    def _tied(self) -> bool:
        return tied(self)

    def save_pretrained(
        self, path: str | os.PathLike, *, extra: dict | None = None, storage_options=None, state_dict=None
    ) -> None:
        """`config.json` (the T2I config, the decoder's config, `extra` such as the image tokenizer's id) and
        `model.safetensors` (every weight; a tied output head is stored once) to a directory or fsspec URI
        (`tokenflow.llm.checkpoint`). `state_dict`: the weights to write instead of this module's own (e.g.
        gathered from ZeRO-3 partitions)."""
        save_model(
            self,
            path,
            kind="t2i",
            config=self.config.to_dict(),
            extra=extra,
            storage_options=storage_options,
            state_dict=state_dict,
        )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device="cpu", storage_options=None, attention: str = "sdpa"
    ) -> T2IModel:
        """Load a directory written by `save_pretrained` (local or fsspec URI). Every weight must match by name
        and shape; missing and unexpected keys are listed in the error. `attention`: "sdpa" or "flex"."""
        payload = read_model_config(path, storage_options=storage_options)
        config = T2IConfig.from_dict(payload["config"])
        model = load_model(
            lambda: cls(config, attention=attention), path, device=device, storage_options=storage_options
        )
        model._rebuild_buffers(device)
        return model

    def _rebuild_buffers(self, device) -> None:
        """The scale index is a non-persistent buffer (not in the file): compute it again."""
        with torch.device(device):
            self._scale_of_token = scale_index(self.config.scales)


def read_model_config(path: str, *, storage_options=None) -> dict:
    """A text-to-image model directory's config.json (an understanding model's is refused)."""
    return _read_model_config(path, storage_options=storage_options, kind="t2i")


def decoder_config(**overrides) -> dict:
    """A tiny Llama config dict for tests and the CPU demo (override any field, e.g. model_type='qwen2')."""
    base = dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return copy.deepcopy(base)
