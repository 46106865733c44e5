"""CodeFeatures: a saved tokenizer's codebooks without its encoders and decoders, equal to the whole Tokenizer's
features and fingerprint; loading it (and the LLM jobs' worker modules) never imports open_clip."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenflow import Tokenizer
from tokenflow.codes import CodeFeatures


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("tiny").eval()
    path = tmp_path_factory.mktemp("codes") / "tok"
    tok.save_pretrained(path)
    return tok, path


def test_features_and_fingerprint_equal_the_whole_tokenizer(saved):
    tok, path = saved
    codes = CodeFeatures.from_pretrained(path)
    assert codes.fingerprint() == tok.fingerprint() == Tokenizer.from_pretrained(path).fingerprint()
    assert codes.scales == tok.scales and codes.codebook_size == tok.codebook_size and codes.code_dim == tok.code_dim
    ids = torch.randint(0, tok.codebook_size, (3, tok.tokens_per_image), generator=torch.Generator().manual_seed(1))
    assert torch.equal(codes.features(ids), tok.features(ids))
    # the quantizer alone is loaded: no encoder or decoder weights
    assert set(codes.state_dict()) == {"quantizer." + k for k in tok.model.quantizer.state_dict()}
    shared = CodeFeatures.of(tok)
    assert shared.quantizer is tok.model.quantizer and shared.fingerprint() == tok.fingerprint()


def test_index_errors_are_the_tokenizers(saved):
    tok, path = saved
    codes = CodeFeatures.from_pretrained(path)
    with pytest.raises(ValueError, match=rf"indices out of range \[0, {tok.codebook_size}\)"):
        codes.features(torch.full((1, tok.tokens_per_image), tok.codebook_size))
    with pytest.raises(ValueError, match=r"expected indices of shape \(B, T\)"):
        codes.features(torch.zeros(tok.tokens_per_image, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        codes.features(torch.zeros(1, tok.tokens_per_image))


def test_a_file_whose_codebook_does_not_match_its_config_is_refused(saved, tmp_path):
    _, path = saved
    state = load_file(path / "model.safetensors")
    key = next(k for k in state if k.startswith("model.quantizer.") and state[k].ndim == 2)
    state[key] = state[key][:-1]
    (tmp_path / "bad").mkdir()
    save_file(state, tmp_path / "bad" / "model.safetensors")
    (tmp_path / "bad" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=rf"does not match its config: shape mismatch: {key}: file"):
        CodeFeatures.from_pretrained(tmp_path / "bad")
    payload = json.loads((path / "config.json").read_text())
    payload["format_version"] = 99
    (tmp_path / "bad" / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="written by a newer tokenflow"):
        CodeFeatures.from_pretrained(tmp_path / "bad")


def test_the_llm_workers_modules_do_not_import_open_clip(saved):
    """The LLM training workers load the codebooks only: importing their modules and loading CodeFeatures must not
    pull in open_clip (3.5 s per process, and no vision tower is needed)."""
    _, path = saved
    code = (
        "import sys; import pipelines.train_i2t, pipelines.train_t2i, pipelines.llm_train, tokenflow.train.deepspeed;"
        "import tokenflow.llm.i2t_step, tokenflow.llm.t2i_step, tokenflow.llm.sampling;"
        f"from tokenflow.codes import CodeFeatures; CodeFeatures.from_pretrained({str(path)!r});"
        "print(sorted(m for m in ('open_clip', 'timm', 'tokenflow.tokenizer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
