"""Ray Data stages of the pretokenize job; each stage is a plain function or a small callable class."""
