"""The text-to-image attention mask against a brute-force reading of its definition, and what it does to SDPA."""

import pytest
import torch
import torch.nn.functional as F

from tokenflow.llm.mask import scale_index, t2i_attention_mask

SCALES = (1, 2, 3)  # T = 14 image tokens


def brute_force(key_valid: torch.Tensor, image_start: int, scales) -> torch.Tensor:
    """Position by position, from the reference's words: causal, pad keys masked; in the block of positions
    image_start - 1 ... image_start + T - 2 (position p predicts image token p - image_start + 1), query i may
    attend key j iff the scale i predicts >= the scale j predicts; a padding query attends itself."""
    token_scale = [k for k, s in enumerate(scales) for _ in range(s * s)]
    first, last = image_start - 1, image_start - 1 + len(token_scale) - 1
    batch, length = key_valid.shape
    out = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                if i == j:
                    ok = True
                elif not key_valid[b, j]:
                    ok = False
                elif first <= i <= last and first <= j <= last:
                    ok = token_scale[i - first] >= token_scale[j - first]
                else:
                    ok = j <= i
                out[b, 0, i, j] = ok
    return out


def left_padded(pads: list[int], length: int) -> torch.Tensor:
    valid = torch.ones(len(pads), length, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    return valid


def test_scale_index():
    assert scale_index(SCALES).tolist() == [0] + [1] * 4 + [2] * 9
    with pytest.raises(ValueError):
        scale_index(())


@pytest.mark.parametrize("text_len,tail", [(1, 0), (5, 3), (8, 2)])
def test_mask_equals_the_brute_force_reading(text_len, tail):
    # [PAD]* text (text_len, ending with <img>) | T image positions | tail (</img> and EOS)
    length = text_len + 14 + tail
    valid = left_padded([0, min(3, text_len - 1)], length)
    got = t2i_attention_mask(valid, text_len, SCALES)
    assert got.shape == (2, 1, length, length) and got.dtype == torch.bool
    assert torch.equal(got, brute_force(valid, text_len, SCALES))


def test_block_structure():
    text, length = 4, 4 + 14 + 2
    mask = t2i_attention_mask(torch.ones(1, length, dtype=torch.bool), text, SCALES)[0, 0]
    first = text - 1  # the last text token predicts the 1x1 scale
    s2 = range(first + 1, first + 5)  # the positions predicting the 2x2 scale
    s3 = range(first + 5, first + 14)
    assert all(mask[i, j] for i in s2 for j in s2)  # bidirectional within a scale
    assert all(mask[i, j] for i in s3 for j in s2) and not any(mask[i, j] for i in s2 for j in s3)
    assert mask[first + 5 :, : first + 1].all()  # every later position sees the whole text prefix
    assert not mask[:first, first + 1 :].any()  # the text never sees the image
    tail = first + 14  # the last image position predicts </img>: causal again, sees every image position
    assert mask[tail, : tail + 1].all() and not mask[tail, tail + 1 :].any()


def test_padding_is_masked_by_position_and_no_row_is_empty():
    length = 6 + 14 + 2
    valid = left_padded([4], length)
    mask = t2i_attention_mask(valid, 6, SCALES)[0, 0]
    assert not mask[4:, :4].any()  # no real query reads a pad key
    assert torch.equal(mask[:4, :4], torch.eye(4, dtype=torch.bool))  # a pad query sees only itself
    assert mask.any(dim=-1).all()


def test_sdpa_predictions_never_depend_on_their_own_or_later_scales():
    """Information flow under SDPA: changing the inputs at positions predicting scale k or later leaves the outputs
    of every position predicting an earlier scale unchanged, and the mask gives no NaN."""
    torch.manual_seed(0)
    text, length, dim = 5, 5 + 14 + 2, 16
    valid = left_padded([0, 2], length)
    mask = t2i_attention_mask(valid, text, SCALES)
    q, k, v = (torch.randn(2, 2, length, dim) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()
    first = text - 1
    for scale_start in (first + 1, first + 5):  # the first position predicting the 2x2, then the 3x3 scale
        k2, v2 = k.clone(), v.clone()
        k2[:, :, scale_start:] += 1.0
        v2[:, :, scale_start:] += 1.0
        out2 = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
        torch.testing.assert_close(out2[:, :, :scale_start], out[:, :, :scale_start], rtol=0, atol=0)
        assert not torch.allclose(out2[:, :, scale_start:], out[:, :, scale_start:])


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        t2i_attention_mask(torch.ones(1, 10, dtype=torch.bool), 2, SCALES)
    with pytest.raises(ValueError, match="bool"):
        t2i_attention_mask(torch.ones(1, 30), 2, SCALES)


def test_the_same_rule_serves_flex_attention():
    """FlexAttention (the GPU path) evaluates the rule element by element under vmap: it must give the dense mask."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from tokenflow.llm.mask import t2i_mask_mod

    length = 5 + 14 + 2
    valid = left_padded([0, 3], length)
    mod = t2i_mask_mod(valid, 5, SCALES)
    materialised = flex.create_mask(mod, 2, 1, length, length, device="cpu")
    assert torch.equal(materialised, t2i_attention_mask(valid, 5, SCALES))
