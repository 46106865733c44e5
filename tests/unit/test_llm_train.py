"""pipelines/llm_train.py: what the LLM jobs build their models in."""

import socket
import subprocess
import sys

ZERO3_BUILD = """
import os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
assert "torch._dynamo" not in sys.modules  # else this test could not fail
from pipelines.llm_train import zero3_construction
from tokenflow.llm.i2t import I2TConfig, I2TModel
from tokenflow.train import OptimizerConfig
from tokenflow.train.deepspeed import ds_config
ds = ds_config(OptimizerConfig(), zero_stage=3, micro_batch=1, grad_accum=1, world_size=1, bf16=False)
llm = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
           num_attention_heads=2, num_key_value_heads=2)
with zero3_construction(ds) as init, init:
    import torch._dynamo  # what FlexAttention and some lazily imported decoder classes do on first use
    model = I2TModel(I2TConfig(llm=llm, image_tokens=4, code_dim=8))
print("partitioned:", all(p.numel() == 0 for p in model.parameters()))
"""


def test_modules_built_under_zero3_may_import_torch_dynamo():
    """zero.Init patches torch.Tensor.__new__; torch._dynamo imported for the first time under it raised
    "Signature mismatch ... tensor_pynew". zero3_construction imports it before opening zero.Init."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-c", ZERO3_BUILD.format(port=port)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "partitioned: True" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
