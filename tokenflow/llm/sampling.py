"""Next-scale sampling for the text-to-image model, with a KV cache (ref tokenflow.md §4.6, llm.md §1.3, §2.3).

Per image: the prompt prefix runs once; then each scale is one forward of its s^2 positions against the cache.
Classifier-free guidance runs both branches in one batch (the prompts, then as many null prompts: the empty
caption, exactly as training drops captions) and mixes raw logits with a ramp over scales,
t = cfg * k / (K - 1), logits = (1 + t) * cond - t * uncond. Each scale draws one token per position after
top-k then top-p filtering; both branches receive the same tokens.

Multi-step refinement (`--loop 2|3`, scales k >= 1): after the first draw, scale k is run again with its inputs
replaced by the partial sum that includes the draft, and re-drawn with tighter (top-k, top-p). The refinement
passes are scratch work: the official model re-reads scale k with its ordinary inputs at the next scale, so the
cache keeps the first pass's keys and values of scale k (kept with `tail`, put back after the last refinement).

`use_cache=False` is the official approach, kept as the reference and the benchmark's baseline: every pass
recomputes the whole sequence so far and scores every position. Both give the same tokens for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenflow.llm.kv_cache import KVCache
from tokenflow.llm.layout import T2ILayout
from tokenflow.llm.mask import dense_mask, t2i_mask_mod
from tokenflow.llm.t2i import T2IModel

# `--loop` presets: (top-k per pass, top-p per pass); preset 3 is the paper's setting (1 + 8 * 3 = 25 passes)
PRESETS: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = {
    1: ((600,), (0.6,)),
    2: ((1200, 1), (0.8, 0.0)),
    3: ((1200, 100, 1), (0.8, 0.8, 0.0)),
}


@dataclass(frozen=True)
class SamplingConfig:
    cfg: float = 7.5
    top_k: tuple[int, ...] = PRESETS[1][0]
    """Per pass of a scale; 0 disables, 1 is greedy."""
    top_p: tuple[float, ...] = PRESETS[1][1]
    """Per pass; 0 disables."""

    def __post_init__(self):
        if len(self.top_k) != len(self.top_p) or not self.top_k:
            raise ValueError(f"top_k {self.top_k} and top_p {self.top_p} need one entry per pass")
        if any(k < 0 for k in self.top_k) or any(not 0.0 <= p <= 1.0 for p in self.top_p):
            raise ValueError(f"top_k must be >= 0 and top_p in [0, 1], got {self.top_k}, {self.top_p}")

    @classmethod
    def preset(cls, loop: int, cfg: float = 7.5) -> SamplingConfig:
        if loop not in PRESETS:
            raise ValueError(f"--loop must be one of {sorted(PRESETS)}, got {loop}")
        top_k, top_p = PRESETS[loop]
        return cls(cfg=cfg, top_k=top_k, top_p=top_p)

    @property
    def passes(self) -> int:
        return len(self.top_k)


def guidance(cond: Tensor, uncond: Tensor, t: float) -> Tensor:
    return (1 + t) * cond - t * uncond


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """The official filter: top-k keeps every logit tied with the k-th; top-p keeps the smallest set of the most
    likely tokens whose probability reaches p (the most likely always stays). Removed entries become -inf."""
    logits = logits.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1:] = False
        logits.masked_fill_(drop.scatter(-1, order, drop), -torch.inf)
    return logits


def draw(logits: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """One multinomial draw per position: (B, n, K) -> (B, n). A list of generators gives each image its own
    stream, so an image depends on its own seed only, not on which other images share its batch."""
    b, n, k = logits.shape
    probs = logits.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):
        if len(generator) != b:
            raise ValueError(f"{len(generator)} generators for a batch of {b}")
        rows = [torch.multinomial(probs[i], 1, replacement=True, generator=g) for i, g in enumerate(generator)]
        return torch.stack(rows).view(b, n)
    return torch.multinomial(probs.view(-1, k), 1, replacement=True, generator=generator).view(b, n)


def seeded_generators(seeds: list[int], device="cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


class T2ISampler:
    """Samples image tokens from a `T2IModel`; `quantizer` is the image tokenizer's `MultiScaleQuantizer` (its
    codebook builds the next scale's inputs)."""

    def __init__(self, model: T2IModel, quantizer, layout: T2ILayout):
        if tuple(quantizer.scales) != tuple(model.config.scales) or tuple(layout.scales) != tuple(model.config.scales):
            raise ValueError(
                f"scales differ: model {model.config.scales}, tokenizer {quantizer.scales}, layout {layout.scales}"
            )
        self.model, self.quantizer, self.layout = model, quantizer, layout
        self.scales = tuple(model.config.scales)

    def null_prompts(self, batch: int, device) -> tuple[Tensor, Tensor]:
        """The unconditional branch's prefix: the empty caption, the same ids a dropped caption gets in training."""
        ids, valid = T2ILayout.stack([self.layout.null_prompt()] * batch)
        return ids.to(device), valid.to(device)

    @torch.no_grad()
    def sample(
        self,
        prompt_ids: Tensor,
        prompt_valid: Tensor,
        config: SamplingConfig,
        generator: torch.Generator | list[torch.Generator] | None = None,
        *,
        use_cache: bool = True,
    ) -> Tensor:
        """(B, prefix_len) prompts (`T2ILayout.encode_prompts`) -> (B, T) image tokens, scale-major. `generator`:
        one for the batch, or one per image (`seeded_generators`)."""
        model, layout = self.model, self.layout
        b, device = prompt_ids.shape[0], prompt_ids.device
        if prompt_ids.shape[1] != layout.prefix_len:
            raise ValueError(f"prompts must be laid out to {layout.prefix_len} ids, got {prompt_ids.shape[1]}")
        null_ids, null_valid = self.null_prompts(b, device)
        ids = torch.cat([prompt_ids, null_ids])
        valid = torch.cat([prompt_valid, null_valid])
        run = _Cached(model, layout, ids, valid) if use_cache else _Recompute(model, layout, ids, valid)

        tokens: list[Tensor] = []
        last = len(self.scales) - 1
        for k, s in enumerate(self.scales):
            t = config.cfg * k / last if last else 0.0
            inputs = None if k == 0 else self.quantizer.next_scale_input(self._partial(tokens)[-1], s)
            passes = 1 if k == 0 else config.passes
            draft = None
            for p in range(passes):
                if p > 0:  # refinement: scale k re-read with the partial sum that includes its draft
                    inputs = self._partial(tokens + [draft])[-1]
                h = run.scale(k, None if inputs is None else _flat(inputs).repeat(2, 1, 1), refine=p > 0)
                logits = model.image_logits(h)
                logits = guidance(logits[:b], logits[b:], t)
                draft = draw(filter_top_k_top_p(logits, config.top_k[p], config.top_p[p]), generator)
            run.end_scale(k)
            tokens.append(draft)
        return torch.cat(tokens, dim=1)

    def _partial(self, tokens: list[Tensor]) -> list[Tensor]:
        return self.quantizer.cumulative_features(torch.cat(tokens, dim=1))


def _flat(maps: Tensor) -> Tensor:
    """(B, C, s, s) -> (B, s*s, C), row-major."""
    return maps.flatten(2).transpose(1, 2)


class _Steps:
    """Where scale k's positions are: the prefix's last position predicts scale 0; scale k >= 1 is predicted by
    the positions prefix_len - 1 + offset_k ... (offset_k = tokens before scale k)."""

    def __init__(self, model: T2IModel, layout: T2ILayout, ids: Tensor, valid: Tensor):
        self.model, self.ids = model, ids
        self.prefix = layout.prefix_len
        self.offsets = [sum(s * s for s in layout.scales[:k]) for k in range(len(layout.scales))]
        self.sizes = [s * s for s in layout.scales]
        key_valid = torch.cat([valid, valid.new_ones(valid.shape[0], model.image_tokens)], dim=1)
        self.mask_mod = t2i_mask_mod(key_valid, self.prefix, layout.scales)

    def rows(self, k: int) -> tuple[int, int]:
        first = self.prefix - 1 + self.offsets[k]
        return first, first + self.sizes[k]


class _Cached(_Steps):
    def __init__(self, model, layout, ids, valid):
        super().__init__(model, layout, ids, valid)
        self.cache = KVCache(model.num_layers, self.prefix - 1 + model.image_tokens)
        self.saved = None
        x = model.embed_prefix(ids)
        self.last = self._run(x, 0, self.prefix)[:, -1:]  # the prefix's last position predicts scale 0

    def _run(self, x: Tensor, first: int, end: int) -> Tensor:
        mask = dense_mask(self.mask_mod, x.shape[0], end, x.device, first_row=first)
        positions = torch.arange(first, end, device=x.device).unsqueeze(0)
        return self.model.backbone(x, mask, positions, self.cache)

    def scale(self, k: int, inputs: Tensor | None, refine: bool) -> Tensor:
        if k == 0:
            return self.last
        first, end = self.rows(k)
        if refine:
            if self.saved is None:
                self.saved = self.cache.tail(self.sizes[k])  # the first pass's keys and values of scale k
            self.cache.crop(self.sizes[k])
        return self._run(self.model.embed_image(inputs, self.offsets[k]), first, end)

    def end_scale(self, k: int) -> None:
        if self.saved is not None:
            self.cache.crop(self.sizes[k])
            self.cache.append(self.saved)
            self.saved = None


class _Recompute(_Steps):
    def __init__(self, model, layout, ids, valid):
        super().__init__(model, layout, ids, valid)
        self.prefix_x = model.embed_prefix(ids)
        self.image_x: list[Tensor] = []  # the ordinary inputs of scales 1 .. k-1

    def scale(self, k: int, inputs: Tensor | None, refine: bool) -> Tensor:
        parts = [self.prefix_x, *self.image_x]
        if k > 0:
            x_k = self.model.embed_image(inputs, self.offsets[k])
            if not refine:
                self._pending = x_k
            parts.append(x_k)
        x = torch.cat(parts, dim=1)
        length = x.shape[1]
        mask = dense_mask(self.mask_mod, x.shape[0], length, x.device)
        h = self.model.backbone(x, mask, torch.arange(length, device=x.device).unsqueeze(0))
        self.model.image_logits(h)  # the official loop scores every position; kept for a like-for-like baseline
        first, end = self.rows(k)
        return h[:, first:end]

    def end_scale(self, k: int) -> None:
        if k > 0:
            self.image_x.append(self._pending)
