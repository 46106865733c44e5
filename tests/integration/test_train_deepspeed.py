"""The training step under Ray Train + DeepSpeed on CPU: 2 workers (gloo), the tiny tokenizer, ZeRO 1, 2 and 3.

Each worker trains on its own fixed batch; the loss must fall, and after training every worker must hold the same
full weights (ZeRO-3 gathers its partitions to compare). The three stages run one after another in one worker
group (a fresh model and engines each), which saves two worker-group start-ups."""

from __future__ import annotations

STEPS = 8
DISC_START = 6  # the discriminator joins for the last two steps


def train_loop(config: dict) -> None:
    import json

    results = {zero: train_one_stage(zero) for zero in config["stages"]}
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:  # Ray Train keeps metrics only with checkpoints: use a file
        with open(config["out"], "w") as fh:
            json.dump(results, fh)


def train_one_stage(zero: int) -> dict:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dataclasses import replace

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from tokenflow import Tokenizer
    from tokenflow.config import preset
    from tokenflow.losses import LossConfig, TokenizerLoss
    from tokenflow.train import OptimizerConfig, TrainConfig, TrainStep
    from tokenflow.train.deepspeed import build_engines

    torch.manual_seed(0)
    cfg = preset("tiny")
    tok = Tokenizer(replace(cfg, quantizer=replace(cfg.quantizer, scale_drop_prob=0.0)))
    teacher = tok.make_teacher()
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0.0, disc_start=DISC_START))
    opt = OptimizerConfig(lr=1e-3)
    train_cfg = TrainConfig(max_steps=STEPS, generator=opt, discriminator=opt)
    ctx = ray.train.get_context()
    gen, disc = build_engines(tok, loss_fn, train_cfg, zero_stage=zero, micro_batch=2, world_size=ctx.get_world_size())
    step = TrainStep(tok, loss_fn, gen, disc, teacher=teacher)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(ctx.get_world_rank())) * 2 - 1
    losses, d_losses = [], []
    for s in range(STEPS):
        metrics = step(x, s)
        losses.append(metrics["loss/total"])
        d_losses.append(metrics.get("disc/d_loss", 0.0))

    params = list(tok.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero == 3):
        flat = torch.cat([p.detach().reshape(-1) for p in params])
    gathered = [torch.empty_like(flat) for _ in range(ctx.get_world_size())]
    dist.all_gather(gathered, flat)
    spread = max(float((g - gathered[0]).abs().max()) for g in gathered)
    return {"losses": losses, "d_losses": d_losses, "spread": spread, "stage": gen.zero_optimization_stage()}


def test_zero_stages_train_and_keep_workers_in_sync(ray_local, tmp_path):
    import json
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module by name
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"stages": [1, 2, 3], "out": str(tmp_path / "metrics.json")},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="zero_stages", storage_path=str(tmp_path)),
    )
    trainer.fit()
    results = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(results) == ["1", "2", "3"]
    for zero, metrics in results.items():
        losses = metrics["losses"]
        assert metrics["stage"] == int(zero)
        assert len(losses) == STEPS and losses[DISC_START - 1] < 0.85 * losses[0], (zero, losses)
        assert all(d == 0.0 for d in metrics["d_losses"][:DISC_START])  # no discriminator before disc_start
        assert all(d > 0.0 for d in metrics["d_losses"][DISC_START:])
        assert metrics["spread"] == 0.0, zero  # every worker holds identical weights
