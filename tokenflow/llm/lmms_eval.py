"""The understanding model as an lmms-eval model: `python -m lmms_eval --model tokenflow_llava`.

    pip install 'tokenflow-ray[eval]'
    python -m lmms_eval --model tokenflow_llava \\
        --model_args pretrained=runs/i2t-sft/model,tokenizer=tok/siglip_384,device=cuda,batch_size=8 \\
        --tasks mme,pope --output_path results/ --log_samples

lmms-eval finds the model through the entry point group `lmms_eval.models` (pyproject.toml), which names
`manifest` below; nothing needs importing or registering by hand. Each request goes through
`tokenflow.llm.chat.Assistant.answer`, the same code as `jobs/chat.py`: the prompt is the model's own chat template
(the image first in the user's turn unless the task's text holds `<image>`), answers stop at the template's stop
tokens and then at the task's `until` strings.

model_args (these win over the CLI's --batch_size/--device):
- `pretrained`: the model directory (`jobs/train_i2t.py`'s `model/`, or a converted release), local or a URL;
- `tokenizer`: the image tokenizer the model was trained with (default: the one the model directory records);
- `device` (cpu), `batch_size` (1): questions answered together, in one left-padded `generate`;
- `max_new_tokens` (256): used where the task's generation_kwargs set none (`--gen_kwargs` overrides the task's);
- `seed`: the sampling seed, for tasks that sample (`do_sample: true`, or a temperature above 0 without
  `do_sample`, as lmms-eval's LLaVA models read it); greedy answers need none;
- `storage_options`: JSON, for fsspec (`'{"anon": true}'`).

Generation only: tasks whose output type is `loglikelihood` or `multiple_choice` (scored by likelihood), and
multi-round tasks, are refused with an error naming the task. One image per question: a document with several
gets its first, with a warning. One process: lmms-eval's data parallelism (`accelerate launch`) is not supported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger

MODEL_ID = "tokenflow_llava"


def manifest() -> ModelManifest:
    """The entry point's payload: the model id and where its class is (imported only when that model is asked for)."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.TokenFlowLlava")


class TokenFlowLlava(lmms):
    is_simple = True  # requests carry the task's text and a doc_to_visual, not chat messages

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        device: str | None = "cpu",
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        seed: int | None = None,
        storage_options: str | dict | None = None,
        max_batch_size: int | None = None,  # lmms-eval's CLI passes it; batches are fixed-size here
    ) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(f"{MODEL_ID} runs in one process; run lmms_eval without accelerate launch/torchrun")
        from tokenflow.llm.chat import Assistant
        from tokenflow.llm.checkpoint import read_model_config

        if isinstance(storage_options, str):
            storage_options = json.loads(storage_options)
        pretrained = str(pretrained)
        if tokenizer is None:
            tokenizer = read_model_config(pretrained, storage_options=storage_options, kind="i2t").get(
                "image_tokenizer"
            )
            if tokenizer is None:
                raise ValueError(
                    f"{pretrained} records no image tokenizer: pass the one the model was trained with as "
                    "--model_args pretrained=...,tokenizer=DIR"
                )
        if str(batch_size).startswith("auto"):
            raise ValueError(f"{MODEL_ID} takes a fixed batch size, not {batch_size!r}")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.seed = None if seed is None else int(seed)
        self.assistant = Assistant.load(
            pretrained, str(tokenizer), device=device or "cpu", storage_options=storage_options
        )
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TokenFlowLlava:
        """As lmms' own, except that a model_arg the CLI also passes (batch_size, device) is not given twice:
        the model_arg wins over the CLI's (always present) default."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        for key, value in (additional_config or {}).items():
            if value is not None:
                args.setdefault(key, value)
        return cls(**args)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        groups: dict[str, tuple[dict, tuple[str, ...], list[int]]] = {}  # batched only with the same settings
        for i, request in enumerate(requests):
            generation, until = self._generation(request.args[1])
            key = json.dumps([generation, until], sort_keys=True)
            groups.setdefault(key, (generation, until, []))[2].append(i)

        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="Model Responding", disable=self.rank != 0)
        for generation, until, members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                images = [self._image(requests[i]) for i in chunk]
                questions = [requests[i].args[0] for i in chunk]
                for i, text in zip(chunk, self.assistant.answer(images, questions, **generation), strict=True):
                    answers[i] = _cut(text, until)
                    self.cache_hook.add_partial(
                        "generate_until", (requests[i].args[0], requests[i].args[1]), answers[i]
                    )
                bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        tasks = sorted({str(r.args[4]) for r in requests if len(r.args) > 4})
        raise NotImplementedError(
            f"{MODEL_ID} only generates answers (output_type: generate_until); task(s) {', '.join(tasks) or '?'} "
            "score by log-likelihood (output_type: loglikelihood or multiple_choice)"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        tasks = sorted({str(r.args[-2]) for r in requests})
        raise NotImplementedError(f"{MODEL_ID} answers one question per image; multi-round task(s): {', '.join(tasks)}")

    def _generation(self, gen_kwargs: dict | None) -> tuple[dict, tuple[str, ...]]:
        """A task's generation_kwargs -> Assistant.answer's keywords, and the strings an answer is cut at."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = (until,) if isinstance(until, str) else tuple(until or ())
        # as lmms-eval's LLaVA models: a task that does not say do_sample samples when its temperature is above 0
        t = kw.get("temperature")
        sample = kw.get("do_sample")
        if sample is None:
            sample = t is not None and float(t) > 0
        temperature = (1.0 if t is None else float(t)) if sample else 0.0
        if int(kw.get("num_beams") or 1) > 1:
            self._warn_once("num_beams", f"{MODEL_ID} has no beam search: num_beams={kw['num_beams']} is ignored")
        top_p = kw.get("top_p")
        generation = {
            "max_new_tokens": int(kw.get("max_new_tokens") or self.max_new_tokens),
            "temperature": temperature,
            "top_p": 1.0 if top_p is None else float(top_p),
            "seed": self.seed if temperature > 0 else None,
        }
        return generation, tuple(s for s in until if s)

    def _image(self, request: Instance):
        """The document's image (PIL, bytes or a path) or None for a text-only question."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = [v for v in _flatten(doc_to_visual(self.task_dict[task][split][doc_id])) if v is not None]
        visuals = [(v.get("bytes") or v.get("path") or v) if isinstance(v, dict) else v for v in visuals]  # HF Image
        for v in visuals:
            if isinstance(v, dict) or (isinstance(v, str) and v.lower().endswith(_VIDEO)):
                raise ValueError(f"{MODEL_ID} reads images; task {task} doc {doc_id} gives {str(v)[:80]!r}")
        if len(visuals) > 1:
            self._warn_once(
                f"images:{task}",
                f"{MODEL_ID} reads one image per question: task {task} has documents with "
                f"several (doc {doc_id}: {len(visuals)}); the first is used",
            )
        return visuals[0] if visuals else None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


_VIDEO = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".wav", ".mp3", ".flac")


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def _cut(text: str, until: Sequence[str]) -> str:
    """The answer up to the first of the task's stop strings."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text
