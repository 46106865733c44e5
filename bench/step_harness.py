"""The harness of the training-step benchmarks: the same step in a plain PyTorch loop, under DeepSpeed in this
process, and under Ray Train + DeepSpeed, timed side by side (`bench/train_step.py`, `bench/train_t2i.py`).

A benchmark script supplies a `Runner` class: `Runner(engines, config)` with engines "local" (plain PyTorch)
or "deepspeed", `run(model, n) -> {"times", "losses", "params", "threads"}` (seconds and loss of each of n
steps, time.perf_counter around each call, the step count running on from call to call) and `free(model)`.

- plain: `Runner("local")` in this process;
- DS no Ray (left out with split=False): `Runner("deepspeed")` in this process too, on a one-process gloo
  group: splits the overhead into DeepSpeed's share and Ray's;
- Ray+DS: `Runner("deepspeed")` in a `TorchTrainer` with one CPU worker (gloo) on a Ray of its own
  (`address="local"`). Its fit() runs in a thread of this process; the worker runs the blocks of steps the driver
  asks for through files in a temporary directory and hands back the times it took inside the worker (Ray Train
  keeps metrics only with checkpoints).

Per model, every side first runs its warm-up steps, then the timed steps are spread over rounds in which the
sides take turns (the order rotating), so that a change in background load on a shared machine affects every
side alike. The Ray cluster is up throughout, also while the other sides run, so its idle load weighs on every
side (reported: how busy the machine was before Ray started and with the cluster up and idle). Ray starts its
workers with niceness 15 (`worker_niceness`), so on a busy machine they yield to everything else.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date

GOAL = 15.0  # percent: Ray Train + DeepSpeed may cost at most this much over the plain loop


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
    if config["keep_buffers"]:
        from pipelines.cpu_allocator import keep_large_buffers

        keep_large_buffers()
    runner = config["runner"]("deepspeed", config)
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

    def __init__(self, runner: type, config: dict):
        import threading

        import cloudpickle
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from pipelines.cpu_allocator import CPU_WORKER_ENV

        # the benchmark scripts are not an installed package: the worker gets this module and the script's
        # Runner by value (a script's own definitions live in __main__, which cloudpickle ships by value anyway)
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        self.ray = ray
        threads = config["threads"]
        system = {} if config["worker_niceness"] is None else {"worker_niceness": config["worker_niceness"]}
        # address="local": a Ray of our own, never a cluster already running on the machine
        ray.init(
            address="local", num_cpus=threads + 1, include_dashboard=False, log_to_driver=False, _system_config=system
        )
        self.dir = tempfile.mkdtemp(prefix="bench-step-")
        self.trainer = TorchTrainer(
            ray_worker,
            train_loop_config={**config, "runner": runner, "dir": self.dir},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(
                name="step_bench",
                storage_path=self.dir,
                worker_runtime_env={"env_vars": CPU_WORKER_ENV} if config["keep_buffers"] else None,
            ),
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


def measure(runner: type, config: dict, split: bool) -> tuple[dict, dict]:
    """{side: {model: run}} with the timed steps of every side interleaved in rounds, and facts about the
    machine: the Ray worker's niceness, how busy the machine was before Ray and with the Ray cluster idle.
    config: models, warmup, steps, rounds, threads, worker_niceness, and whatever the Runner reads."""
    facts = {"busy_before": machine_busy(5.0)}
    if config["keep_buffers"]:  # every side, as the training jobs' CPU workers do (worker_device)
        from pipelines.cpu_allocator import keep_large_buffers

        keep_large_buffers()
    ray_side = RaySide(runner, config)  # first: Ray's start-up is not timed, and its environment stays Ray's own
    try:
        with process_group() if split else contextlib.nullcontext():
            sides = {"plain": runner("local", config)}
            if split:
                sides["ds"] = runner("deepspeed", config)
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
    """Largest relative difference of the loss over the first n steps."""
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a[:n], b[:n]))


def print_report(results: dict, facts: dict, models: list[str], split: bool, describe) -> None:
    """The side-by-side table. describe(model, results) -> [(column, width, value)]: the script's own columns
    (size, parameter counts) after the model's name."""
    threads = results["ray"][models[0]]["threads"]
    print(f"# Ray worker: {threads} torch threads, niceness {facts['niceness']} (this process {os.nice(0)})")
    print(
        f"# machine busy (all cores, whatever runs): {facts['busy_before']:.1f}% before Ray started,"
        f" {facts['busy_ray_idle']:.1f}% with this Ray cluster up and idle (5 s each)"
    )
    print()
    own = describe(models[0], results)
    cols = [("model", 6, "")] + [(name, w, "") for name, w, _ in own] + [("plain", 13, "ms med/mean")]
    cols += [("DS no Ray", 13, "ms med/mean")] if split else []
    cols += [("Ray+DS", 13, "ms med/mean"), ("overhead", 10, "median")]
    cols += [("of it DS", 10, "median")] if split else []
    cols += [("goal", 8, ""), ("", 6, ""), ("loss diff", 11, "steps 0-1")]
    print("".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w, _) in enumerate(cols)))
    print("".join(f"{unit:>{w}}" for _, w, unit in cols))
    for model in models:
        plain = results["plain"][model]
        p_med, p_mean = ms(plain["times"])
        r_med, r_mean = ms(results["ray"][model]["times"])
        overhead = (r_med / p_med - 1) * 100
        row = [f"{model:<6}"] + [f"{value:>{w}}" for _, w, value in describe(model, results)]
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
    print("# loss diff: largest relative difference from plain of the loss of the first two steps")


def parse_config(description: str, models: list[str], argv: list[str] | None, **defaults) -> tuple[dict, bool]:
    """The benchmarks' shared command line -> (config for `measure`, split). defaults: steps, warmup,
    micro_batch (the script's own)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=defaults["steps"], help="timed steps per model and side")
    p.add_argument("--warmup", type=int, default=defaults["warmup"], help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=5, help="rounds the timed steps are spread over (default 5)")
    p.add_argument("--micro-batch", type=int, default=defaults["micro_batch"], help="samples per step")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (default 2)")
    p.add_argument("--models", default=",".join(models), help=f"comma-separated, of {models}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on every side (all cores)")
    p.add_argument("--worker-niceness", type=int, help="nice value of the Ray workers (default: Ray's own, 15)")
    p.add_argument("--no-split", action="store_true", help="leave out DeepSpeed in this process (no Ray)")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (default: every side keeps freed large buffers, as the training jobs' "
        "CPU workers do; pipelines.cpu_allocator.keep_large_buffers)",
    )
    args = p.parse_args(argv)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(models))
    if unknown or not chosen:
        p.error(f"unknown model(s) {unknown}; known: {models}")
    if min(args.steps, args.rounds, args.micro_batch, args.threads) < 1 or args.warmup < 0:
        p.error("--steps, --rounds, --micro-batch and --threads must be >= 1, --warmup >= 0")
    config = {
        "models": chosen,
        "micro_batch": args.micro_batch,
        "zero_stage": args.zero_stage,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "worker_niceness": args.worker_niceness,
        "keep_buffers": not args.default_malloc,
    }
    return config, not args.no_split


def print_header(config: dict, what: str) -> None:
    print(f"# {date.today()}  {describe_machine(config['threads'])}")
    print(
        f"# micro-batch {config['micro_batch']}, ZeRO-{config['zero_stage']}, per side {config['warmup']} warm-up +"
        f" {config['steps']} timed steps in {min(config['rounds'], config['steps'])} interleaved rounds; {what};"
        f" malloc {'keeps freed large buffers' if config['keep_buffers'] else 'as glibc defaults'}",
        flush=True,
    )


def main(description: str, runner: type, models: list[str], argv, *, what: str, describe, **defaults) -> int:
    """A benchmark script's whole run: parse, measure, print."""
    config, split = parse_config(description, models, argv, **defaults)
    print_header(config, what)
    results, facts = measure(runner, config, split)
    print_report(results, facts, config["models"], split, describe)
    return 0
