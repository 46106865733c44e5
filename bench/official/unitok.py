"""Adapter around the OFFICIAL UniTok tokenizer code (FoundationVision/UniTok @bb8012e), for bench/parity.py.

Nothing of the official code lives in this project: `repo` is a local working tree of the official repository
(`models/`, `utils/`, `open_clip/`, `inference.py`), imported at run time. It needs its own environment: timm
1.0.8 (later timm passes arguments its `GeGluMlp` does not accept), typed-argument-parser, ftfy, regex, pytz,
and for `utils/data.py` (where the official `normalize_01_into_pm1` lives) webdataset 0.2.86, pandas and
braceexpand. That is why this runs in a separate venv, not the project's.

Construction follows `inference.py:20-26`: `Args()` (`utils/config.py`) updated with the checkpoint's `args`, then
`UniTok(args)`, a strict `load_state_dict` of `ckpt["trainer"]["unitok"]`, `eval()`. The released file's `args` are
not available here, so the `Args` defaults stand in for them; the ones that shape the tokenizer are pinned in
`RELEASED_ARGS` (they are also the defaults and what `launch.sh` passes). `UniTok.__init__` downloads nothing with
these arguments (`use_clip_pretrain` False, timm models built with `pretrained=False`, the text tower randomly
initialised), so nothing is stubbed.

The official tree's top-level packages are named `models`, `utils` and `open_clip`; the last would shadow the
installed open_clip this project imports. They are therefore imported with the repo first on `sys.path` and kept
out of `sys.modules` afterwards (the previous entries, if any, are put back). Side effect that stays: importing
`models.vitamin` re-registers timm's `vitamin_*` model names with UniTok's versions.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types

import torch
from PIL import Image
from torch import Tensor, nn

PRESETS = ("unitok",)
TIMM_VERSION = "1.0.8"

# `Args` fields that shape the released tokenizer (utils/config.py defaults; launch.sh passes the same
# --vocab_size 32768 --num_codebooks 8 --model vitamin_large).
RELEASED_ARGS = dict(
    model="vitamin_large",
    img_size=256,
    resize_ratio=1.125,  # inference.py:29 Resize(int(256 * 1.125)) = Resize(288)
    num_query=0,
    quant_proj="attn",
    vocab_size=32768,
    vocab_width=64,
    num_codebooks=8,
    le=0.0,
    embed_dim=768,
    text_width=768,
    text_heads=12,
    text_layers=12,
    text_vocab_size=49408,
    text_context_length=77,
)

_TOP_LEVEL = ("models", "utils", "open_clip")  # the official tree's packages
_LOADED: dict[str, dict[str, types.ModuleType]] = {}  # repo -> its modules, kept out of sys.modules


def _preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"no official UniTok tokenizer for preset {preset!r}; known: {PRESETS}")
    return preset


def _ours(name: str) -> bool:
    return name.split(".", 1)[0] in _TOP_LEVEL


@contextlib.contextmanager
def _official_tree(repo: str):
    """Make `import models / utils / open_clip` resolve to the official tree at `repo` inside the block only."""
    repo = os.path.abspath(repo)
    if not os.path.isfile(os.path.join(repo, "models", "unitok.py")):
        raise FileNotFoundError(f"{repo} does not look like the official UniTok tree (no models/unitok.py)")
    saved = {name: mod for name, mod in sys.modules.items() if _ours(name)}
    for name in saved:
        del sys.modules[name]
    sys.modules.update(_LOADED.get(repo, {}))
    sys.path.insert(0, repo)
    try:
        yield
    finally:
        sys.path.remove(repo)
        loaded = {name: mod for name, mod in sys.modules.items() if _ours(name)}
        for name in loaded:
            del sys.modules[name]
        _LOADED[repo] = loaded
        sys.modules.update(saved)


def _import(module: str) -> types.ModuleType:
    """Inside `_official_tree`: import `module` and check it came from the official tree."""
    mod = importlib.import_module(module)
    root = os.path.abspath(sys.path[0])
    if not os.path.abspath(mod.__file__).startswith(root + os.sep):
        raise ImportError(f"{module} resolved to {mod.__file__}, not to the official tree under {root}")
    return mod


def _released_args():
    """`Args()` with the released tokenizer's fields (inference.py:22-23 loads them from the checkpoint)."""
    args = _import("utils.config").Args()
    args.load_state_dict(RELEASED_ARGS)
    return args


def build_official(repo: str, preset: str, state: dict[str, Tensor]) -> nn.Module:
    """The official UniTok for `preset` with `state` (`ckpt["trainer"]["unitok"]` layout) loaded strictly;
    eval mode, fp32, CPU."""
    _preset(preset)
    import timm

    if timm.__version__ != TIMM_VERSION:
        raise RuntimeError(f"the official UniTok code runs on timm=={TIMM_VERSION}, found {timm.__version__}")
    with _official_tree(repo):
        unitok = _import("models.unitok")
        model = unitok.UniTok(_released_args())
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def official_preprocess(repo: str, preset: str, image: Image.Image) -> Tensor:
    """(3, 256, 256) in [-1, 1] as `inference.py:28-34` makes it: torchvision Resize(int(img_size * resize_ratio))
    = Resize(288) (default bilinear, antialiased), CenterCrop(256), ToTensor, the official
    `normalize_01_into_pm1` (2x - 1), after `.convert("RGB")` (inference.py:33)."""
    from torchvision.transforms import transforms

    _preset(preset)
    with _official_tree(repo):
        cfg = _released_args()
        normalize_01_into_pm1 = _import("utils.data").normalize_01_into_pm1
    preprocess = transforms.Compose(
        [
            transforms.Resize(int(cfg.img_size * cfg.resize_ratio)),
            transforms.CenterCrop(cfg.img_size),
            transforms.ToTensor(),
            normalize_01_into_pm1,
        ]
    )
    return preprocess(image.convert("RGB"))


@torch.no_grad()
def official_encode(model: nn.Module, pixels: Tensor) -> Tensor:
    """(B, 3, 256, 256) -> (B, T, M) = (B, 256, 8) indices: the official `img_to_idx` gives (B, M, T)
    (codebook-major, positions row-major over the 16 x 16 grid); this is its transpose."""
    indices = model.img_to_idx(pixels.float())
    return indices.transpose(1, 2).long()


@torch.no_grad()
def official_decode(model: nn.Module, tokens: Tensor) -> Tensor:
    """(B, T, M) indices -> the decoder's raw output (B, 3, 256, 256): `idx_to_img` (models/unitok.py) without
    its final `clamp_(-1, 1)`, i.e. `idx_to_f` -> `post_quant_proj` -> `decoder`."""
    indices = tokens.long().transpose(1, 2)  # back to the official (B, M, T)
    features = model.quantizer.idx_to_f(indices)
    features = model.post_quant_proj(features)
    return model.decoder(features)
