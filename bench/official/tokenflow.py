"""Adapter around the OFFICIAL TokenFlow tokenizer code (ByteFlow-AI/TokenFlow @9812da0), for bench/parity.py.

Nothing of the official code lives in this project: `repo` is a local working tree of the official repository
(e.g. `git archive HEAD t2i i2t tokenflow`), imported at run time. Its own environment is needed (transformers
4.43.4, timm, einops, ftfy, regex, `setuptools<81`), which is why this runs in a separate venv, not the project's.

Construction follows the official inference paths:

- "clipb_256" = `tokenflow_clipb_32k_enhanced.pt`, as the text-to-image model builds it
  (`t2i/llava_t2i/model/multimodal_encoder/tokenflow.py:22-26`): teacher "clipb_224" (OpenAI CLIP ViT-B/16
  tower), enhanced decoder, `infer_interpolate` (scale 16 appended; position tables resized at 256 px);
- "siglip_384" = `tokenflow_siglip_32k.pt` (TokenFlow-XL), as the understanding model builds it
  (`i2t/llava/model/multimodal_encoder/vision_tokenizer.py:144` -> `tokenflow_vq.py:21`): teacher "siglip_384",
  every other argument at its `ModelArgs` default.

The official constructor downloads pretrained CLIP / SigLIP weights. Only that download is stubbed: the CLIP
loader receives a stand-in for the JIT archive whose tensors have OpenAI ViT-B/16's shapes (its own code still
derives the architecture from them, builds the tower and deletes `proj`), and `SiglipVisionModel.from_pretrained`
builds the model from google/siglip-so400m-patch14-384's vision config without weights. Every weight the
tokenizer uses then comes from `state` through a strict `load_state_dict`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from unittest import mock

import torch
from PIL import Image
from torch import Tensor, nn

SIZES = {"clipb_256": 256, "siglip_384": 384}

# Keyword arguments of VQ_models["TokenFlow"] per released checkpoint (see the module docstring for where).
CONSTRUCTION = {
    "clipb_256": dict(
        codebook_size=32768, codebook_embed_dim=8, teacher="clipb_224", enhanced_decoder=True, infer_interpolate=True
    ),
    "siglip_384": dict(codebook_size=32768, teacher="siglip_384"),
}

# google/siglip-so400m-patch14-384 config.json, "vision_config" (the rest are SiglipVisionConfig defaults:
# gelu_pytorch_tanh, layer_norm_eps 1e-6, attention_dropout 0).
SIGLIP_SO400M_384 = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)
SIGLIP_NAME = "google/siglip-so400m-patch14-384"

# OpenAI CLIP ViT-B/16 (the archive `clip.load_clip_vision("ViT-B/16")` reads): 224 px, patch 16, width 768,
# 12 layers, 512-d joint space.
CLIP_B16 = dict(input_resolution=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512)
_STUB_ARCHIVE = "<no download: ViT-B-16.pt stand-in>"


def _official(repo: str, module: str):
    """Import `module` from the official `tokenflow/` directory, the way the t2i code does (its directory on
    sys.path, `tokenizer.vq_model`); the i2t way (`tokenflow.tokenizer...`) would collide with this project's
    own `tokenflow` package."""
    root = os.path.join(os.path.abspath(repo), "tokenflow")
    if not os.path.isfile(os.path.join(root, "tokenizer", "vq_model.py")):
        raise FileNotFoundError(f"{repo} does not look like the official TokenFlow tree (no tokenflow/tokenizer/)")
    if root not in sys.path:
        sys.path.append(root)
    mod = importlib.import_module(module)
    if not os.path.abspath(mod.__file__).startswith(root + os.sep):
        raise ImportError(f"{module} resolved to {mod.__file__}, not to the official tree under {root}")
    return mod


def _preset(preset: str) -> str:
    if preset not in CONSTRUCTION:
        raise ValueError(f"no official TokenFlow tokenizer for preset {preset!r}; known: {sorted(CONSTRUCTION)}")
    return preset


class _ClipArchiveStandIn:
    """What `torch.jit.load(ViT-B-16.pt)` gives `clip.load_clip_vision`: `.eval()` and a `state_dict()` with
    the shapes of OpenAI's ViT-B/16 (zeros; the tokenizer's tower is overwritten by the checkpoint)."""

    def __init__(self, clip_model_module):
        with torch.device("meta"):
            visual = clip_model_module.VisionTransformer(**CLIP_B16)
        self.shapes = {"visual." + k: v.shape for k, v in visual.state_dict().items()}
        self.shapes["text_projection"] = torch.Size((512, CLIP_B16["output_dim"]))

    def eval(self):
        return self

    def state_dict(self):
        return {k: torch.zeros(shape) for k, shape in self.shapes.items()}


@contextlib.contextmanager
def _no_pretrained_download(vq_model):
    """Stub the two pretrained-weight loads of `TokenFlow.__init__` (vq_model.py:161 and :169), nothing else."""
    from transformers import SiglipVisionConfig
    from transformers.modeling_utils import no_init_weights

    clip = vq_model.clip  # tokenizer/clip/clip.py
    real_jit_load = torch.jit.load

    def jit_load(path, *args, **kwargs):
        if path == _STUB_ARCHIVE:
            return _ClipArchiveStandIn(sys.modules[clip.VisionTransformer.__module__])
        return real_jit_load(path, *args, **kwargs)

    def siglip_from_pretrained(name, *args, **kwargs):
        if name != SIGLIP_NAME or args or kwargs:
            raise ValueError(f"unexpected SigLIP load {name!r} {args} {kwargs}")
        with no_init_weights():  # from_pretrained skips the init too; the checkpoint fills every tensor
            model = vq_model.SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M_384))
        return model.eval()  # from_pretrained returns eval mode (sdpa attention, fp32, as from_pretrained picks)

    with (
        mock.patch.object(clip, "_download", lambda url, root: _STUB_ARCHIVE),
        mock.patch.object(torch.jit, "load", jit_load),
        mock.patch.object(vq_model.SiglipVisionModel, "from_pretrained", siglip_from_pretrained),
    ):
        yield


def build_official(repo: str, preset: str, state: dict[str, Tensor]) -> nn.Module:
    """The official TokenFlow model for `preset` with `state` loaded strictly; eval mode, fp32, CPU."""
    vq_model = _official(repo, "tokenizer.vq_model")
    with _no_pretrained_download(vq_model), contextlib.redirect_stdout(sys.stderr):  # its prints are chatty
        model = vq_model.VQ_models["TokenFlow"](**CONSTRUCTION[_preset(preset)])
    model.load_state_dict(state, strict=True)
    # The official loaders replace `train` by a no-op and set `training = False` on the model and its quantizer
    # only; eval() here puts every submodule in eval mode. All dropout rates are 0, so tokens are the same.
    return model.float().eval()


def official_preprocess(repo: str, preset: str, image: Image.Image) -> Tensor:
    """(3, S, S) in [-1, 1] as the official reconstruction / t2i data code makes it: RGB, then ADM
    `center_crop_arr` (tokenflow/dataset/augmentation.py: BOX halving while the short side >= 2S, BICUBIC resize
    of the short side to S, crop at ((h - S) // 2, (w - S) // 2)), ToTensor, Normalize(0.5, 0.5)
    (tokenizer/reconstruction_vq_ddp.py:91-95, t2i/llava_t2i/dataset/dataset.py:101-106)."""
    from torchvision import transforms

    size = SIZES[_preset(preset)]
    augmentation = _official(repo, "dataset.augmentation")
    transform = transforms.Compose(
        [
            transforms.Lambda(lambda pil_image: augmentation.center_crop_arr(pil_image, size)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
        ]
    )
    return transform(image.convert("RGB"))


@torch.no_grad()
def official_encode(model: nn.Module, pixels: Tensor) -> Tensor:
    """(B, 3, S, S) -> (B, T) indices from `TokenFlow.encode`: scales concatenated coarse to fine, each map
    row-major (it flattens b h w c), the same layout as this project's `Tokenizer.encode`."""
    _, _, indices = model.encode(pixels.float())
    return indices.long()


@torch.no_grad()
def official_decode(model: nn.Module, tokens: Tensor) -> Tensor:
    """(B, T) indices -> the pixel decoder's raw output (B, 3, S, S) via `TokenFlow.decode_code` (unclamped;
    siglip_384 includes its bicubic resize 432 -> 384)."""
    _, pixels = model.decode_code(tokens.long())
    return pixels
