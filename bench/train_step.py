"""Step time of the tokenizer training step under Ray Train + DeepSpeed (1 worker) vs a plain PyTorch loop.

    python bench/train_step.py          # tiny and mid, micro-batch 4, ZeRO-2, 3 warm-up + 20 steps, 5 rounds
    python bench/train_step.py --models mid --steps 50 --zero-stage 0 --worker-niceness 0

Every side does the same math: the same seeded tokenizer and discriminator (`TokenizerLoss`, PatchGAN, no
LPIPS as there are no VGG weights offline), the same fixed random batch, the full stage with its semantic
teacher, the discriminator on from step 0 (disc_start 0, so its forward, backward and step are timed too),
scale drop off, fp32, the same torch thread count (`--threads`, default all cores).

- plain: `TrainStep` over two `LocalEngine`s (torch Adam, clipping) in this process;
- DS no Ray (left out with --no-split): `build_engines(zero_stage=Z)` + `TrainStep` in this process too, on a
  one-process gloo group: splits the overhead into DeepSpeed's share and Ray's;
- Ray+DS: a `TorchTrainer` with one CPU worker (gloo) on a Ray of its own (`address="local"`), running
  `build_engines` + `TrainStep`. Its fit() runs in a thread of this process; the worker runs the blocks of
  steps the driver asks for through files in a temporary directory and hands back the times it took inside
  the worker (Ray Train keeps metrics only with checkpoints).

Each step is timed with `time.perf_counter` around `step(pixels, s)`. Per model, every side first runs its
`--warmup` untimed steps, then the `--steps` timed steps are spread over `--rounds` rounds in which the sides
take turns (the order rotating), so that a change in background load on a shared machine affects every side
alike. The Ray cluster is up throughout, also while the other sides run, so its idle load weighs on every
side (printed: how busy the machine was before Ray started and with the cluster up and idle).

The table gives the median (and mean) ms/step, the overhead (Ray+DS / plain - 1) on medians against the goal
of at most 15 %, and the largest relative difference from plain of the total loss over the first two steps: a
check that the sides do the same math. Later steps drift apart on any side: ZeRO's flat buffers round in a
different order, and this training from random init amplifies last-bit differences (weights nudged by 1e-7
after step 0 change some step-1 gradients by 1 %, in the plain loop alone). Ray starts its workers with
niceness 15 (`worker_niceness`), so on a busy machine they yield to everything else: `--worker-niceness 0`.

The "mid" tokenizer is the tiny preset scaled up to roughly 0.5-2 s per step on a 2-core CPU at micro-batch
4: 128 px, a 192-wide 4-layer ViT (patch 16), a 5-level pixel CNN of width 32 with 2 residual blocks per
level, a codebook of 4,096, the same 8 x 8 grid and scales as tiny.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import date

import torch

from tokenflow.config import TokenizerConfig, preset

GOAL = 15.0  # percent
SEED = 0


def tiny_config() -> TokenizerConfig:
    cfg = preset("tiny")
    return replace(cfg, quantizer=replace(cfg.quantizer, scale_drop_prob=0.0))


def mid_config() -> TokenizerConfig:
    cfg = tiny_config()
    cnn = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=64, norm_groups=16)  # stride 16
    return replace(
        cfg,
        image_size=128,
        quantizer=replace(cfg.quantizer, codebook_size=4096),
        semantic_encoder=replace(
            cfg.semantic_encoder, image_size=128, patch_size=16, width=192, layers=4, heads=3, output_dim=128
        ),
        semantic_decoder=replace(cfg.semantic_decoder, width=192, depth=2, heads=3),
        pixel_encoder=replace(cfg.pixel_encoder, **cnn),
        pixel_decoder=replace(cfg.pixel_decoder, **cnn),
    )


MODELS = {"tiny": tiny_config, "mid": mid_config}


def build(model: str, micro_batch: int):
    """(tokenizer, teacher, loss, train config, fixed batch), seeded: identical in the driver and the worker."""
    from tokenflow import Tokenizer
    from tokenflow.losses import LossConfig, TokenizerLoss
    from tokenflow.train import OptimizerConfig, TrainConfig

    cfg = MODELS[model]()
    torch.manual_seed(SEED)
    tok = Tokenizer(cfg)
    teacher = tok.make_teacher()
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0.0, disc_start=0))
    opt = OptimizerConfig(lr=1e-4)
    train_cfg = TrainConfig(max_steps=100_000, generator=opt, discriminator=opt, loss=loss_fn.cfg)
    g = torch.Generator().manual_seed(SEED)
    pixels = torch.rand(micro_batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    return tok, teacher, loss_fn, train_cfg, pixels


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6


class Runner:
    """Builds each model's `TrainStep` on first use (LocalEngines or DeepSpeed engines) and runs blocks of
    steps on it, its step count running on from block to block."""

    def __init__(self, engines: str, config: dict):
        self.engines, self.config = engines, config
        self.steps: dict[str, tuple] = {}
        self.done: dict[str, int] = {}
        torch.set_num_threads(config["threads"])

    def _build(self, model: str):
        from tokenflow.train import LocalEngine, TrainStep

        tok, teacher, loss_fn, cfg, pixels = build(model, self.config["micro_batch"])
        if self.engines == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            from tokenflow.train.deepspeed import build_engines

            stage, micro_batch = self.config["zero_stage"], self.config["micro_batch"]
            gen, disc = build_engines(tok, loss_fn, cfg, zero_stage=stage, micro_batch=micro_batch, world_size=1)
        else:
            gen = LocalEngine(tok, cfg.generator, max_steps=cfg.max_steps, grad_accum=cfg.grad_accum)
            disc = LocalEngine(
                loss_fn.discriminator, cfg.discriminator, max_steps=cfg.max_steps, grad_accum=cfg.grad_accum
            )
        step = TrainStep(tok, loss_fn, gen, disc, teacher=teacher, stage=cfg.stage)
        return step, pixels, (params_m(tok), params_m(loss_fn.discriminator))

    def run(self, model: str, n: int) -> dict:
        """Seconds and total loss of each of n steps (time.perf_counter around each call)."""
        if model not in self.steps:
            self.steps[model] = self._build(model)
            self.done[model] = 0
        step, pixels, params = self.steps[model]
        times, losses = [], []
        for _ in range(n):
            start = time.perf_counter()
            metrics = step(pixels, self.done[model])
            times.append(time.perf_counter() - start)
            losses.append(metrics["loss/total"])
            self.done[model] += 1
        return {"times": times, "losses": losses, "params": params, "threads": torch.get_num_threads()}

    def free(self, model: str) -> None:
        self.steps.pop(model, None)


def write_json(path: str, data) -> None:
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh)
    os.replace(path + ".tmp", path)  # readers never see half a file


def wait_json(path: str, alive=lambda: None, poll: float = 0.01):
    """The JSON in `path` once it exists; `alive()` is called while waiting and raises if the writer died."""
    while not os.path.exists(path):
        alive()
        time.sleep(poll)
    with open(path) as fh:
        return json.load(fh)


def ray_worker(config: dict) -> None:
    """The Ray Train worker: a DeepSpeed `Runner` that runs the blocks the driver asks for, one at a time
    (config["dir"]/cmd-K.json -> res-K.json), so that its blocks interleave with the driver's own."""
    runner = Runner("deepspeed", config)
    write_json(os.path.join(config["dir"], "ready.json"), {"niceness": os.nice(0)})
    k = 0
    while True:
        cmd = wait_json(os.path.join(config["dir"], f"cmd-{k}.json"))
        if cmd["op"] == "stop":
            return
        if cmd["op"] == "free":
            runner.free(cmd["model"])
            out = {}
        else:
            out = runner.run(cmd["model"], cmd["steps"])
        write_json(os.path.join(config["dir"], f"res-{k}.json"), out)
        k += 1


class RaySide:
    """A `Runner` in a Ray Train worker: a TorchTrainer with one CPU worker (gloo, DeepSpeed engines) on a Ray
    of its own, its fit() in a thread of this process, driven block by block through files."""

    def __init__(self, config: dict):
        import threading

        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        self.ray = ray
        threads = config["threads"]
        system = {} if config["worker_niceness"] is None else {"worker_niceness": config["worker_niceness"]}
        # address="local": a Ray of our own, never a cluster already running on the machine
        ray.init(
            address="local", num_cpus=threads + 1, include_dashboard=False, log_to_driver=False, _system_config=system
        )
        self.dir = tempfile.mkdtemp(prefix="bench-train-step-")
        # run as a script this module is __main__, which cloudpickle ships by value: no import in the worker
        self.trainer = TorchTrainer(
            ray_worker,
            train_loop_config={**config, "dir": self.dir},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(name="train_step_bench", storage_path=self.dir),
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, daemon=True)
        self.thread.start()
        self.k = 0
        self.niceness = wait_json(os.path.join(self.dir, "ready.json"), self._alive)["niceness"]

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # handed to the main thread by _alive
            self.error = e

    def _alive(self) -> None:
        if self.error is not None:
            raise RuntimeError("the Ray Train run failed") from self.error
        if not self.thread.is_alive():
            raise RuntimeError("the Ray Train run ended before its last block")

    def _call(self, cmd: dict) -> dict:
        write_json(os.path.join(self.dir, f"cmd-{self.k}.json"), cmd)
        out = wait_json(os.path.join(self.dir, f"res-{self.k}.json"), self._alive)
        self.k += 1
        return out

    def run(self, model: str, n: int) -> dict:
        return self._call({"op": "run", "model": model, "steps": n})

    def free(self, model: str) -> None:
        self._call({"op": "free", "model": model})

    def close(self) -> None:
        import shutil

        try:
            if self.error is None and self.thread.is_alive():
                write_json(os.path.join(self.dir, f"cmd-{self.k}.json"), {"op": "stop"})
                self.thread.join(timeout=120)
        finally:
            self.ray.shutdown()
            shutil.rmtree(self.dir, ignore_errors=True)


def machine_busy(seconds: float) -> float:
    """Percent of all cores' time the whole machine spent busy over the next `seconds` (from /proc/stat)."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            ticks = [int(x) for x in fh.readline().split()[1:]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # all but idle and iowait

    try:
        busy0, total0 = read()
        time.sleep(seconds)
        busy1, total1 = read()
    except OSError:
        return float("nan")
    return 100 * (busy1 - busy0) / max(total1 - total0, 1)


@contextlib.contextmanager
def process_group():
    """A one-process gloo group in this process (for the in-process DeepSpeed side), on a free local port; the
    environment it needs is restored afterwards."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(config: dict, split: bool) -> tuple[dict, dict]:
    """{side: {model: run}} with the timed steps of every side interleaved in rounds, and facts about the
    machine: the Ray worker's niceness, how busy the machine was before Ray and with the Ray cluster idle. Per
    model: every side's warm-up, then `rounds` rounds in which each side runs its share of the timed steps, the
    order of the sides rotating from round to round."""
    facts = {"busy_before": machine_busy(5.0)}
    ray_side = RaySide(config)  # first: Ray's start-up is not timed, and its environment stays Ray's own
    try:
        with process_group() if split else contextlib.nullcontext():
            sides = {"plain": Runner("local", config)}
            if split:
                sides["ds"] = Runner("deepspeed", config)
            sides["ray"] = ray_side
            names = list(sides)
            results: dict[str, dict] = {name: {} for name in names}
            rounds = min(config["rounds"], config["steps"])
            for model in config["models"]:
                for name in names:
                    out = sides[name].run(model, config["warmup"])
                    results[name][model] = {**out, "times": []}
                for r in range(rounds):
                    share = config["steps"] // rounds + (r < config["steps"] % rounds)
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        out = sides[name].run(model, share)
                        results[name][model]["times"] += out["times"]
                        results[name][model]["losses"] += out["losses"]
                for name in names:
                    sides[name].free(model)
                plain_ms = ms(results["plain"][model]["times"])[0]
                print(f"{model}: plain {plain_ms:.0f} ms/step, Ray+DS {ms(results['ray'][model]['times'])[0]:.0f}")
            facts["niceness"] = ray_side.niceness
            facts["busy_ray_idle"] = machine_busy(5.0)
            return results, facts
    finally:
        ray_side.close()


def describe_machine(threads: int) -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if "model name" in line), "?")
    except OSError:
        pass
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("torch", "deepspeed", "ray"))
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {threads} torch threads; {versions}"


def ms(times: list[float]) -> tuple[float, float]:
    return 1e3 * statistics.median(times), 1e3 * statistics.mean(times)


def loss_diff(a: list[float], b: list[float], n: int = 2) -> float:
    """Largest relative difference of the total loss over the first n steps."""
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a[:n], b[:n]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per model and side (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="rounds the timed steps are spread over (default 5)")
    p.add_argument("--micro-batch", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (default 2)")
    p.add_argument("--models", default="tiny,mid", help=f"comma-separated, of {sorted(MODELS)} (default tiny,mid)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on every side (all cores)")
    p.add_argument("--worker-niceness", type=int, help="nice value of the Ray workers (default: Ray's own, 15)")
    p.add_argument("--no-split", action="store_true", help="leave out DeepSpeed in this process (no Ray)")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        p.error(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    if min(args.steps, args.rounds, args.micro_batch, args.threads) < 1 or args.warmup < 0:
        p.error("--steps, --rounds, --micro-batch and --threads must be >= 1, --warmup >= 0")
    config = {
        "models": models,
        "micro_batch": args.micro_batch,
        "zero_stage": args.zero_stage,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "worker_niceness": args.worker_niceness,
    }
    split = not args.no_split

    print(f"# {date.today()}  {describe_machine(args.threads)}")
    print(
        f"# micro-batch {args.micro_batch}, ZeRO-{args.zero_stage}, per side {args.warmup} warm-up + {args.steps} timed"
        f" steps in {min(args.rounds, args.steps)} interleaved rounds; fixed random batch, fp32, full stage with"
        " teacher, discriminator from step 0, no LPIPS",
        flush=True,
    )
    results, facts = measure(config, split)
    threads = results["ray"][models[0]]["threads"]
    print(f"# Ray worker: {threads} torch threads, niceness {facts['niceness']} (this process {os.nice(0)})")
    print(
        f"# machine busy (all cores, whatever runs): {facts['busy_before']:.1f}% before Ray started,"
        f" {facts['busy_ray_idle']:.1f}% with this Ray cluster up and idle (5 s each)"
    )
    print()

    cols = [("model", 6), ("px", 5), ("params M G + D", 16), ("plain", 13)]
    cols += [("DS no Ray", 13)] if split else []
    cols += [("Ray+DS", 13), ("overhead", 10)]
    cols += [("of it DS", 10)] if split else []
    cols += [("goal", 8), ("", 6), ("loss diff", 11)]
    print("".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(cols)))
    units = ["", "", "", "ms med/mean"] + (["ms med/mean"] if split else []) + ["ms med/mean", "median"]
    units += (["median"] if split else []) + ["", "", "steps 0-1"]
    print("".join(f"{u:>{w}}" for u, (_, w) in zip(units, cols)))
    for model in models:
        plain = results["plain"][model]
        g, d = plain["params"]
        p_med, p_mean = ms(plain["times"])
        r_med, r_mean = ms(results["ray"][model]["times"])
        overhead = (r_med / p_med - 1) * 100
        row = [f"{model:<6}", f"{MODELS[model]().image_size:>5}", f"{f'{g:.2f} + {d:.2f}':>16}"]
        row.append(f"{f'{p_med:.0f} / {p_mean:.0f}':>13}")
        if split:
            l_med, l_mean = ms(results["ds"][model]["times"])
            row.append(f"{f'{l_med:.0f} / {l_mean:.0f}':>13}")
        row += [f"{f'{r_med:.0f} / {r_mean:.0f}':>13}", f"{overhead:>+9.1f}%"]
        if split:
            row.append(f"{(l_med / p_med - 1) * 100:>+9.1f}%")
        row += [f"{f'<= {GOAL:.0f}%':>8}", f"{'ok' if overhead <= GOAL else 'OVER':>6}"]
        diffs = [loss_diff(plain["losses"], results[name][model]["losses"]) for name in results if name != "plain"]
        row.append(f"{max(diffs):>11.1e}")
        print("".join(row))
    print("# overhead = Ray+DS median / plain median - 1", end="")
    print("; of it DS = the same for DeepSpeed in this process, without Ray" if split else "")
    print("# loss diff: largest relative difference from plain of the total loss of the first two steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
