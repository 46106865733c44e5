"""tokenflow: the TokenFlow / UniTok unified image tokenizers in plain PyTorch.

The names below load on first use (PEP 562), so that light modules such as `tokenflow.llm.templates` or
`tokenflow.config`, which Ray Data read tasks import in fresh processes, do not pull in open_clip and the models."""

from tokenflow._lazy import lazy_exports

_EXPORTS = {
    "Tokenizer": "tokenflow.tokenizer",
    "TokenizerConfig": "tokenflow.config",
    "preset": "tokenflow.config",
    "CosineQuantizer": "tokenflow.quantize",
    "MultiScaleQuantizer": "tokenflow.quantize",
    "nearest_codes": "tokenflow.quantize",
    "CodebookStats": "tokenflow.stats",
    "ImageError": "tokenflow.image",
    "Preprocess": "tokenflow.image",
    "load_image": "tokenflow.image",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


__getattr__, __dir__ = lazy_exports("tokenflow", _EXPORTS, globals())
