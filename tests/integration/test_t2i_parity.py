"""The released text-to-image layout converted and run by this project against the official code's outputs.

A tiny official-shaped checkpoint (`tests/parity/t2i_recipe.py`, seed 0: every key and shape of the released
`TokenFlow-t2i`, shrunk to 2 layers) is written as a released directory, converted with
`jobs/convert_checkpoint.py --kind tokenflow-t2i`, and compared with `tests/fixtures/t2i_official/tiny.npz`, made
once by running the official `t2i/llava_t2i` code on the same weights (see the README beside it): teacher-forced
logits within 1e-4, the loss, and greedy samples, identical (cfg 0, cfg 3, and the three-pass refinement).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.parity import t2i_recipe as R
from tests.parity.tokenflow_recipe import official_state_dict
from tokenflow.config import preset
from tokenflow.convert import convert_state_dict
from tokenflow.llm.layout import T2ILayout
from tokenflow.llm.mask import t2i_attention_mask
from tokenflow.llm.sampling import SamplingConfig, T2ISampler
from tokenflow.llm.t2i import T2IModel
from tokenflow.quantize import MultiScaleQuantizer

FIXTURE = Path(__file__).parents[1] / "fixtures" / "t2i_official" / "tiny.npz"
TOL = 1e-4  # logits; greedy codes must be identical


@pytest.fixture(scope="module")
def official():
    return dict(np.load(FIXTURE))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The recipe's weights written as a released directory, converted by the job's command line."""
    from jobs.convert_checkpoint import main

    src, out = tmp_path_factory.mktemp("released"), tmp_path_factory.mktemp("converted") / "t2i"
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "mm_hidden_size": 40,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "",
        "vq_codebook_size": R.CODEBOOK,
        **R.LLM,
    }
    import json

    (src / "config.json").write_text(json.dumps(config))
    state = R.official_t2i_state_dict(0)
    state["image_token_start"] = torch.tensor(R.IMAGE_TOKEN_START)  # the id buffers some saves carry
    state["image_token_end"] = torch.tensor(R.IMAGE_TOKEN_END)
    half = len(state) // 2
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:half]}, src / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[half:]}, src / "model-00002-of-00002.safetensors")
    assert main(["--kind", "tokenflow-t2i", "--input", str(src), "--output", str(out)]) == 0
    return T2IModel.from_pretrained(out)


@pytest.fixture(scope="module")
def quantizer():
    """The clipb_256 codebook of the fixture's image tokenizer (tokenflow_recipe, seed 0)."""
    config, state = convert_state_dict("tokenflow", official_state_dict("clipb_256", seed=0), preset_name="clipb_256")
    q = MultiScaleQuantizer(preset("clipb_256").quantizer)
    prefix = "model.quantizer."
    q.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return q.eval()


def layout() -> T2ILayout:
    return T2ILayout(
        scales=R.SCALES,
        eos_id=R.EOS_ID,
        pad_id=R.PAD_ID,
        image_open=R.IMAGE_OPEN,
        image_close=R.IMAGE_CLOSE,
        bos_id=R.BOS_ID,
        max_text_tokens=R.MAX_TEXT_TOKENS,
    )


def test_conversion_is_complete_and_uses_the_released_vocabulary(converted):
    cfg = converted.config
    assert cfg.head == "unified" and cfg.text_vocab_size == R.TEXT_VOCAB and cfg.codebook_size == R.CODEBOOK
    assert cfg.image_token_start == R.IMAGE_TOKEN_START and cfg.pad_token_id == R.PAD_ID
    assert cfg.scales == R.SCALES
    source = R.official_t2i_state_dict(0)
    torch.testing.assert_close(converted.pos_embed.weight, source["model.pos_1LC"], rtol=0, atol=0)
    torch.testing.assert_close(
        converted.qk_norm[1].key_norm.weight, source["model.layers.1.self_attn.qknorm.key_norm.weight"], rtol=0, atol=0
    )


def teacher_forced(model, q, official):
    lay = layout()
    ids = torch.from_numpy(official["tf_input_ids"])
    tokens = torch.from_numpy(official["tf_image_tokens"])
    prefix = ids[:, : lay.prefix_len]
    valid = prefix != R.PAD_ID  # the fixture's padding is exactly its [PAD] ids (left-padded text)
    with torch.no_grad():
        inputs = q.teacher_forcing_inputs(tokens)
        x = model.embed_sequence(ids, inputs, lay.prefix_len)
        mask = t2i_attention_mask(lay.key_valid(valid), lay.prefix_len, R.SCALES)
        h = model.backbone(x, mask, torch.arange(ids.shape[1]).unsqueeze(0))
        out = model(ids, lay.key_valid(valid), tokens, inputs, lay.prefix_len, lay.text_targets(prefix, valid))
    return model.text_logits(h), out


def test_teacher_forced_logits_match_the_official_model(converted, quantizer, official):
    assert torch.equal(
        torch.from_numpy(official["tf_input_ids"][:, : layout().prefix_len]),
        torch.from_numpy(official["prompt_prefixes"]),
    )
    logits, out = teacher_forced(converted, quantizer, official)
    pos, cols = torch.from_numpy(official["tf_positions"]), torch.from_numpy(official["tf_columns"])
    real = ~torch.from_numpy(official["tf_pad_rows"])  # official [PAD] query rows attend to everything: excluded
    ours = logits[:, pos][:, :, cols]
    want = torch.from_numpy(official["tf_logits"])
    assert real.sum() > 3 * 150
    torch.testing.assert_close(ours[real], want[real], rtol=0, atol=TOL)
    lse = torch.logsumexp(logits[:, pos], dim=-1)
    torch.testing.assert_close(lse[real], torch.from_numpy(official["tf_logsumexp"])[real], rtol=0, atol=TOL)
    # the argmax over the image ids at the 817 positions that predict them
    start = R.IMAGE_TOKEN_START
    argmax = logits[:, R.PREFIX_LEN - 1 : R.PREFIX_LEN - 1 + R.IMAGE_TOKENS, start:].argmax(-1)
    assert torch.equal(argmax, torch.from_numpy(official["tf_image_argmax"]))
    # the optimised loss: image tokens, </img> and EOS over the full vocabulary, per supervised token
    torch.testing.assert_close(
        (out.loss_sum / out.count).float(), torch.tensor(float(official["tf_loss_vision"])), rtol=0, atol=TOL
    )


@pytest.mark.parametrize(
    "name,config",
    [
        ("greedy_cfg0", SamplingConfig(cfg=0.0, top_k=(1,), top_p=(0.0,))),
        ("greedy_cfg3", SamplingConfig(cfg=3.0, top_k=(1,), top_p=(0.0,))),
        ("greedy_loop3", SamplingConfig(cfg=3.0, top_k=(1, 1, 1), top_p=(0.0, 0.0, 0.0))),
    ],
)
def test_greedy_samples_match_the_official_sampler(converted, quantizer, official, name, config):
    lay = layout()
    ids = torch.from_numpy(official["prompt_prefixes"])
    assert official["null_prefix"].tolist() == lay.null_prompt()[0]  # the fixture's unconditional branch
    tokens = T2ISampler(converted, quantizer, lay).sample(ids, ids != R.PAD_ID, config).numpy()
    for b in range(len(ids)):
        differ = tokens[b] != official[name][b]
        gaps = official[f"{name}_gaps"][b][differ]
        assert not differ.any(), f"prompt {b}: {differ.sum()} codes differ (official top-1/top-2 gaps there: {gaps})"
