"""What jobs/generate.py writes, without sampling: the rows, both output layouts, samples.parquet, prompt files."""

import json

import pyarrow.parquet as pq
import pytest

from jobs.generate import read_prompts
from pipelines.generate import GenerateConfig, OutputWriter


def cfg(tmp_path, **kw) -> GenerateConfig:
    base = dict(model="m", tokenizer="t", output=str(tmp_path / "out"), prompts=["a cat", "a red car"])
    return GenerateConfig(**{**base, **kw})


def test_rows_give_every_image_its_own_seed(tmp_path):
    rows = cfg(tmp_path, images_per_prompt=3, seed=100).rows()
    assert [r["index"] for r in rows] == list(range(6))
    assert [(r["prompt_index"], r["image"]) for r in rows] == [(p, i) for p in range(2) for i in range(3)]
    assert [r["seed"] for r in rows] == list(range(100, 106))


def test_plain_layout_and_samples_parquet(tmp_path):
    writer = OutputWriter(cfg(tmp_path))
    writer.add(1, 1, 0, "a red car", 1, [4, 5], b"png1")
    writer.add(0, 0, 0, "a cat", 0, [1, 2], b"png0")
    assert writer.close() == 2
    out = tmp_path / "out"
    assert (out / "images" / "00000.png").read_bytes() == b"png0"
    assert (out / "images" / "00001.png").read_bytes() == b"png1"
    assert pq.read_table(out / "samples.parquet").to_pylist() == [
        {"index": 0, "prompt": "a cat", "seed": 0, "tokens": [1, 2]},
        {"index": 1, "prompt": "a red car", "seed": 1, "tokens": [4, 5]},
    ]


def test_geneval_layout_from_its_metadata_file(tmp_path):
    lines = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"},
    ]
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(x) + "\n" for x in lines))
    prompts, metadata = read_prompts(str(meta))
    assert prompts == ["a photo of a cat", "a red car"] and metadata == lines
    c = cfg(tmp_path, prompts=prompts, metadata=metadata, images_per_prompt=2, geneval_layout=True)
    writer = OutputWriter(c)
    for r in c.rows():
        writer.add(r["index"], r["prompt_index"], r["image"], r["prompt"], r["seed"], [0], b"x")
    writer.close()
    out = tmp_path / "out"
    for p, line in enumerate(lines):  # <prompt:05d>/metadata.jsonl and samples/<n:04d>.png, as GenEval reads
        assert json.loads((out / f"{p:05d}" / "metadata.jsonl").read_text()) == line
        assert sorted(x.name for x in (out / f"{p:05d}" / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert len(pq.read_table(out / "samples.parquet")) == 4


def test_prompt_files_and_config_errors(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n\na dog\n")
    assert read_prompts(str(text)) == (["a cat", "a dog"], None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object with a string 'prompt'"):
        read_prompts(str(bad))
    with pytest.raises(ValueError, match="no prompts"):
        cfg(tmp_path, prompts=[])
    with pytest.raises(ValueError, match="--loop must be one of"):
        cfg(tmp_path, loop=4)
    with pytest.raises(ValueError, match="one entry per pass"):
        cfg(tmp_path, loop=3, top_k=[1, 1])
    assert cfg(tmp_path, loop=3, top_k=[5, 5, 1]).sampling_config().top_k == (5, 5, 1)
