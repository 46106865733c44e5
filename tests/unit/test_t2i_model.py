"""The text-to-image model: its layers against a plain reading of the official ones, information flow, the loss,
both heads, save/load."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.unit.t2i_builders import CODES, SCALES, T, layout, model, quantizer, training_batch
from tokenflow.llm.mask import t2i_attention_mask
from tokenflow.llm.t2i import T2IConfig, T2IModel, decoder_config


def randomize_norms(m: T2IModel, seed: int = 0) -> None:
    """Norm gains away from 1, so a wrong order of norms or a missing QK-norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def reference_backbone(m: T2IModel, x, mask, positions):
    """The official layer written out: q, k, v; QK-norm over the head dim; RoPE; softmax(qk/sqrt(d) + bias) with a
    float bias (-inf where masked) in fp32; h = x + norm1(attn(x)); out = h + norm2(mlp(h)); the final norm."""
    cfg = m.llm.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    ang = positions[0].float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        half = t.shape[-1] // 2
        rot = torch.cat([-t[..., half:], t[..., :half]], -1)
        return t * cos + rot * sin

    bias = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    b, n, _ = x.shape
    for i, layer in enumerate(m.llm.model.layers):
        a = layer.self_attn
        q = (x @ a.q_proj.weight.T).view(b, n, heads, d).transpose(1, 2)
        k = (x @ a.k_proj.weight.T).view(b, n, kv_heads, d).transpose(1, 2)
        v = (x @ a.v_proj.weight.T).view(b, n, kv_heads, d).transpose(1, 2)
        q = rope(rms(q, m.qk_norm[i].query_norm.weight, 1e-6))
        k = rope(rms(k, m.qk_norm[i].key_norm.weight, 1e-6))
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d) + bias, dim=-1, dtype=torch.float32)
        o = (att @ v).transpose(1, 2).reshape(b, n, -1) @ a.o_proj.weight.T
        x = x + rms(o, layer.input_layernorm.weight, cfg.rms_norm_eps)
        mlp = layer.mlp
        hid = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        x = x + rms(hid @ mlp.down_proj.weight.T, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
    return rms(x, m.llm.model.norm.weight, cfg.rms_norm_eps)


def batch(q=None, captions=((10, 11, 12), (13,) * 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CODES, (len(captions), T), generator=g)
    return training_batch(layout(), [list(c) for c in captions], tokens, q or quantizer())


def test_backbone_is_the_official_layer():
    m = model()
    randomize_norms(m)
    b = batch()
    x = m.embed_sequence(b["input_ids"], b["image_inputs"], b["image_start"])
    mask = t2i_attention_mask(b["key_valid"], b["image_start"], SCALES)
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    with torch.no_grad():
        got = m.backbone(x, mask, pos)
        want = reference_backbone(m, x, mask, pos)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_inputs_text_image_and_end_positions():
    m = model()
    b = batch()
    s = b["image_start"]
    with torch.no_grad():
        x = m.embed_sequence(b["input_ids"], b["image_inputs"], s)
        emb, lvl, pos = m.llm.get_input_embeddings().weight, m.level_embed.weight, m.pos_embed.weight
        ids = b["input_ids"]
        # text: token embedding + level row 0; the last <img> position also carries position row 0
        torch.testing.assert_close(x[:, : s - 1], emb[ids[:, : s - 1]] + lvl[0])
        torch.testing.assert_close(x[:, s - 1], emb[ids[:, s - 1]] + lvl[0] + pos[0])
        # image position p predicts token p + 1: projector(input) + level row (its scale + 1) + position row p + 1
        proj = m.projector(b["image_inputs"])
        levels = torch.tensor([2] * 4 + [3] * 9)
        torch.testing.assert_close(x[:, s : s + T - 1], proj + lvl[levels] + pos[1:T])
        # the last image position is a zero input plus level row 0; </img> and EOS are text
        torch.testing.assert_close(x[:, s + T - 1], lvl[0].expand(2, -1))
        torch.testing.assert_close(x[:, s + T :], emb[ids[:, s + T :]] + lvl[0])


def image_logits_of(m, b):
    s = b["image_start"]
    x = m.embed_sequence(b["input_ids"], b["image_inputs"], s)
    mask = t2i_attention_mask(b["key_valid"], s, SCALES)
    h = m.backbone(x, mask, torch.arange(x.shape[1]).unsqueeze(0))
    return m.image_logits(h[:, s - 1 : s - 1 + T]), h


def test_a_scale_sees_coarser_scales_only_and_padding_is_positional():
    m, q = model(), quantizer()
    b = batch(q)
    base, _ = image_logits_of(m, b)
    # change the tokens of scale 1 (positions 1..4): predictions of scales 0 and 1 unchanged, scale 2 changes
    tokens = b["image_tokens"].clone()
    tokens[:, 1:5] = (tokens[:, 1:5] + 7) % CODES
    changed = dict(b, image_tokens=tokens, image_inputs=q.teacher_forcing_inputs(tokens))
    other, _ = image_logits_of(m, changed)
    torch.testing.assert_close(other[:, :5], base[:, :5], atol=1e-6, rtol=0)
    assert (other[:, 5:] - base[:, 5:]).abs().max() > 1e-3
    # change the ids under padding (row 0 pads the first 4 text positions): nothing changes
    ids = b["input_ids"].clone()
    ids[0, :4] = 123
    padded, _ = image_logits_of(m, dict(b, input_ids=ids))
    torch.testing.assert_close(padded, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", ["image", "unified"])
def test_loss_sums_and_counts(head):
    m = model(head=head)
    b = batch()
    out = m(**b)
    s = b["image_start"]
    with torch.no_grad():
        img_logits, h = image_logits_of(m, b)
        suffix_logits = m.text_logits(h[:, s + T - 1 : -1])
        ce_img = F.cross_entropy(img_logits.flatten(0, 1), b["image_tokens"].flatten(), reduction="sum")
        if head == "unified":  # the full extended vocabulary, as the released model was trained
            full = m.text_logits(h[:, s - 1 : s - 1 + T])
            start = m.config.image_token_start
            assert start == 512 + 1 and full.shape[-1] == 512 + 1 + CODES
            ce_img = F.cross_entropy(full.flatten(0, 1), (b["image_tokens"] + start).flatten(), reduction="sum")
            torch.testing.assert_close(img_logits, full[..., start:])
        ce_suf = F.cross_entropy(suffix_logits.flatten(0, 1), b["input_ids"][:, s + T :].flatten(), reduction="sum")
        labels = b["text_labels"][:, 1:]
        keep = labels != -100
        ce_txt = F.cross_entropy(m.text_logits(h[:, : s - 1][keep]), labels[keep], reduction="sum")
    assert out.count.item() == 2 * (T + 3) and out.image_count.item() == 2 * T
    torch.testing.assert_close(out.loss_sum.detach(), ce_img + ce_suf)
    torch.testing.assert_close(out.image_loss_sum, ce_img)
    torch.testing.assert_close(out.text_loss_sum, ce_txt)
    assert (
        out.text_count.item() == keep.sum().item() == (3 + 2) + (7 + 2)
    )  # caption after BOS (cut to 8 ids), then <img>
    assert out.tokens_per_scale.tolist() == [2, 8, 18]
    hits = (img_logits.argmax(-1) == b["image_tokens"]).float()
    assert out.correct_per_scale.tolist() == [hits[:, :1].sum(), hits[:, 1:5].sum(), hits[:, 5:].sum()]
    # the text loss is logged only: no gradient reaches the model through it
    assert not out.text_loss_sum.requires_grad


@pytest.mark.parametrize("head", ["image", "unified"])
def test_every_parameter_is_trained(head):
    m = model(head=head).train()
    out = m(**batch())
    (out.loss_sum / out.count).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # level row 1 is unused by construction (the official layout); everything else learns
    assert no_grad == [], no_grad
    assert m.level_embed.weight.grad[1].abs().sum() == 0


def test_activation_checkpointing_changes_nothing():
    a = model().train()
    b = T2IModel(T2IConfig(**{**a.config.to_dict(), "activation_checkpointing": True})).train()
    b.load_state_dict(a.state_dict())
    data = batch()
    la, lb = a(**data), b(**data)
    (la.loss_sum / la.count).backward()
    (lb.loss_sum / lb.count).backward()
    torch.testing.assert_close(lb.loss_sum, la.loss_sum)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)


def test_qwen2_decoder_with_biases_and_tied_head(tmp_path):
    m = model(head="unified", model_type="qwen2", tie_word_embeddings=True)
    assert m.llm.model.layers[0].self_attn.q_proj.bias is not None
    assert m.llm.lm_head.weight.data_ptr() == m.llm.get_input_embeddings().weight.data_ptr()
    b = batch()
    loss = m(**b).loss_sum
    m.save_pretrained(tmp_path / "m")
    again = T2IModel.from_pretrained(tmp_path / "m")
    assert again.llm.lm_head.weight.data_ptr() == again.llm.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(again(**b).loss_sum, loss)


@pytest.mark.parametrize("head", ["image", "unified"])
def test_save_and_load_round_trip(tmp_path, head):
    m = model(head=head)
    randomize_norms(m, seed=3)
    b = batch()
    m.save_pretrained(tmp_path / "m", extra={"image_tokenizer": "abc123"})
    payload = json.loads((tmp_path / "m" / "config.json").read_text())
    assert payload["image_tokenizer"] == "abc123" and payload["config"]["head"] == head
    again = T2IModel.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(**b).loss_sum, m(**b).loss_sum, rtol=0, atol=0)
    for (name, p), q in zip(m.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_load_lists_missing_and_unexpected_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    model().save_pretrained(tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    state.pop("pos_embed.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: \['pos_embed.weight'\].*unexpected: \['extra.weight'\]"):
        T2IModel.from_pretrained(tmp_path / "m")


def test_config_errors():
    with pytest.raises(ValueError, match="head must be"):
        T2IConfig(llm=decoder_config(), scales=SCALES, codebook_size=8, code_dim=40, head="both")
    with pytest.raises(ValueError, match="decoder must be one of"):
        T2IConfig(llm=decoder_config(model_type="gpt2"), scales=SCALES, codebook_size=8, code_dim=40)
    with pytest.raises(ValueError, match="sliding-window"):
        model(model_type="qwen2", use_sliding_window=True, sliding_window=4)
    m = model()
    with pytest.raises(ValueError, match="predict tokens 1..13"):
        m.embed_image(torch.zeros(1, 4, 40), 0)
