"""The LLM side of TokenFlow: pieces of the text-to-image and understanding models (pure PyTorch)."""
