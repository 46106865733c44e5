"""Parity fixture of the OFFICIAL TokenFlow understanding model (ByteFlow-AI/TokenFlow @9812da0, `i2t/llava`,
`LlavaQwenForCausalLM`), tiny and seeded, CPU fp32: writes `tests/fixtures/i2t_official/`.

    HF_HUB_OFFLINE=1 /work/offenv/bin/python bench/official/i2t.py --official-repo /work/official/TokenFlow \\
        --threads 2 [--write-fixture tests/fixtures/i2t_official]

Nothing of the official code lives in this project: `--official-repo` is a local tree of the official repository
(`git archive HEAD t2i i2t tokenflow`), imported at run time in its own venv (transformers 4.43.4: the pin 4.37.2
cannot import `llava.model`, shared/reference/official-llm.md §3; accelerate 0.33.0 for the official loader's
`low_cpu_mem_usage=True`). This script imports nothing of the project
(its `tokenflow` package, and bench/official/tokenflow.py, would shadow the official `tokenflow/` directory that
`i2t/llava/model/multimodal_encoder/tokenflow_vq.py` imports), so it runs as a plain script.

Construction, in the official training order (`llava/train/train.py`, SFT stage of scripts/v1_5/train.sh):
1. a tiny `Qwen2ForCausalLM` (hidden 64, 2 layers, 4 heads / 2 KV heads, FFN 128, RoPE theta 1e6, untied head,
   vocabulary 320) saved as the "base", with a byte-level BPE text tokenizer stand-in (below);
2. `LlavaQwenForCausalLM.from_pretrained(base, attn_implementation="eager")`;
3. `get_model().initialize_vision_modules(ModelArguments(vision_tower=<placeholder>, mm_vision_vq_type="TOKENFLOW",
   mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, ...))`: the official `VQTower`, whose TokenFlow-XL
   (built by `tokenflow_model(...)` inside `VQTower.load_model`) is a stand-in with no weights whose `encode`
   returns its input: the "images" passed to the official forward ARE the (B, 40, 27, 27) feature maps, and
   `VQTower.forward` (official, unmodified) rearranges them `b c h w -> b (h w) c` before the official projector.
   The released image tokenizer's features are covered by the tokenizer parity fixtures; here the LLM side is;
4. the config fields train.py sets (`tokenizer_padding_side`, `tokenizer_model_max_length` 2048,
   `image_aspect_ratio` pad, `mm_vision_vq_type` "TOKENFLOW", ...), `initialize_vision_tokenizer` (a no-op with
   `mm_use_im_patch_token` / `mm_use_im_start_end` False, as in the release: no tokens are added);
5. every weight replaced by a seeded draw (`seeded_state`), loaded with `strict=True`;
6. `save_pretrained(model_dir, safe_serialization=True)` in two safetensors shards with an index (the released
   layout: `model.mm_projector.{0,2}.{weight,bias}` plus plain Qwen2 keys), `mm_vision_tower` set to "" as in the
   released config.json, and the tokenizer files;
7. reloaded the way the official loader does (`llava/model/builder.py`: `LlavaQwenForCausalLM.from_pretrained(
   path, ...)`, with `mm_vision_tower` overridden as "" cannot be built): no missing or unexpected keys, equal
   weights. The fixture's outputs come from this reloaded model.

Text tokenizer stand-in: Qwen2.5's tokenizer (151,665 ids) cannot be had offline and would make the fixture
large. A byte-level BPE (GPT-2 byte alphabet, ByteLevel pre-tokenizer, 300 ids trained in-process on a fixed
English text) plus Qwen's special tokens `<|endoftext|>` (pad, 300), `<|im_start|>` (301), `<|im_end|>` (302, EOS)
wrapped as `Qwen2TokenizerFast`; the model's vocabulary (320) is larger than the tokenizer, as the release's
(152,064 > 151,665).

Inputs (batch of 3, official data code, official collator `DataCollatorForSupervisedDataset`, right padding):
0. an inference prompt: `conv_templates["qwen_2_5"]` with "<image>\\n" + question, `get_prompt()`,
   `tokenizer_image_token` (the LLaVA eval path); labels all -100;
1. a two-round training sample with an image: `preprocess_multimodal` + `preprocess` -> `preprocess_qwen`
   (has_image=True: `<image>` added as a token, then replaced by -200);
2. a text-only training sample (`preprocess_qwen`, has_image=False); as in LLaVA training it still gets an image
   (zeros), which the official splice consumes and drops (`[0:0]`).
Features: `torch.randn((3, 40, 27, 27), generator=manual_seed(1))`, the third zeroed.

Stubs: the `deepspeed` import of train.py (a placeholder module: only `preprocess*`, `preprocess_multimodal`,
`ModelArguments` and the collator are used), the TokenFlow-XL inside the VQTower (above) and the placeholder file
its path must name. Everything that runs on the inputs is official and unmodified: `prepare_inputs_labels_for_
multimodal`, `VQTower.forward`, the projector, the Qwen2 forward and its loss.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
import types
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conversation.py asks the hub for a Llama-3 tokenizer at import

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (HERE, ROOT)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

SEED = 0
FEATURE_SEED = 1
GRID = 27  # TokenFlow-XL (siglip_384): 27 x 27 = 729 feature rows of 40 dims
CODE_DIM = 40
TEXT_VOCAB = 300  # BPE ids 0..299; then <|endoftext|> 300, <|im_start|> 301, <|im_end|> 302
VOCAB = 320
LLM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    sliding_window=131072,
    use_sliding_window=False,
    max_window_layers=2,
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    vocab_size=VOCAB,
    bos_token_id=300,
    eos_token_id=302,
)
CORPUS = [
    "You are a helpful assistant.",
    "What is shown in this picture? Describe the image in one sentence.",
    "A small red house stands next to a tall green tree under a blue sky.",
    "What colour is the door? The door is blue, and the windows are white.",
    "Say hello to the user. Hello there! How can I help you today?",
    "system user assistant image photo picture question answer the a an is are of in on with",
]
IMAGE_PROMPT = "<image>\nWhat is shown in this picture?"
TRAIN_IMAGE = [
    {"from": "human", "value": "Describe the image.\n<image>"},
    {"from": "gpt", "value": "A small red house next to a tree."},
    {"from": "human", "value": "What colour is the door?"},
    {"from": "gpt", "value": "The door is blue."},
]
TRAIN_TEXT = [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there!"}]


# ---- the official code --------------------------------------------------------------------------------------------


def official(repo: str):
    """(llava.model, llava.train.train, llava.conversation, llava.mm_utils, vision_tokenizer) from the official i2t/."""
    root = os.path.abspath(repo)
    i2t = os.path.join(root, "i2t")
    if not os.path.isfile(os.path.join(i2t, "llava", "model", "language_model", "llava_qwen.py")):
        raise FileNotFoundError(f"{repo} does not look like the official TokenFlow tree (no i2t/llava/)")
    if i2t not in sys.path:
        sys.path.insert(0, i2t)
    with contextlib.redirect_stdout(sys.stderr):
        import llava.model as model_mod
        import transformers.trainer  # noqa: F401 - before the placeholder below (it asks importlib about deepspeed)
        from llava import conversation, mm_utils
        from llava.model.multimodal_encoder import vision_tokenizer

        placeholder = None
        if "llava.train.train" not in sys.modules and importlib.util.find_spec("deepspeed") is None:
            # train.py imports deepspeed at module level; nothing used here calls it. The placeholder is removed
            # right after (transformers asks importlib whether deepspeed exists, and a spec-less module breaks that)
            placeholder = sys.modules["deepspeed"] = types.ModuleType("deepspeed")
        try:
            import llava.train.train as train_mod
        finally:
            if placeholder is not None and sys.modules.get("deepspeed") is placeholder:
                del sys.modules["deepspeed"]
    for mod in (model_mod, train_mod, conversation, vision_tokenizer, sys.modules["tokenflow.tokenizer.vq_model"]):
        if not os.path.abspath(mod.__file__).startswith(root + os.sep):
            raise ImportError(f"{mod.__name__} resolved to {mod.__file__}, not to the official tree under {root}")
    return model_mod, train_mod, conversation, mm_utils, vision_tokenizer


class FeatureTokenFlow(nn.Module):
    """Stand-in for the TokenFlow-XL that `VQTower.load_model` builds: no weights, `encode` returns its input (the
    (B, 40, 27, 27) continuous features), with the attributes VQTower reads."""

    embed_dim = CODE_DIM
    n_embed = 32768
    compression = 384 // GRID

    def encode(self, x):
        if tuple(x.shape[1:]) != (CODE_DIM, GRID, GRID):
            raise ValueError(f"expected (B, {CODE_DIM}, {GRID}, {GRID}) feature maps, got {tuple(x.shape)}")
        return x, None, (None, None, None)

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def feature_tower(vision_tokenizer):
    def tokenflow_model(model_name, codebook_size, teacher, pretrain_path=None):
        assert (model_name, codebook_size, teacher) == ("TokenFlow", 32768, "siglip_384"), (model_name, teacher)
        return FeatureTokenFlow()

    with mock.patch.object(vision_tokenizer, "tokenflow_model", tokenflow_model):
        yield


def text_tokenizer(out_dir: str):
    """The byte-level BPE stand-in (module docstring), saved to `out_dir` and loaded back with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, Qwen2TokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(CORPUS, trainer=trainer)
    assert tk.get_vocab_size() == TEXT_VOCAB, tk.get_vocab_size()
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # Qwen's order
    tok = Qwen2TokenizerFast(
        tokenizer_object=tk,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
        padding_side="right",
        errors="replace",
    )
    tok.save_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert ids == [300, 301, 302] and tok.pad_token_id == 300 and tok.eos_token_id == 302, ids
    tok.model_max_length = 2048
    return tok


def seeded_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """One `torch.Generator().manual_seed(seed)`, keys sorted, one randn per key, scaled by role: norm gains
    1 + 0.1 N; embed_tokens 0.5 N; lm_head N / sqrt(H); every bias (q/k/v, projector) 0.1 N; other weights
    N / sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        noise = torch.randn(shapes[key], generator=gen, dtype=torch.float32)
        if key.endswith("norm.weight"):
            out[key] = 1.0 + 0.1 * noise
        elif key == "model.embed_tokens.weight":
            out[key] = 0.5 * noise
        elif key == "lm_head.weight":
            out[key] = noise / math.sqrt(LLM["hidden_size"])
        elif key.endswith(".bias"):
            out[key] = 0.1 * noise
        else:
            out[key] = noise / math.sqrt(shapes[key][1])
    return out


def build(repo: str, model_dir: str, placeholder: str, seed: int):
    """Steps 1-6 of the module docstring; returns the seeded state dict."""
    model_mod, train_mod, _, _, vision_tokenizer = official(repo)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with tempfile.TemporaryDirectory() as base:
        torch.manual_seed(seed)
        Qwen2ForCausalLM(Qwen2Config(**LLM)).save_pretrained(base, safe_serialization=True)
        tokenizer = text_tokenizer(base)
        with contextlib.redirect_stdout(sys.stderr):
            model = model_mod.LlavaQwenForCausalLM.from_pretrained(
                base, attn_implementation="eager", torch_dtype=torch.float32, low_cpu_mem_usage=False
            )
    model.config.use_cache = False
    args = train_mod.ModelArguments(
        model_name_or_path="Qwen/Qwen2.5-14B-Instruct",
        version="qwen_2_5",
        vision_tower=placeholder,
        mm_vision_vq_type="TOKENFLOW",
        mm_projector_type="mlp2x_gelu",
        tune_mm_mlp_adapter=False,
        mm_vision_tuning_embedding=False,
        mm_vision_select_layer=-2,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
    with feature_tower(vision_tokenizer), contextlib.redirect_stdout(sys.stderr):
        model.get_model().initialize_vision_modules(model_args=args, fsdp=[])
    cfg = model.config
    cfg.image_aspect_ratio = "pad"
    cfg.tokenizer_padding_side = tokenizer.padding_side
    cfg.tokenizer_model_max_length = tokenizer.model_max_length
    cfg.tune_mm_mlp_adapter = False
    cfg.mm_vision_tuning_embedding = False
    cfg.freeze_mm_mlp_adapter = False
    cfg.mm_use_im_start_end = False
    cfg.mm_projector_lr = None
    cfg.mm_use_im_patch_token = False
    model.initialize_vision_tokenizer(args, tokenizer=tokenizer)
    cfg.mm_vision_vq_type = str(args.mm_vision_vq_type.name)
    assert cfg.mm_hidden_size == CODE_DIM and cfg.mm_projector_type == "mlp2x_gelu"

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = sorted(k for k in shapes if not k.startswith(("model.layers.", "model.embed_tokens", "model.norm")))
    assert extra == ["lm_head.weight"] + [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    state = seeded_state(shapes, seed)
    model.load_state_dict(state, strict=True)

    cfg.use_cache = True  # train.py sets it before saving
    cfg.mm_vision_tower = ""  # as in the released config.json
    cfg._name_or_path = "Qwen/Qwen2.5-14B-Instruct"  # the base train.sh names (not this run's temporary path)
    with contextlib.redirect_stdout(sys.stderr):
        model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="300KB")
    tokenizer.save_pretrained(model_dir)
    return state


def reload(repo: str, model_dir: str, placeholder: str, state: dict[str, torch.Tensor]):
    """Step 7: the official loader's call, `mm_vision_tower` pointed at the placeholder; strict key check."""
    model_mod, _, _, _, vision_tokenizer = official(repo)
    from transformers import AutoTokenizer

    with feature_tower(vision_tokenizer), contextlib.redirect_stdout(sys.stderr):
        model, info = model_mod.LlavaQwenForCausalLM.from_pretrained(
            model_dir,
            attn_implementation="eager",
            torch_dtype=torch.float32,
            low_cpu_mem_usage=True,
            mm_vision_tower=placeholder,
            output_loading_info=True,
        )
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"official reload of {model_dir}: {bad}")
    got = model.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    model.config.use_cache = False
    return model.float().eval(), AutoTokenizer.from_pretrained(model_dir)


def batch(repo: str, tokenizer, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three samples of the module docstring through the official data code and collator."""
    _, train_mod, conversation, mm_utils, _ = official(repo)
    conv = conversation.conv_templates["qwen_2_5"].copy()
    conv.append_message(conv.roles[0], IMAGE_PROMPT)
    conv.append_message(conv.roles[1], None)
    prompt = mm_utils.tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")

    data_args = train_mod.DataArguments(is_multimodal=True, image_aspect_ratio="pad")
    data_args.mm_use_im_start_end = False
    with mock.patch.object(conversation, "default_conversation", conversation.conv_templates["qwen_2_5"]):
        with_image = train_mod.preprocess_multimodal([copy.deepcopy(TRAIN_IMAGE)], data_args)
        one = train_mod.preprocess(with_image, tokenizer, has_image=True)
        two = train_mod.preprocess([copy.deepcopy(TRAIN_TEXT)], tokenizer, has_image=False)
    instances = [
        dict(input_ids=prompt, labels=torch.full_like(prompt, -100), image=features[0]),
        dict(input_ids=one["input_ids"][0], labels=one["labels"][0], image=features[1]),
        dict(input_ids=two["input_ids"][0], labels=two["labels"][0], image=features[2]),
    ]
    out = train_mod.DataCollatorForSupervisedDataset(tokenizer=tokenizer)(instances)
    out["prompt"] = conv.get_prompt()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-repo", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-fixture", default=None, help="directory to write (model/ and outputs.npz)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    out_dir = args.write_fixture or tempfile.mkdtemp(prefix="i2t_official_")
    model_dir = os.path.join(out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    for name in os.listdir(model_dir):
        os.remove(os.path.join(model_dir, name))
    with tempfile.TemporaryDirectory() as tmp:
        placeholder = os.path.join(tmp, "tokenflow_siglip_32k.pt")  # the released i2t tokenizer's file name
        open(placeholder, "wb").close()
        state = build(args.official_repo, model_dir, placeholder, SEED)
        model, tokenizer = reload(args.official_repo, model_dir, placeholder, state)

    features = torch.randn((3, CODE_DIM, GRID, GRID), generator=torch.Generator().manual_seed(FEATURE_SEED))
    features[2] = 0.0  # the text-only sample's dummy image (consumed and dropped by the official splice)
    b = batch(args.official_repo, tokenizer, features)
    with torch.no_grad():
        out = model(
            input_ids=b["input_ids"].clone(),
            attention_mask=b["attention_mask"].clone(),
            labels=b["labels"].clone(),
            images=b["images"].clone(),
            use_cache=False,
            return_dict=True,
        )
    logits = out.logits.float()  # (3, S, V), right-padded
    ids, mask = b["input_ids"], b["attention_mask"]
    has_image = (ids == -200).any(1)
    assert has_image.tolist() == [True, True, False] and ((ids == -200).sum(1) <= 1).all()
    text_len = mask.sum(1)
    seq_len = text_len + has_image.long() * (GRID * GRID - 1)
    assert logits.shape[1] == int(seq_len.max()) and logits.shape[2] == VOCAB

    # rows kept with the full vocabulary: every text row, every 16th image row, the first and last image rows
    rows = []
    for s in range(3):
        img = int((ids[s] == -200).nonzero()[0]) if has_image[s] else -1
        for p in range(int(seq_len[s])):
            in_image = img >= 0 and img <= p < img + GRID * GRID
            if not in_image or (p - img) % 16 == 0 or p == img + GRID * GRID - 1:
                rows.append((s, p))
    rows_t = torch.tensor(rows)
    valid = torch.arange(logits.shape[1])[None] < seq_len[:, None]
    top2 = logits.topk(2, dim=-1).values
    result = {
        "seed": np.int64(SEED),
        "input_ids": ids.numpy(),
        "attention_mask": mask.numpy(),
        "labels": b["labels"].numpy(),
        "text_lengths": text_len.numpy(),
        "seq_lengths": seq_len.numpy(),
        "features": features[:2].permute(0, 2, 3, 1).reshape(2, GRID * GRID, CODE_DIM).contiguous().numpy(),
        "rows": rows_t.numpy(),
        "logits": logits[rows_t[:, 0], rows_t[:, 1]].numpy(),
        "logsumexp": torch.where(valid, torch.logsumexp(logits, -1), torch.nan).numpy(),
        "argmax": torch.where(valid, logits.argmax(-1), -1).numpy(),
        "top2_gap": torch.where(valid, top2[..., 0] - top2[..., 1], torch.nan).numpy(),
        "loss": np.float32(out.loss.item()),
        "prompt": np.array(b["prompt"]),
    }
    # self-checks of the official code against itself: each sample alone gives the same logits (padding is inert)
    for s in range(3):
        n = int(text_len[s])
        with torch.no_grad():
            alone = model(
                input_ids=ids[s : s + 1, :n].clone(), images=b["images"][s : s + 1].clone(), use_cache=False
            ).logits.float()
        diff = (alone[0] - logits[s, : int(seq_len[s])]).abs().max().item()
        print(f"sample {s}: {n} ids, {int(seq_len[s])} positions, alone vs batched max |diff| {diff:.2e}")
        assert diff < 1e-4, diff
    print(f"loss {out.loss.item():.6f}; min top-1/top-2 gap {np.nanmin(result['top2_gap']):.2e}")
    print(f"logits kept: {len(rows)} rows x {VOCAB}; |logit| max {logits.abs().max().item():.2f}")

    if args.write_fixture:
        np.savez(os.path.join(out_dir, "outputs.npz"), **result)
        meta = {
            "official": "ByteFlow-AI/TokenFlow @9812da0 (i2t/llava)",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "threads": args.threads,
            "machine": platform.machine(),
        }
        with open(os.path.join(out_dir, "made_with.json"), "w") as fh:
            json.dump(meta, fh, indent=2)
        print(f"wrote {out_dir}")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
