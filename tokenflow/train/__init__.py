"""Tokenizer training, pure PyTorch: configs, stages, the generator/discriminator step and a local engine.

The step talks to its optimisers only through the DeepSpeed engine interface (`backward(loss)`, `step()`,
`module`), so the same code runs under a DeepSpeed engine on a cluster and under `LocalEngine` in one process.

The names below load on first use (PEP 562): the LLM jobs import `tokenflow.train.config` and
`tokenflow.train.deepspeed` without pulling in the tokenizer's models and open_clip (`stages`, `step`).
"""

from tokenflow._lazy import lazy_exports

_EXPORTS = {
    "OptimizerConfig": "tokenflow.train.config",
    "TrainConfig": "tokenflow.train.config",
    "LocalEngine": "tokenflow.train.engine",
    "lr_factor": "tokenflow.train.engine",
    "lr_schedule": "tokenflow.train.engine",
    "prepare_stage": "tokenflow.train.stages",
    "TrainStep": "tokenflow.train.step",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports("tokenflow.train", _EXPORTS, globals())
