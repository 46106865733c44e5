"""The tokenizer networks: TokenFlow (dual codebook) and UniTok (multi-codebook)."""

from tokenflow.models.tokenflow import TokenFlowModel, TokenizerOutput
from tokenflow.models.unitok import UniTokModel

__all__ = ["TokenFlowModel", "UniTokModel", "TokenizerOutput"]
