"""The understanding model: image rows spliced at the right place, the loss against a per-sample reference (padding
by position, pad == EOS still supervised), the projector in the graph without images, generation batched equal to
one at a time and to a plain greedy loop, save/load."""

import pytest
import torch
import torch.nn.functional as F

from tokenflow.llm.i2t import IGNORE, I2TConfig, I2TModel
from tokenflow.llm.t2i import decoder_config

N, D = 4, 40  # image rows per sample, code width
EOS = 2


def tiny(**llm) -> I2TModel:
    torch.manual_seed(0)
    return I2TModel(I2TConfig(llm=decoder_config(vocab_size=64, **llm), image_tokens=N)).eval()


def batch():
    """Three samples, right-padded with EOS (pad == eos): image at 1, text-only, image at 0."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((3, 7), EOS)
    ids[0, :6] = torch.tensor([1, 10, 11, 12, 13, EOS])
    ids[1, :4] = torch.tensor([1, 20, 21, EOS])
    ids[2, :7] = torch.tensor([30, 31, 32, 33, 34, 35, EOS])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3:6] = ids[0, 3:6]  # the answer and its EOS
    labels[1, 2:4] = ids[1, 2:4]
    labels[2, 4:7] = ids[2, 4:7]
    lengths = torch.tensor([6, 4, 7])
    index = torch.tensor([1, -1, 0])
    features = torch.randn(2, N, D, generator=g)
    return ids, labels, lengths, index, features


def test_splice_puts_the_image_rows_at_the_index_and_masks_their_labels():
    m = tiny()
    ids, labels, lengths, index, features = batch()
    x, mask, lab = m.splice(ids, lengths, index, features, labels)
    text = m.llm.get_input_embeddings()(ids)
    rows = m.projector(features)
    assert x.shape == (3, 7 + N, m.hidden_size)
    assert mask.sum(1).tolist() == [6 + N, 4, 7 + N]
    torch.testing.assert_close(x[0, :1], text[0, :1])
    torch.testing.assert_close(x[0, 1 : 1 + N], rows[0])
    torch.testing.assert_close(x[0, 1 + N : 6 + N], text[0, 1:6])
    torch.testing.assert_close(x[1, :4], text[1, :4])
    torch.testing.assert_close(x[2, :N], rows[1])
    assert (lab[0, 1 : 1 + N] == IGNORE).all() and lab[0, 1 + N + 2 : 1 + N + 5].tolist() == [12, 13, EOS]
    assert (x[1, 4:] == 0).all() and not mask[1, 4:].any()

    xl, ml, _ = m.splice(ids, lengths, index, features, padding="left")  # generation: the same rows, on the right
    for b in range(3):
        torch.testing.assert_close(xl[b][ml[b]], x[b][mask[b]])


def test_loss_is_the_sum_of_each_sample_alone_and_eos_is_supervised_when_pad_is_eos():
    m = tiny()
    ids, labels, lengths, index, features = batch()
    out = m(ids, labels, lengths, index, features)
    x, mask, lab = m.splice(ids, lengths, index, features, labels)
    total, count = 0.0, 0
    for b in range(3):  # each sample alone, unpadded
        n = int(mask[b].sum())
        logits = m.llm(inputs_embeds=x[b : b + 1, :n]).logits[0, :-1]
        target = lab[b, 1:n]
        keep = target != IGNORE
        total += F.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    assert int(out.count) == count == 8  # 3 + 2 + 3 supervised, every EOS among them although EOS is the pad id
    torch.testing.assert_close(out.loss_sum, total, rtol=1e-5, atol=1e-5)


def test_the_projector_stays_in_the_graph_without_images():
    m = tiny().train()
    ids, labels, lengths, _, _ = batch()
    out = m(ids, labels, lengths, torch.tensor([-1, -1, -1]), torch.zeros(0, N, D))
    out.loss_sum.backward()
    for p in m.projector.parameters():  # gradients exist (zeros): ZeRO reduces them like every other
        assert p.grad is not None and not p.grad.any()


def test_bad_inputs_are_refused():
    m = tiny()
    ids, labels, lengths, index, features = batch()
    with pytest.raises(ValueError, match="2 samples have an image but 1 feature maps"):
        m(ids, labels, lengths, index, features[:1])
    with pytest.raises(ValueError, match=r"features must be \(n, 4, 40\)"):
        m(ids, labels, lengths, index, features[:, :3])


def greedy_reference(m: I2TModel, ids: list[int], index: int | None, features, steps: int) -> list[int]:
    """Recompute everything at every step, no cache, no padding."""
    out = []
    for _ in range(steps):
        row = torch.tensor([ids + out])
        idx = torch.tensor([-1 if index is None else index])
        x, _, _ = m.splice(row, torch.tensor([row.shape[1]]), idx, features)
        nxt = int(m.llm(inputs_embeds=x).logits[0, -1].argmax())
        if nxt == EOS:
            break
        out.append(nxt)
    return out


def test_batched_generation_equals_one_at_a_time_and_a_plain_greedy_loop():
    m = tiny()
    _, _, _, _, features = batch()
    prompts = [[1, 10, 11], [1, 20, 21, 22, 23, 24], [30]]
    index = [1, None, 0]
    together = m.generate(prompts, index, features, max_new_tokens=6, eos_token_id=EOS)
    alone = [
        m.generate(
            [p], [i], features[k : k + 1] if i is not None else features[:0], max_new_tokens=6, eos_token_id=EOS
        )[0]
        for p, i, k in zip(prompts, index, [0, 0, 1])
    ]
    assert together == alone
    assert together[0] == greedy_reference(m, prompts[0], 1, features[:1], 6)
    assert together[1] == greedy_reference(m, prompts[1], None, features[:0], 6)
    assert all(len(a) > 0 for a in together)


def test_save_and_load_round_trip(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path / "m", extra={"image_tokenizer_id": "abc"})
    again = I2TModel.from_pretrained(tmp_path / "m")
    for (k, a), (k2, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids, labels, lengths, index, features = batch()
    torch.testing.assert_close(
        m(ids, labels, lengths, index, features).loss_sum, again(ids, labels, lengths, index, features).loss_sum
    )


def test_each_model_refuses_the_other_kind(tmp_path):
    from tests.unit.t2i_builders import model as t2i_model
    from tokenflow.llm.t2i import T2IModel

    tiny().save_pretrained(tmp_path / "i2t")
    t2i_model().save_pretrained(tmp_path / "t2i")
    with pytest.raises(ValueError, match="holds an understanding .* not a text-to-image model"):
        T2IModel.from_pretrained(tmp_path / "i2t")
    with pytest.raises(ValueError, match="holds a text-to-image model, not an understanding"):
        I2TModel.from_pretrained(tmp_path / "t2i")
