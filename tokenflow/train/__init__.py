"""Tokenizer training, pure PyTorch: configs, stages, the generator/discriminator step and a local engine.

The step talks to its optimisers only through the DeepSpeed engine interface (`backward(loss)`, `step()`,
`module`), so the same code runs under a DeepSpeed engine on a cluster and under `LocalEngine` in one process.
"""

from tokenflow.train.config import OptimizerConfig, TrainConfig
from tokenflow.train.engine import LocalEngine, lr_factor
from tokenflow.train.stages import prepare_stage
from tokenflow.train.step import TrainStep

__all__ = ["OptimizerConfig", "TrainConfig", "LocalEngine", "lr_factor", "prepare_stage", "TrainStep"]
