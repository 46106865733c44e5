"""A tiny understanding model learns to caption four synthetic images from their token features alone (no vision
tower: the features are `Tokenizer.features` of the token indices), and greedy answers then reproduce the captions."""

import torch

from tokenflow import Tokenizer
from tokenflow.config import preset
from tokenflow.llm.i2t import IGNORE, I2TConfig, I2TModel
from tokenflow.llm.t2i import decoder_config
from tokenflow.train import LocalEngine, OptimizerConfig

BOS, EOS, ASK = 1, 2, 3  # ASK: a one-token question after the image
CAPTIONS = [[10, 11, 12], [13, 14], [15, 11, 16, 17], [18]]


def test_a_tiny_model_learns_image_to_caption_and_greedy_answers_reproduce_it():
    torch.manual_seed(0)
    tok = Tokenizer(preset("tiny"))
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, tok.codebook_size, (4, sum(s * s for s in tok.scales)), generator=g)
    features = tok.features(indices)  # (4, 64, 40): the final 8 x 8 grid
    assert features.shape == (4, 64, 40)

    model = I2TModel(I2TConfig(llm=decoder_config(vocab_size=32), image_tokens=64)).train()
    prompt = [BOS, ASK]  # the image goes after BOS
    rows = [prompt + c + [EOS] for c in CAPTIONS]
    width = max(len(r) for r in rows)
    ids = torch.full((4, width), EOS)  # pad == EOS: padding is by length
    labels = torch.full((4, width), IGNORE)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        labels[b, len(prompt) : len(r)] = torch.tensor(r[len(prompt) :])
    lengths = torch.tensor([len(r) for r in rows])
    index = torch.ones(4, dtype=torch.long)

    opt = OptimizerConfig(lr=3e-3, warmup_steps=1, weight_decay=0.0, max_grad_norm=1.0, decoupled_weight_decay=True)
    engine = LocalEngine(model, opt, max_steps=1000)
    for _ in range(60):
        out = engine(ids, labels, lengths, index, features)
        engine.backward(out.loss_sum / out.count)
        engine.step()
    assert float(out.loss_sum.detach() / out.count) < 0.05

    model.eval()
    answers = model.generate([prompt] * 4, [1] * 4, features, max_new_tokens=8, eos_token_id=EOS)
    assert answers == CAPTIONS
