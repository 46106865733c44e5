"""tokenflow: the TokenFlow / UniTok unified image tokenizers in plain PyTorch."""

from tokenflow.config import TokenizerConfig, preset
from tokenflow.image import ImageError, Preprocess, load_image
from tokenflow.quantize import CosineQuantizer, MultiScaleQuantizer, nearest_codes
from tokenflow.stats import CodebookStats
from tokenflow.tokenizer import Tokenizer

__all__ = [
    "Tokenizer",
    "TokenizerConfig",
    "preset",
    "CosineQuantizer",
    "MultiScaleQuantizer",
    "nearest_codes",
    "CodebookStats",
    "ImageError",
    "Preprocess",
    "load_image",
]
__version__ = "0.1.0"
