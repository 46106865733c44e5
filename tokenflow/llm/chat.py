"""Ask a trained understanding model about images: the model, its image tokenizer and its text tokenizer together.

    assistant = Assistant.load("runs/i2t/model", "tokenizers/siglip_384")
    assistant.answer(["cat.jpg"], ["What is in the image?"])            # -> ["A ginger cat on a sofa."]
    assistant.answer_tokens([row_tokens], ["Describe the image."])       # token shards: no image decoding

An image goes through the tokenizer's own preprocessing and encoder to token indices, and the model reads their
features (`Tokenizer.features`), exactly as training read them from the shards. The prompt is built by the same
code as the training samples (`prompt_for_generation`): the image where the template puts it (first in the user's
turn, as LLaVA does, unless the question holds `<image>`), then the assistant's header. Answers stop at the
template's stop tokens; greedy at temperature 0. Batched: one left-padded `generate` for many questions.

The model directory records the id of the image tokenizer it was trained with (`image_tokenizer_id`); a tokenizer
with another id is refused, naming both (a converted release records none: then the feature grid is checked).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import torch
from torch import Tensor

from tokenflow.llm.checkpoint import read_model_config
from tokenflow.llm.i2t import I2TModel
from tokenflow.llm.templates import prompt_for_generation, stop_token_ids


class Assistant:
    def __init__(self, model: I2TModel, image_tokenizer, text_tokenizer, *, expected_tokenizer_id: str | None = None):
        grid = image_tokenizer.scales[-1] ** 2
        if expected_tokenizer_id is not None and image_tokenizer.fingerprint() != expected_tokenizer_id:
            raise ValueError(
                f"the model was trained on image tokenizer {expected_tokenizer_id!r}, but the tokenizer given is "
                f"{image_tokenizer.fingerprint()!r}: pass the tokenizer the model was trained with"
            )
        if grid != model.config.image_tokens or image_tokenizer.code_dim != model.config.code_dim:
            raise ValueError(
                f"the model reads {model.config.image_tokens} feature rows of {model.config.code_dim} per image, the "
                f"image tokenizer gives {grid} of {image_tokenizer.code_dim}"
            )
        self.model, self.image_tokenizer, self.text_tokenizer = model.eval(), image_tokenizer, text_tokenizer
        self.template = model.config.template
        self.stop = stop_token_ids(self.template, text_tokenizer)

    @classmethod
    def load(cls, model_dir: str, tokenizer_dir: str, *, device="cpu", storage_options: dict | None = None):
        """A trained (`jobs/train_i2t.py`) or converted model directory, and the image tokenizer it reads."""
        from transformers import AutoTokenizer

        from tokenflow.tokenizer import Tokenizer

        payload = read_model_config(model_dir, storage_options=storage_options, kind="i2t")
        image_tokenizer = Tokenizer.from_pretrained(tokenizer_dir, storage_options=storage_options, device=device)
        model = I2TModel.from_pretrained(model_dir, device=device, storage_options=storage_options)
        with _local_copy(model_dir, storage_options) as local:
            text_tokenizer = AutoTokenizer.from_pretrained(local)
        return cls(model, image_tokenizer, text_tokenizer, expected_tokenizer_id=payload.get("image_tokenizer_id"))

    @property
    def device(self) -> torch.device:
        return self.model.projector[0].weight.device

    def encode_images(self, images: Sequence) -> Tensor:
        """PIL images, encoded bytes or paths -> token indices (n, T), as the pretokenize job writes them."""
        tok = self.image_tokenizer
        return tok.encode(tok.preprocess(list(images)).to(tok.device))

    def answer(self, images: Sequence, questions: Sequence[str], **generation) -> list[str]:
        """One answer per question; `images[i]` is a PIL image, bytes, a path, or None (a text-only question)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        present = [im for im in images if im is not None]
        indices = iter(self.encode_images(present)) if present else iter(())
        return self.answer_tokens([None if im is None else next(indices) for im in images], questions, **generation)

    @torch.no_grad()
    def answer_tokens(
        self,
        tokens: Sequence,
        questions: Sequence[str],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        streamer=None,
    ) -> list[str]:
        """As `answer`, from each image's token indices (a token shard's `tokens`; None: no image)."""
        if len(tokens) != len(questions):
            raise ValueError(f"{len(tokens)} token rows for {len(questions)} questions")
        prompts, where, rows = [], [], []
        for t, question in zip(tokens, questions, strict=True):
            ids, index = prompt_for_generation(
                self.template, self.text_tokenizer, [{"from": "human", "value": question}], has_image=t is not None
            )
            prompts.append(ids)
            where.append(index)
            if t is not None:
                rows.append(torch.as_tensor(t, dtype=torch.long).reshape(-1))
        tok = self.image_tokenizer
        if rows:
            features = tok.features(torch.stack(rows).to(tok.device)).float()
        else:
            features = torch.zeros(0, self.model.config.image_tokens, self.model.config.code_dim)
        answers = self.model.generate(
            prompts,
            where,
            features,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop,
            temperature=temperature,
            top_p=top_p,
            generator_seed=seed,
            streamer=streamer,
        )
        return [self.text_tokenizer.decode(a, skip_special_tokens=True) for a in answers]


class _local_copy:
    """A local directory with a model directory's files (the directory itself when it is local)."""

    def __init__(self, path: str, storage_options: dict | None):
        self.path, self.options, self.tmp = path, storage_options or {}, None

    def __enter__(self) -> str:
        if "://" not in self.path:
            return self.path
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.path, **self.options)
        self.tmp = tempfile.TemporaryDirectory()
        for name in fs.ls(root, detail=False):
            base = os.path.basename(name.rstrip("/"))
            if base != "model.safetensors":  # the weights are read separately
                fs.get(name, os.path.join(self.tmp.name, base))
        return self.tmp.name

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
