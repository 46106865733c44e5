"""Adapter around the OFFICIAL TokenFlow text-to-image LLM (ByteFlow-AI/TokenFlow @9812da0, `t2i/llava_t2i`),
for bench/t2i_parity.py.

Nothing of the official code lives in this project: `repo` is a local working tree of the official repository
(`git archive HEAD t2i i2t tokenflow`), imported at run time, in its own venv (transformers exactly 4.43.4: the
official `modeling_llama.py` exits on any other version; `setuptools<81` for its `pkg_resources`).

Construction. The official training path (train.py: a Llama base, `smart_tokenizer_and_embedding_resize([PAD])`,
`initialize_vision_modules`, `initialize_vision_tokenizer` adding 32,768 tokens to a slow tokenizer) takes ~10 min
on CPU for the tokenizer alone and produces nothing a state dict does not fix. Here the official
`LlavaLlamaForCausalLM` is constructed directly from a `LlavaConfig` carrying the fields the released config.json
has (`mm_vision_tower`, `mm_vision_vq_type` "TOKEN_FLOW", `mm_projector_type` "mlp2x_gelu", `mm_use_vq_token`,
`use_mm_proj`, `tokenizer_model_max_length` 2048, `tokenizer_padding_side` "right", `use_cache` False), with
`attn_implementation="eager"` as the official loader asks. Its own `LlavaMetaModel.__init__` then builds the
official `VQTower` (which loads the TokenFlow tokenizer eagerly: `multimodal_encoder/tokenflow.py::tokenflow_model`,
clipb teacher, enhanced decoder, `infer_interpolate`: scales 1..16, 817 tokens), the projector, `lvl_embed`,
`pos_1LC` and the QK-norms. Then, as `reinit_image_token_start_end` (inference) / train.py do, plain attributes
`pad_token_id = 512`, `image_token_start = 513`, `image_token_end = 513 + 32767` are set (no buffers: the released
checkpoint's two 0-d `image_token_start/end` buffers are dropped as unexpected keys by the official loader too).
The seeded `official_t2i_state_dict` is loaded with `strict=True`: nothing is excluded, because the directly
constructed model registers no id buffers, and the rotary `inv_freq` buffers are non-persistent.

Stubs (weight I/O only):
- the tokenizer's `.pt`: `build_vision_tower` needs an existing path and `tokenflow_model` calls
  `torch.load(path)`; the path is an empty placeholder file and `torch.load` of exactly that path returns
  `{"model": tokenizer_state}`, which the official code loads with its own strict `load_state_dict`;
- the CLIP ViT-B/16 download inside the TokenFlow constructor (bench/official/tokenflow.py's stub).

Everything that runs afterwards is official and unmodified: `forward`, `prepare_inputs_labels_for_multimodal_
generation`, `prepare_generation_inputs`, `autoregressive_infer_cfg`, `sample_with_top_k_top_p_`, `VQTower.forward`.
Two observers wrap official functions without changing what they return to the official caller:
`sample_with_top_k_top_p_` (records the top-1/top-2 gap of the logits it is given: after CFG and the text-id mask)
and `VQTower.decode_to_img_pt` (records the sampled codes; the pixel decode is skipped unless `decode=True`,
and then the returned images are zeros).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
from unittest import mock

import torch
from torch import Tensor, nn

from bench.official import tokenflow as official_tokenizer
from tests.parity import t2i_recipe as R

_PLACEHOLDER_NAME = "tokenflow_clipb_32k_enhanced.pt"  # the released t2i tokenizer file name


def _official_t2i(repo: str, module: str):
    """Import `module` (under `llava_t2i`) from the official `t2i/` directory, as its scripts run (cwd t2i/)."""
    root = os.path.join(os.path.abspath(repo), "t2i")
    if not os.path.isfile(os.path.join(root, "llava_t2i", "model", "llava_arch.py")):
        raise FileNotFoundError(f"{repo} does not look like the official TokenFlow tree (no t2i/llava_t2i/)")
    if root not in sys.path:
        sys.path.append(root)
    mod = importlib.import_module(module)
    if not os.path.abspath(mod.__file__).startswith(root + os.sep):
        raise ImportError(f"{module} resolved to {mod.__file__}, not to the official tree under {root}")
    return mod


def official_modules(repo: str):
    """(llava_llama module, vision_tokenizer module, tokenizer.vq_model module), all from the official tree."""
    # The tokenizer first, through bench/official/tokenflow.py: t2i's tokenflow.py then finds the same
    # `tokenizer.vq_model` module in sys.modules (it appends the same directory to sys.path).
    vq_model = official_tokenizer._official(repo, "tokenizer.vq_model")
    llava_llama = _official_t2i(repo, "llava_t2i.model.language_model.llava_llama")
    vision_tokenizer = _official_t2i(repo, "llava_t2i.model.multimodal_encoder.vision_tokenizer")
    return llava_llama, vision_tokenizer, vq_model


@contextlib.contextmanager
def _tokenizer_checkpoint(path: str, tokenizer_state: dict[str, Tensor]):
    real_load = torch.load

    def load(f, *args, **kwargs):
        if isinstance(f, str) and os.path.abspath(f) == os.path.abspath(path):
            return {"model": tokenizer_state}
        return real_load(f, *args, **kwargs)

    with mock.patch.object(torch, "load", load):
        yield


def build_official_t2i(
    repo: str,
    state: dict[str, Tensor] | None = None,
    tokenizer_state: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> nn.Module:
    """The official `LlavaLlamaForCausalLM`, tiny (`t2i_recipe.LLM`), fp32, CPU, eval mode, `state` loaded
    strictly (default `official_t2i_state_dict(seed)`), its VQTower holding the official clipb_256 TokenFlow with
    `tokenizer_state` (default `tokenflow_recipe.official_state_dict("clipb_256", seed)`)."""
    llava_llama, _, vq_model = official_modules(repo)
    if tokenizer_state is None:
        from tests.parity.tokenflow_recipe import official_state_dict

        tokenizer_state = official_state_dict("clipb_256", seed=seed)
    if state is None:
        state = R.official_t2i_state_dict(seed)

    config = llava_llama.LlavaConfig(
        **R.LLM,
        attn_implementation="eager",
        mm_projector_type="mlp2x_gelu",
        mm_vision_vq_type="TOKEN_FLOW",
        mm_use_vq_token=True,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        use_mm_proj=True,
        vq_codebook_size=R.CODEBOOK,
        tokenizer_model_max_length=R.CONTEXT,
        tokenizer_padding_side="right",
        use_cache=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        placeholder = os.path.join(tmp, _PLACEHOLDER_NAME)
        open(placeholder, "wb").close()
        config.mm_vision_tower = placeholder
        with (
            official_tokenizer._no_pretrained_download(vq_model),
            _tokenizer_checkpoint(placeholder, tokenizer_state),
            contextlib.redirect_stdout(sys.stderr),
        ):
            model = llava_llama.LlavaLlamaForCausalLM(config)
    model.config.mm_vision_vq_type = "TOKEN_FLOW"  # build_vision_tower turned it into the enum (train.py undoes it)

    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = R.official_t2i_shapes()
    if got != want:
        raise RuntimeError(
            f"official state_dict differs from t2i_recipe.official_t2i_shapes(): "
            f"only official {sorted(set(got) - set(want))}, only recipe {sorted(set(want) - set(got))}, "
            f"shape mismatches {[(k, got[k], want[k]) for k in set(got) & set(want) if got[k] != want[k]]}"
        )
    model.load_state_dict(state, strict=True)

    # As train.py / reinit_image_token_start_end leave them (plain ints, not buffers).
    model.pad_token_id = R.PAD_ID
    model.image_token_start = R.IMAGE_TOKEN_START
    model.image_token_end = R.IMAGE_TOKEN_END
    model.config.tokenizer_model_max_length = R.CONTEXT
    model.config.use_cache = False
    assert model.config._attn_implementation == "eager", model.config._attn_implementation

    tower = model.get_vision_tower()
    vq = tower.get_vq_model().state_dict()
    if set(vq) != set(tokenizer_state) or any(not torch.equal(vq[k], v) for k, v in tokenizer_state.items()):
        raise RuntimeError("the VQTower's TokenFlow does not hold tokenizer_state")
    assert tower.num_patches == R.IMAGE_TOKENS and tuple(tower.scale_rq_layers) == R.SCALES
    assert tower.hidden_size == R.CODE_DIM and tower.num_codebook_tokens == R.CODEBOOK
    return model.float().eval()


@torch.no_grad()
def official_forward(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor | None = None,
    text_labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
):
    """The official `forward(input_ids=..., images=None, ...)`: image ids in `input_ids` are replaced by the
    projected cascaded code features inside `prepare_inputs_labels_for_multimodal_generation`. Returns the
    official output (logits fp32 (B, L, V); loss = loss_vision + loss_text when labels are given)."""
    return model(
        input_ids=input_ids.clone(),
        attention_mask=None if attention_mask is None else attention_mask.clone(),
        labels=None if labels is None else labels.clone(),
        text_labels=None if text_labels is None else text_labels.clone(),
        images=None,
        use_cache=False,
        return_dict=True,
    )


@torch.no_grad()
def official_generate(
    repo: str,
    model: nn.Module,
    cond_prefixes,
    uncond_prefixes,
    cfg: float,
    topk_list,
    topp_list,
    g_seed: int | None = 0,
    decode: bool = False,
):
    """The official `autoregressive_infer_cfg` on `cond_prefixes + uncond_prefixes` (lists of id lists).

    Returns (codes (B, 817) int64, 0-based; gaps: one (B, l) tensor of top-1 minus top-2 logits per sampling
    call, as the official sampler received them; images (B, 256, 256, 3) uint8 or None)."""
    llava_llama, vision_tokenizer, _ = official_modules(repo)
    real_sample = llava_llama.sample_with_top_k_top_p_
    real_decode = vision_tokenizer.VQTower.decode_to_img_pt
    gaps: list[Tensor] = []
    codes: list[Tensor] = []

    def sample(logits_BlV, *args, **kwargs):
        top2 = logits_BlV.topk(2, dim=-1).values
        gaps.append((top2[..., 0] - top2[..., 1]).clone())
        return real_sample(logits_BlV, *args, **kwargs)

    def decode_to_img_pt(self, codes_Bl):
        codes.append(codes_Bl.detach().clone())
        if decode:
            return real_decode(self, codes_Bl)
        return torch.zeros(codes_Bl.shape[0], 3, 256, 256)

    prefixes = [torch.tensor(p, dtype=torch.long) for p in list(cond_prefixes) + list(uncond_prefixes)]
    with (
        mock.patch.object(llava_llama, "sample_with_top_k_top_p_", sample),
        mock.patch.object(vision_tokenizer.VQTower, "decode_to_img_pt", decode_to_img_pt),
        contextlib.redirect_stdout(sys.stderr),
    ):
        images = model.autoregressive_infer_cfg(
            B=len(cond_prefixes),
            prefix_text_codes=prefixes,
            g_seed=g_seed,
            cfg=cfg,
            topk_list=list(topk_list),
            topp_list=list(topp_list),
        )
    assert len(codes) == 1
    return codes[0].long(), gaps, (images if decode else None)


class IdTokenizer:
    """Duck-typed stand-in for the slow LlamaTokenizer that the official data code (`dataset/process.py`,
    `dataset/dataset.py`) calls, over a text made of `t<id>` words: `"t17 t4"` -> [17, 4]. `<img>`, `</img>`,
    `<vq_token_k>`, `<s>`, `</s>`, `[PAD]` map to `t2i_recipe`'s ids; `encode` prepends BOS unless
    `add_special_tokens=False`, as Llama's does. Lets the official `preprocess` lay out and label a training
    sequence from ids, with no tokenizer model."""

    bos_token, eos_token, pad_token = "<s>", "</s>", "[PAD]"
    model_max_length = R.CONTEXT
    _SPECIAL = {"<s>": R.BOS_ID, "</s>": R.EOS_ID, "[PAD]": R.PAD_ID}

    @staticmethod
    def text(ids) -> str:
        return " ".join(f"t{int(i)}" for i in ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._SPECIAL[token]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        import re

        ids = [R.BOS_ID] if add_special_tokens else []
        pos = 0
        pattern = re.compile(r"\s*(?:<vq_token_(\d+)>|(<img>)|(</img>)|(<s>|</s>|\[PAD\])|t(\d+))")
        while pos < len(text.rstrip()):
            m = pattern.match(text, pos)
            if m is None:
                raise ValueError(f"IdTokenizer cannot read {text[pos : pos + 20]!r}")
            vq, img_open, img_close, special, word = m.groups()
            if vq is not None:
                ids.append(R.IMAGE_TOKEN_START + int(vq))
            elif img_open:
                ids.extend(R.IMAGE_OPEN)
            elif img_close:
                ids.extend(R.IMAGE_CLOSE)
            elif special:
                ids.append(self._SPECIAL[special])
            else:
                ids.append(int(word))
            pos = m.end()
        return ids


def official_training_batch(repo: str, captions, codes: Tensor) -> dict[str, Tensor]:
    """A training batch made by the official data code: `preprocess` under the `plain_img` template
    (scripts/train_t2i.sh: --version plain_img --max_text_token_num 128) per example, with the 817 codes written
    into the image string (instead of `<vq_token_0>` x 817 + `images`, so the forward takes the image ids from
    `input_ids`), then `DataCollatorForSupervisedDataset`. Keys: input_ids, labels, text_labels, attention_mask."""
    conversation = _official_t2i(repo, "llava_t2i.conversation")
    process = _official_t2i(repo, "llava_t2i.dataset.process")
    constants = _official_t2i(repo, "llava_t2i.constants")
    # dataset.py imports `datasets.load_dataset` at module level, used only by its ExampleDataset (HF `datasets`
    # is not in the official venv); a placeholder module stands in for the import if it is missing.
    placeholder = None
    if "llava_t2i.dataset.dataset" not in sys.modules and importlib.util.find_spec("datasets") is None:
        placeholder = sys.modules["datasets"] = type(sys)("datasets")
        placeholder.load_dataset = None
    try:
        dataset = _official_t2i(repo, "llava_t2i.dataset.dataset")
    finally:
        if placeholder is not None and sys.modules.get("datasets") is placeholder:
            del sys.modules["datasets"]

    tok = IdTokenizer()
    instances = []
    with mock.patch.object(conversation, "default_conversation", conversation.conv_templates["plain_img"]):
        for caption, c in zip(captions, codes.tolist()):
            source = {
                "text": tok.text(caption),
                "image": "".join(constants.DEFAULT_VQ_TOKEN_TEMPLATE % k for k in c),
                "label": 0,
            }
            with contextlib.redirect_stdout(sys.stderr):  # it prints a warning for captions over 128 ids
                d = process.preprocess([source], tok, has_image=False, max_text_token_num=R.MAX_TEXT_TOKENS)
            instances.append(dict(input_ids=d["input_ids"][0], labels=d["labels"][0], text_labels=d["text_labels"][0]))
    return dataset.DataCollatorForSupervisedDataset(tokenizer=tok)(instances)


def official_prefix(repo: str, caption) -> list[int]:
    """The official sampling prefix: `crop_and_encode_text_and_img(tokenizer, caption, image=None, 128)`."""
    process = _official_t2i(repo, "llava_t2i.dataset.process")
    with contextlib.redirect_stdout(sys.stderr):
        ids, _ = process.crop_and_encode_text_and_img(
            IdTokenizer(), IdTokenizer.text(caption), image=None, max_text_token_num=R.MAX_TEXT_TOKENS
        )
    return ids.tolist()
