"""The understanding model: a Hugging Face decoder (Llama/Vicuna or Qwen2) reading TokenFlow's continuous code
features through an `mlp2x_gelu` projector, LLaVA-1.5 style (shared/reference/tokenflow.md §5, llm.md §3).

    features (n_images, N, 40)  --projector-->  (n_images, N, H), spliced into the text embeddings at each
    sample's `image_index`: text[:i] + image rows + text[i:], positions 0 .. len - 1, labels -100 on the rows

The features are a pure function of the token indices (`Tokenizer.features`: every scale's codes upsampled to the
final grid and summed), so training reads token shards and no vision tower runs in the loop.

What differs from LLaVA's `prepare_inputs_labels_for_multimodal`, on purpose:
- padding is by position (`lengths`), never by token id: a tokenizer whose pad id is its EOS id still learns to
  stop (LLaVA's collator builds the attention mask with `input_ids != pad_id`);
- the projector always runs, on an empty tensor when a micro-batch has no image, and its output is always part of
  the graph: under ZeRO-3 a rank that skipped it would leave the others waiting in its all-gather (llm.md §6.3);
- the loss returns sums and counts; the training step divides by the global count of supervised tokens, and the
  head runs only on supervised positions (no (B, L, V) logits in memory).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenflow.llm.checkpoint import load_model, read_model_config, save_model
from tokenflow.llm.decoder import check_decoder_type, decoder, mlp2x_gelu

IGNORE = -100


@dataclass
class I2TConfig:
    llm: dict
    """The decoder's Hugging Face config as a dict (`PretrainedConfig.to_dict()`), `model_type` llama or qwen2."""
    image_tokens: int
    """Feature rows per image: the tokenizer's final grid, g * g (729 for siglip_384, 256 for clipb_256)."""
    code_dim: int = 40
    template: str = "qwen_2_5"
    """The chat template the model is trained with (`tokenflow.llm.templates`): plain, vicuna_v1 or qwen_2_5."""
    activation_checkpointing: bool = False

    def __post_init__(self):
        check_decoder_type(self.llm.get("model_type"))
        if self.image_tokens < 1 or self.code_dim < 1:
            raise ValueError("image_tokens and code_dim must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class I2TLoss:
    """Sums and counts of one micro-batch (the step divides by the global count)."""

    loss_sum: Tensor
    count: Tensor
    correct: Tensor
    """Supervised tokens whose argmax is the label (for token accuracy)."""


@dataclass
class I2TBatch:
    """A training micro-batch, text right-padded. Padding is known from `lengths` alone.

    input_ids, labels: (B, L) long, labels -100 where not supervised (aligned with the inputs: the model shifts);
    lengths: (B,) text tokens of each sample; image_index: (B,) where its image rows go, -1 for text-only samples;
    features: (n, N, code_dim), one per sample with an image, in batch order (n may be 0)."""

    input_ids: Tensor
    labels: Tensor
    lengths: Tensor
    image_index: Tensor
    features: Tensor


class I2TModel(nn.Module):
    def __init__(self, config: I2TConfig, llm: nn.Module | None = None):
        """`llm`: a loaded HF causal LM (pretrained); built from `config.llm` (random weights) when None. For ZeRO-3,
        construct inside `deepspeed.zero.Init`."""
        super().__init__()
        self.config = config
        self.llm = llm = decoder(config.llm, llm)
        self.projector = mlp2x_gelu(
            config.code_dim, llm.config.hidden_size, getattr(llm.config, "initializer_range", 0.02)
        )
        if config.activation_checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def hidden_size(self) -> int:
        return self.llm.config.hidden_size

    # ---- inputs ---------------------------------------------------------------------------------------------

    def splice(
        self,
        input_ids: Tensor,
        lengths: Tensor,
        image_index: Tensor,
        features: Tensor,
        labels: Tensor | None = None,
        *,
        padding: str = "right",
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(inputs_embeds (B, S, H), attention_mask (B, S) bool, labels (B, S) or None): each sample's text
        embeddings with its projected image rows at `image_index`, padded to the longest sample on the `padding`
        side (right for training, left for generation). The projector runs on `features` even when it is empty."""
        if padding not in ("right", "left"):
            raise ValueError(f"padding must be right or left, got {padding!r}")
        has_image = image_index >= 0
        if int(has_image.sum()) != features.shape[0]:
            raise ValueError(f"{int(has_image.sum())} samples have an image but {features.shape[0]} feature maps came")
        if features.shape[0] and tuple(features.shape[1:]) != (self.config.image_tokens, self.config.code_dim):
            raise ValueError(
                f"features must be (n, {self.config.image_tokens}, {self.config.code_dim}), got {tuple(features.shape)}"
            )
        text = self.llm.get_input_embeddings()(input_ids)
        rows = self.projector(features.to(text.dtype))  # always runs (ZeRO-3), possibly on no image
        empty = rows.reshape(-1, rows.shape[-1])[:0]  # zero rows of the projector's output: keeps it in the graph
        seqs, labs, k = [], [], 0
        for b in range(input_ids.shape[0]):
            n, i = int(lengths[b]), int(image_index[b])
            if not 0 < n <= input_ids.shape[1] or i > n:
                raise ValueError(f"sample {b}: length {n}, image index {i} for {input_ids.shape[1]} ids")
            lab = labels[b, :n] if labels is not None else None
            if i >= 0:
                seqs.append(torch.cat([text[b, :i], rows[k], text[b, i:n]]))
                if lab is not None:
                    ignore = lab.new_full((rows.shape[1],), IGNORE)
                    labs.append(torch.cat([lab[:i], ignore, lab[i:]]))
                k += 1
            else:
                seqs.append(torch.cat([text[b, :n], empty]))
                if lab is not None:
                    labs.append(lab)
        width = max(s.shape[0] for s in seqs)
        x = text.new_zeros(len(seqs), width, text.shape[-1])
        mask = torch.zeros(len(seqs), width, dtype=torch.bool, device=text.device)
        out_labels = None if labels is None else labels.new_full((len(seqs), width), IGNORE)
        for b, s in enumerate(seqs):
            span = slice(0, s.shape[0]) if padding == "right" else slice(width - s.shape[0], width)
            x[b, span] = s
            mask[b, span] = True
            if out_labels is not None:
                out_labels[b, span] = labs[b]
        return x, mask, out_labels

    # ---- training -------------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, labels: Tensor, lengths: Tensor, image_index: Tensor, features: Tensor):
        """Summed next-token cross-entropy over the supervised tokens (labels aligned with the inputs)."""
        x, mask, labels = self.splice(input_ids, lengths, image_index, features, labels)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        h = self.llm.model(inputs_embeds=x, attention_mask=mask.long(), position_ids=positions).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE
        picked = h[:, :-1][keep]  # the head runs only where a token is supervised
        logits = self.llm.lm_head(picked).float()
        gold = target[keep]
        loss_sum = F.cross_entropy(logits, gold, reduction="sum") if gold.numel() else logits.sum() * 0.0
        correct = (logits.argmax(-1) == gold).sum() if gold.numel() else torch.zeros((), device=gold.device)
        return I2TLoss(loss_sum=loss_sum, count=keep.sum(), correct=correct)

    # ---- generation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: list[list[int]],
        image_index: list[int | None],
        features: Tensor,
        *,
        max_new_tokens: int = 256,
        eos_token_id: int | list[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator_seed: int | None = None,
        streamer=None,
        synced_gpus: bool = False,
    ) -> list[list[int]]:
        """Answers to prompts (each ending with the assistant's header, `tokenflow.llm.templates`), left-padded
        into one batch, with the decoder's KV cache. Greedy at temperature 0. Returns each answer's new ids,
        without the EOS. `synced_gpus`: under ZeRO-3, every rank keeps stepping until all ranks are done (each
        forward gathers the partitioned weights from all of them)."""
        device = self.projector[0].weight.device
        width = max(len(ids) for ids in input_ids)
        ids = torch.zeros(len(input_ids), width, dtype=torch.long, device=device)
        for b, row in enumerate(input_ids):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in input_ids], device=device)
        index = torch.tensor([-1 if i is None else i for i in image_index], device=device)
        x, mask, _ = self.splice(ids, lengths, index, features.to(device), padding="left")
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        out = self.llm.generate(
            inputs_embeds=x,
            attention_mask=mask.long(),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            top_k=None,
            eos_token_id=eos,
            pad_token_id=eos[0],
            streamer=streamer,
            synced_gpus=synced_gpus,
        )
        answers = []
        for row in out.tolist():  # with inputs_embeds, generate returns the new tokens only
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            answers.append(row[:cut])
        return answers

    # ---- save / load ----------------------------------------------------------------------------------------

    def save_pretrained(self, path, *, extra: dict | None = None, storage_options=None, state_dict=None) -> None:
        """`config.json` and `model.safetensors` (`tokenflow.llm.checkpoint`); `extra` such as the image tokenizer's
        id; `state_dict` replaces this module's own (e.g. gathered from ZeRO-3)."""
        save_model(
            self,
            path,
            kind="i2t",
            config=self.config.to_dict(),
            extra=extra,
            storage_options=storage_options,
            state_dict=state_dict,
        )

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", storage_options=None) -> I2TModel:
        """Load a `save_pretrained` directory; every weight must match by name and shape."""
        payload = read_model_config(path, storage_options=storage_options, kind="i2t")
        config = I2TConfig(**payload["config"])
        return load_model(lambda: cls(config), path, device=device, storage_options=storage_options)
