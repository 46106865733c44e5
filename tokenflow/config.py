"""Typed tokenizer configs and the preset registry.

Every number that shapes a published checkpoint lives here, next to the reason for it. A preset is a function
returning a complete `TokenizerConfig`; variants start from a base and change a field or two, so a reader can
diff two presets by eye. Configs round-trip through plain dicts (`to_dict` / `from_dict`), which is what
`config.json` in a saved tokenizer directory and YAML job configs hold.

Facts cited as "ref" come from `shared/reference/tokenflow.md` (TokenFlow official code) and
`shared/reference/unitok-var.md` (UniTok).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Literal

# --------------------------------------------------------------------------------------------------------------
# generic dataclass <-> dict


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a (nested) config dataclass; tuples become lists."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(obj)


def from_dict(cls: type, data: dict[str, Any], *, path: str = "") -> Any:
    """Build config dataclass `cls` from a dict, recursing into nested configs.

    Unknown keys are an error naming the dotted path, so a typo in a YAML file never passes silently.
    """
    if not isinstance(data, dict):
        raise TypeError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None) -> Any:
    """Build config `cls` from a YAML file (optional), then dotted `key.sub=value` overrides (values parsed as
    YAML, so `filters.min_side=128`, `input=[a.tar, b.tar]`, `dedup=false` work). Later wins."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        node = data
        *parents, leaf = dotted.strip().split(".")
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {name} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return from_dict(cls, data)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path=path)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path) if len(args) == 1 else value
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, path) for v in value)
    if tp is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        # YAML 1.1 reads "3e-4" (no dot) as a string: accept it, and ints, where a float is expected
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{path}: expected a number, got {value!r}") from None
    return value


# --------------------------------------------------------------------------------------------------------------
# component configs


@dataclass(kw_only=True)
class PixelCNNConfig:
    """The VQGAN-style CNN of the pixel branch (LlamaGen/taming layout, ref 1.4)."""

    ch: int = 128
    """Width of the first level; level widths are ch * ch_mult."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Width multipliers per level; len(ch_mult) - 1 stride-2 resamplings (5 levels -> stride 16)."""
    num_res_blocks: int = 2
    """ResBlocks per level in the encoder; the decoder uses num_res_blocks + 1 per level."""
    z_channels: int = 256
    """Channels between the CNN and the 1x1 quant / post-quant convs."""
    norm_groups: int = 32
    """GroupNorm groups; every width must divide by it."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        widths = [self.ch * m for m in self.ch_mult] + [self.z_channels]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"pixel CNN widths {widths} must all divide by norm_groups={self.norm_groups}")
        if self.num_res_blocks < 1:
            raise ValueError("num_res_blocks must be >= 1")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(kw_only=True)
class SemanticEncoderConfig:
    """The trainable semantic ViT (initialised from a teacher) and its frozen teacher copy (ref 1.3)."""

    arch: str = "ViT-B-16"
    """open_clip model name, or "custom" to build a CLIP-style ViT from the fields below (tests, tiny)."""
    pretrained: str | None = None
    """open_clip pretrained tag (downloads when online) or a local checkpoint path; None = random init."""
    image_size: int = 224
    """Resolution of the encoder's own position table; other input sizes interpolate it."""
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    output_dim: int = 512
    """Width of the CLIP projection (`proj`), i.e. of the teacher target when teacher_proj is True."""
    quick_gelu: bool = False
    """QuickGELU activations (OpenAI CLIP's; open_clip's ViT-B-16 otherwise builds with exact GELU)."""
    gelu_tanh: bool = False
    """Tanh-approximate GELU in the tower's MLPs: SigLIP's own activation (`gelu_pytorch_tanh` in transformers,
    which the official TokenFlow-XL runs), where open_clip's timm SO400M build uses exact GELU. The two differ
    by up to 5e-4 per activation, enough over 26 blocks to change tokens of released weights."""
    feature_layer: int = -1
    """-1: final tokens after ln_post (CLIP); -2: output of the second-to-last block, no norm (SigLIP)."""
    input_norm: Literal["none", "clip", "siglip"] = "none"
    """Normalisation applied to the [-1, 1] input of the TRAINABLE encoder. The official clipb feeds raw
    [-1, 1] (ref 1.3, a quirk released checkpoints depend on); SigLIP maps to [-1, 1] again."""
    teacher_norm: Literal["none", "clip", "siglip"] = "clip"
    """Normalisation applied to the teacher's input."""
    teacher_proj: bool = True
    """Whether the teacher target goes through the CLIP projection (clipb: 768 -> 512)."""

    def __post_init__(self) -> None:
        if self.feature_layer not in (-1, -2):
            raise ValueError("feature_layer must be -1 (final, after ln_post) or -2 (penultimate block)")

    @property
    def teacher_dim(self) -> int:
        return self.output_dim if self.teacher_proj else self.width


@dataclass(kw_only=True)
class SemanticDecoderConfig:
    """BEiT-v2 VQKD-decoder style ViT regressing the teacher's features from the 32-d codes (ref 1.5)."""

    width: int = 768
    depth: int = 3
    heads: int = 12
    mlp_ratio: float = 4.0
    grid: int = 14
    """Side of the decoder's own position table (the grid it was trained at)."""


@dataclass(kw_only=True)
class QuantizerConfig:
    """Codebooks, lookup and the multi-scale residual loop (ref 1.6-1.8; UniTok A1.4)."""

    kind: Literal["shared", "multi"] = "shared"
    """"shared": TokenFlow dual codebook, one index per position; "multi": UniTok, one index per sub-codebook."""
    codebook_size: int = 32_768
    """Entries per (sub-)codebook: 32,768 for all released TokenFlow models, 4,096 per UniTok sub-codebook."""
    dims: tuple[int, ...] = (32, 8)
    """shared: (semantic, pixel) code widths; multi: the width of each sub-codebook."""
    pixel_weight: float = 1.0
    """w in argmin(d_sem + w * d_pix); 1.0 in every released model (paper Table 11)."""
    beta: float = 0.25
    """Commitment weight."""
    entropy_loss: bool = False
    """Compute the entropy loss (materialises N x K scores, so off unless used). Its weight is the loss
    config's `entropy_weight` (0 in the official recipes)."""
    entropy_temperature: float = 0.01
    scales: tuple[int, ...] = (1, 2, 4, 6, 8, 10, 12, 14)
    """Side of each scale's token map, coarse to fine; the last is the final grid."""
    scale_drop_prob: float = 0.1
    """Training only: probability per batch of dropping one scale (never the first)."""
    search_block: int = 1 << 21
    """Scores per block of the nearest-code search (rows x codebook_size): bounds its extra memory (8 MiB of
    fp32 by default, 64 rows at K = 32,768) and keeps the block in cache, which is most of the speed-up over
    the explicit formula (bench/quantizer.py)."""

    def __post_init__(self) -> None:
        if list(self.scales) != sorted(set(self.scales)) or not self.scales or self.scales[0] < 1:
            raise ValueError(f"scales must be strictly increasing positive ints, got {self.scales}")
        if self.kind == "shared" and len(self.dims) != 2:
            raise ValueError("a shared-mapping quantizer has exactly two code parts (semantic, pixel)")
        if not 0.0 <= self.scale_drop_prob <= 1.0:
            raise ValueError("scale_drop_prob must be in [0, 1]")
        if self.codebook_size < 2 or self.search_block < 1:
            raise ValueError("codebook_size must be >= 2 and search_block >= 1")

    @property
    def code_dim(self) -> int:
        return sum(self.dims)

    @property
    def num_codebooks(self) -> int:
        return 1 if self.kind == "shared" else len(self.dims)

    @property
    def tokens_per_image(self) -> int:
        return sum(s * s for s in self.scales)


@dataclass(kw_only=True)
class UniTokConfig:
    """UniTok's ViTamin encoder / decoder and attention projections around its multi-codebook quantizer.

    The defaults are the released tokenizer (ViTamin-L, `vitamin_large` in the official `models/vitamin.py`, as
    `models/unitok.py` configures it; ref A1.2, A1.3, A1.5). Module names mirror the official ones
    (`tokenflow.encoders.vitamin`), so its weights load as `"model." + official key`.
    """

    width: int = 1024
    """Transformer width of the encoder and decoder (ref A1.2)."""
    encoder_layers: int = 31
    decoder_layers: int = 31
    """The decoder is a second `vitamin_large` of which only the blocks and final norm are kept (ref A1.5)."""
    heads: int = 16
    """Attention heads of the transformer blocks (head width 64)."""
    mlp_ratio: float = 2.0
    """GeGLU MLP hidden width = mlp_ratio * width (2,048): its own LayerNorm, gelu_tanh(w0 x) * w1 x, w2."""
    stem_widths: tuple[int, int] = (160, 320)
    """Conv backbone widths: the stem and MBConv stage 1 (160), MBConv stage 2 (320) (ViTamin-L `embed_dim`)."""
    stage_depths: tuple[int, int] = (2, 4)
    """MBConv blocks per encoder stage; the first block of each stage has stride 2 (ref A1.2)."""
    expand_ratio: float = 4.0
    """MBConv / inverted MBConv expansion: mid width make_divisible(4 * out) = 640, 1,280."""
    pool_stride: int = 2
    """Stride of the backbone's final `pool` conv (320 -> width) and the upsampling factor of the decoder's
    `up_conv1`: 2 in ViTamin (total stride 16 = stem 2 x stages 2 x 2 x pool 2). The tiny preset uses 1 to keep
    an 8 x 8 grid at 64 px; nothing else in the architecture changes with it."""
    proj_heads: int = 16
    """Heads of `quant_proj` / `post_quant_proj` (the official code uses width // code_dim = 16: the down
    projection averages 16 heads of 64 = code_dim dims, ref A1.3)."""
    proj_mlp_ratio: float = 2.0
    """GeGLU hidden width of the projections = proj_mlp_ratio * their output width (128 / 2,048)."""
    upsampler_widths: tuple[int, int] = (320, 160)
    """Widths of the decoder's `up_conv2` and `up_conv3` inverted-MBConv stages (`up_conv1` maps width to the
    first; `up_conv4` maps the second to RGB) (ref A1.5)."""
    upsampler_depths: tuple[int, int] = (4, 2)
    """Inverted-MBConv blocks in `up_conv2` / `up_conv3`; the first of each upsamples x2."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the last transformer block, linearly spaced from 0 over the blocks of each side
    (timm's schedule). Training only; the official recipe trains with 0.1 (`utils/config.py` `drop_path`)."""

    def __post_init__(self) -> None:
        if self.width % self.heads or self.width % self.proj_heads:
            raise ValueError(f"width {self.width} must divide by heads {self.heads} and proj_heads {self.proj_heads}")
        if self.pool_stride not in (1, 2):
            raise ValueError("pool_stride must be 1 or 2")
        parts = (self.stem_widths, self.stage_depths, self.upsampler_widths, self.upsampler_depths)
        if {len(p) for p in parts} != {2}:
            raise ValueError("ViTamin has exactly two MBConv stages per side (stem_widths, stage_depths, upsampler_*)")
        if min(self.stage_depths + self.upsampler_depths) < 1:
            raise ValueError("every MBConv stage needs at least one block")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError("drop_path must be in [0, 1)")

    @property
    def stride(self) -> int:
        """Pixels per token side: stem 2 x stage 2 x stage 2 x pool_stride (16 for ViTamin-L); the decoder
        upsamples by the same factor (up_conv1 pool_stride x up_conv2 2 x up_conv3 2 x up_conv4 2)."""
        return 8 * self.pool_stride


@dataclass(kw_only=True)
class PreprocessConfig:
    """How PIL images become the model's input (see `tokenflow.image.Preprocess`)."""

    mode: Literal["center_crop", "pad", "resize_crop"] = "center_crop"
    resize_to: int | None = None
    draft: bool = False
    """Reduced-size JPEG decoding (faster, slightly different pixels); off for parity with published models."""


@dataclass(kw_only=True)
class TokenizerConfig:
    """A complete tokenizer: what `config.json` of a saved tokenizer holds."""

    kind: Literal["tokenflow", "unitok"] = "tokenflow"
    image_size: int = 224
    """Input side in pixels."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    semantic_encoder: SemanticEncoderConfig = field(default_factory=SemanticEncoderConfig)
    semantic_decoder: SemanticDecoderConfig = field(default_factory=SemanticDecoderConfig)
    pixel_encoder: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    pixel_decoder: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    pixel_input_size: int | None = None
    """If set, the pixel branch sees the input bicubic-resized to this side (SigLIP: 384 -> 432 = 27 * 16 so
    both branches share the 27 x 27 grid) and its output is resized back to image_size."""
    unitok: UniTokConfig = field(default_factory=UniTokConfig)
    """Used when kind == "unitok"."""

    def __post_init__(self) -> None:
        g = self.grid
        if self.kind == "tokenflow":
            sem_grid = self.image_size // self.semantic_encoder.patch_size
            pix_grid = (self.pixel_input_size or self.image_size) // self.pixel_encoder.stride
            if not (sem_grid == pix_grid == g):
                raise ValueError(
                    f"grids disagree: semantic {sem_grid}, pixel {pix_grid}, last scale {g}; "
                    "image_size, patch sizes, CNN stride and scales must give one grid"
                )
            if self.quantizer.kind != "shared":
                raise ValueError("kind 'tokenflow' needs the shared-mapping quantizer")
        else:
            stride = self.unitok.stride
            if self.image_size % stride or self.image_size // stride != g:
                raise ValueError(f"unitok grid {self.image_size} px / stride {stride} != last scale {g}")
            if self.quantizer.kind != "multi":
                raise ValueError("kind 'unitok' needs the multi-codebook quantizer")

    @property
    def grid(self) -> int:
        return self.quantizer.scales[-1]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerConfig:
        return from_dict(cls, data)


# --------------------------------------------------------------------------------------------------------------
# presets

CLIP_B_SCALES = (1, 2, 4, 6, 8, 10, 12, 14)
SIGLIP_SCALES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27)


def clipb_224() -> TokenizerConfig:
    """TokenFlow-B: OpenAI CLIP ViT-B/16 (the paper's "B/14" is a typo, ref 1.3), 561 tokens."""
    return TokenizerConfig(
        kind="tokenflow",
        image_size=224,
        quantizer=QuantizerConfig(scales=CLIP_B_SCALES),
        semantic_encoder=SemanticEncoderConfig(
            arch="ViT-B-16", quick_gelu=True, input_norm="none", teacher_norm="clip"
        ),
        semantic_decoder=SemanticDecoderConfig(width=768, grid=14),
    )


def clipb_256() -> TokenizerConfig:
    """The released text-to-image tokenizer layout: clipb at 256 px with position tables interpolated from 14
    to 16 (`infer_interpolate`), scale 16 appended (817 tokens), and the enhanced pixel decoder
    (2x channels, 2x residual blocks)."""
    base = clipb_224()
    return replace(
        base,
        image_size=256,
        quantizer=replace(base.quantizer, scales=CLIP_B_SCALES + (16,)),
        pixel_decoder=replace(base.pixel_decoder, ch=256, num_res_blocks=4),
    )


def siglip_384() -> TokenizerConfig:
    """TokenFlow-XL: SigLIP-SO400M-14-384 read at its second-to-last block, 27 x 27 grid, 2,227 tokens."""
    return TokenizerConfig(
        kind="tokenflow",
        image_size=384,
        quantizer=QuantizerConfig(scales=SIGLIP_SCALES),
        semantic_encoder=SemanticEncoderConfig(
            arch="ViT-SO400M-14-SigLIP-384",
            image_size=384,
            patch_size=14,
            width=1152,
            layers=27,
            heads=16,
            output_dim=1152,
            gelu_tanh=True,
            feature_layer=-2,
            input_norm="siglip",
            teacher_norm="siglip",
            teacher_proj=False,
        ),
        semantic_decoder=SemanticDecoderConfig(width=1152, heads=12, grid=27),
        pixel_input_size=432,
    )


def unitok() -> TokenizerConfig:
    """The released UniTok tokenizer: ViTamin-L encoder (conv stem of stride 16, 31 GeGLU blocks at 1,024),
    attention projections to a 64-d latent, 8 sub-codebooks of 4,096 eight-dim codes on the 16 x 16 grid at
    256 px, ViTamin decoder (31 blocks, conv upsampler) (ref A1). 1,170 weight tensors, 695.9 M values: the
    official tokenizer weights one for one."""
    return TokenizerConfig(
        kind="unitok",
        image_size=256,
        preprocess=PreprocessConfig(mode="resize_crop", resize_to=288),
        quantizer=QuantizerConfig(kind="multi", codebook_size=4096, dims=(8,) * 8, scales=(16,), scale_drop_prob=0.0),
        unitok=UniTokConfig(),
    )


def tiny() -> TokenizerConfig:
    """A few hundred thousand parameters at 64 px for tests and the demo: the same code paths as clipb
    (custom CLIP-style ViT, 32 + 8 dim codes, multi-scale), random init unless trained."""
    return TokenizerConfig(
        kind="tokenflow",
        image_size=64,
        quantizer=QuantizerConfig(codebook_size=1024, scales=(1, 2, 4, 6, 8)),
        semantic_encoder=SemanticEncoderConfig(
            arch="custom", image_size=64, patch_size=8, width=64, layers=2, heads=2, output_dim=48
        ),
        semantic_decoder=SemanticDecoderConfig(width=64, depth=1, heads=2, grid=8),
        pixel_encoder=PixelCNNConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32, norm_groups=8),
        pixel_decoder=PixelCNNConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32, norm_groups=8),
    )


def tiny_unitok() -> TokenizerConfig:
    """UniTok's architecture, small, at 64 px for tests: the same modules (conv stem with both MBConv stages,
    GeGLU blocks, attention projections, conv upsampler) with `pool_stride` 1, so the grid is 64 / 8 = 8 x 8;
    4 sub-codebooks of 256 x 8 dims (a 32-d latent, 2 projection heads of 32)."""
    return TokenizerConfig(
        kind="unitok",
        image_size=64,
        preprocess=PreprocessConfig(mode="resize_crop", resize_to=72),
        quantizer=QuantizerConfig(kind="multi", codebook_size=256, dims=(8,) * 4, scales=(8,), scale_drop_prob=0.0),
        unitok=UniTokConfig(
            width=64,
            encoder_layers=2,
            decoder_layers=2,
            heads=2,
            stem_widths=(16, 32),
            stage_depths=(1, 2),
            pool_stride=1,
            proj_heads=2,
            upsampler_widths=(32, 16),
            upsampler_depths=(2, 1),
        ),
    )


PRESETS = {
    "tiny": tiny,
    "tiny_unitok": tiny_unitok,
    "clipb_224": clipb_224,
    "clipb_256": clipb_256,
    "siglip_384": siglip_384,
    "unitok": unitok,
}


def preset(name: str) -> TokenizerConfig:
    """The config of a named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
