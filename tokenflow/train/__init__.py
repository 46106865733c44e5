"""Tokenizer training, pure PyTorch: configs, stages, the generator/discriminator step and a local engine.

The step talks to its optimisers only through the DeepSpeed engine interface (`backward(loss)`, `step()`,
`module`), so the same code runs under a DeepSpeed engine on a cluster and under `LocalEngine` in one process.

The names below load on first use (PEP 562): the LLM jobs import `tokenflow.train.config` and
`tokenflow.train.deepspeed` without pulling in the tokenizer's models and open_clip (`stages`, `step`).
"""

import importlib

_EXPORTS = {
    "OptimizerConfig": "tokenflow.train.config",
    "TrainConfig": "tokenflow.train.config",
    "LocalEngine": "tokenflow.train.engine",
    "lr_factor": "tokenflow.train.engine",
    "prepare_stage": "tokenflow.train.stages",
    "TrainStep": "tokenflow.train.step",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokenflow.train' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
