"""The FlexAttention path of the text-to-image model against the SDPA path: the same mask token by token, the same
loss, logits and gradients, with activation checkpointing too; cached steps refused.

torch (2.14) runs FlexAttention on CPU eagerly, through the reference implementation of its operator (the math the
GPU kernels are tested against), but refuses the backward at the API's entry. The gradient tests lift that one
check (`cpu_flex_backward`) so the model's wiring (mask, GQA, scale, dtypes, checkpointing) is compared on CPU.
"""

import json

import pytest
import torch
import torch.nn.attention.flex_attention as flex
from torch.nn.attention.flex_attention import BlockMask, create_mask

from tests.unit.t2i_builders import CODES, SCALES, T, layout, model, quantizer, training_batch
from tokenflow.llm.kv_cache import KVCache
from tokenflow.llm.mask import t2i_attention_mask, t2i_mask_mod
from tokenflow.llm.t2i import T2IConfig, T2IModel, decoder_config

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

RELEASED_SCALES = (1, 2, 4, 6, 8, 10, 12, 14, 16)  # 817 image tokens


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Let FlexAttention's reference backward run on CPU (torch refuses it by a device check, nothing else)."""
    if not hasattr(flex, "_validate_device"):
        pytest.skip("this torch has no FlexAttention device check to lift")
    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)


def batch(captions=((10, 11, 12), (13,) * 12, (14,) * 5), seed=0):
    """Left-padded rows of three text lengths (the last one cut to the layout's 8 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CODES, (len(captions), T), generator=g)
    return training_batch(layout(), [list(c) for c in captions], tokens, quantizer())


def pair(**config) -> tuple[T2IModel, T2IModel]:
    """Two copies of one tiny model (4 query heads over 2 KV heads), in training mode: SDPA and flex."""
    sdpa = model().train()
    if config:
        sdpa = T2IModel(T2IConfig(**{**sdpa.config.to_dict(), **config})).train()
    other = T2IModel(sdpa.config, attention="flex").train()
    other.load_state_dict(sdpa.state_dict())
    return sdpa, other


def token_mask(block_mask: BlockMask, length: int) -> torch.Tensor:
    """(B, 1, L, L): what the kernel computes, from the block lists alone: full blocks attend everywhere, partial
    blocks where the mask_mod says so, every other block nowhere."""
    q_block, kv_block = block_mask.BLOCK_SIZE

    def tokens(num_blocks, indices):
        blocks = flex._ordered_to_dense(num_blocks, indices, indices.shape[-1]).bool()
        return blocks.repeat_interleave(q_block, -2).repeat_interleave(kv_block, -1)[..., :length, :length]

    batch = block_mask.kv_num_blocks.shape[0]
    exact = create_mask(block_mask.mask_mod, batch, 1, length, length, device="cpu")
    partial = tokens(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = tokens(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return full | (partial & exact)


def test_the_block_mask_is_the_dense_mask_at_the_released_layout():
    """128 text positions, 817 image tokens, </img> and EOS: 947 = 7 blocks of 128 and a partial one."""
    text, length = 128 + 1, 128 + 1 + 817 + 2
    valid = torch.ones(3, length, dtype=torch.bool)
    valid[1, :40], valid[2, :127] = False, False  # left padding
    m = T2IModel(
        T2IConfig(llm=decoder_config(), scales=RELEASED_SCALES, codebook_size=CODES, code_dim=40), attention="flex"
    )
    block_mask = m.training_mask(valid, text)
    dense = t2i_attention_mask(valid, text, RELEASED_SCALES)
    assert isinstance(block_mask, BlockMask) and block_mask.shape == (3, 1, length, length)
    assert block_mask.BLOCK_SIZE == (128, 128)
    assert torch.equal(create_mask(block_mask.mask_mod, 3, 1, length, length, device="cpu"), dense)
    assert torch.equal(token_mask(block_mask, length), dense)
    blocks = block_mask.to_dense()
    assert blocks.sum() < blocks.numel()  # the kernel skips blocks (the text never sees the image)
    assert block_mask.full_kv_num_blocks.sum() > 0  # and runs others without evaluating the mask


def test_the_mask_mod_is_the_dense_mask():
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :4] = False
    mod = t2i_mask_mod(valid, 9, SCALES)
    assert torch.equal(create_mask(mod, 2, 1, 30, 30, device="cpu"), t2i_attention_mask(valid, 9, SCALES))


def test_flex_gives_the_sdpa_loss_logits_and_gradients(cpu_flex_backward):
    sdpa, other = pair()
    data = batch()
    out_a, out_b = sdpa(**data), other(**data)
    (out_a.loss_sum / out_a.count).backward()
    (out_b.loss_sum / out_b.count).backward()
    for field in ("loss_sum", "image_loss_sum", "text_loss_sum", "correct_per_scale"):
        torch.testing.assert_close(getattr(out_b, field), getattr(out_a, field), atol=1e-5, rtol=1e-5, msg=field)
    for (name, pa), pb in zip(sdpa.named_parameters(), other.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-5, msg=name)

    # the hidden states and logits of every position, padded rows included
    s, length = data["image_start"], data["input_ids"].shape[1]
    with torch.no_grad():
        x = sdpa.embed_sequence(data["input_ids"], data["image_inputs"], s)
        pos = torch.arange(length).unsqueeze(0)
        h_a = sdpa.backbone(x, sdpa.training_mask(data["key_valid"], s), pos)
        h_b = other.backbone(x, other.training_mask(data["key_valid"], s), pos)
    torch.testing.assert_close(h_b, h_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other.image_logits(h_b), sdpa.image_logits(h_a), atol=1e-5, rtol=1e-5)


def test_flex_with_activation_checkpointing(cpu_flex_backward):
    """Checkpointed layers take the BlockMask as an argument and run FlexAttention again in the backward."""
    plain, _ = pair()
    _, other = pair(activation_checkpointing=True)
    other.load_state_dict(plain.state_dict())
    data = batch(seed=1)
    for m in (plain, other):
        out = m(**data)
        (out.loss_sum / out.count).backward()
    for (name, p), pb in zip(plain.named_parameters(), other.parameters()):
        torch.testing.assert_close(pb.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_a_cached_step_refuses_a_block_mask():
    m = model().set_attention("flex")
    data = batch()
    s, length = data["image_start"], data["input_ids"].shape[1]
    x = m.embed_sequence(data["input_ids"], data["image_inputs"], s)
    block_mask = m.training_mask(data["key_valid"], s)
    cache = KVCache(m.num_layers, max_len=length)
    with pytest.raises(ValueError, match="cached steps take a dense mask"):
        m.backbone(x, block_mask, torch.arange(length).unsqueeze(0), cache)
    assert cache.length == 0


def test_the_choice_is_checked_and_not_saved(tmp_path):
    with pytest.raises(ValueError, match="attention must be one of"):
        model().set_attention("eager")
    with pytest.raises(ValueError, match="no attention dropout"):
        model(attention_dropout=0.1).set_attention("flex")
    m = model().set_attention("flex")
    m.save_pretrained(tmp_path / "m")
    assert "attention" not in json.loads((tmp_path / "m" / "config.json").read_text())["config"]
    assert T2IModel.from_pretrained(tmp_path / "m").attention == "sdpa"
    again = T2IModel.from_pretrained(tmp_path / "m", attention="flex")
    assert again.attention == "flex" and isinstance(
        again.training_mask(torch.ones(1, 30, dtype=torch.bool), 9), BlockMask
    )
