"""The tokenizer training job for real: Ray Data -> Ray Train (2 CPU workers) + DeepSpeed ZeRO-3 -> S3 and a
real MLflow server. A run hit by a killed worker (replaced by Ray Train, resumed from the last checkpoint) ends with
exactly the weights of an uninterrupted run, tracks everything in one MLflow run, and exports a tokenizer that
loads and pretokenizes. (One test: each training run costs minutes of the suite's time on 2 cores.)
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import s3fs
from PIL import Image

from pipelines.train_data import TrainDataConfig
from pipelines.train_tokenizer import TrainTokenizerConfig, run
from tests.integration.ray_procs import kill_a_worker_after
from tokenflow.losses import LossConfig
from tokenflow.train import OptimizerConfig, TrainConfig


def _photos(root, n: int, *, identical: bool = False) -> str:
    from skimage import data

    root.mkdir(parents=True, exist_ok=True)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        if identical:
            img = Image.fromarray(photos[0]).resize((64, 64), Image.BICUBIC)
        else:
            p = photos[i % 4]
            h, w = p.shape[:2]
            y, x = rng.integers(0, h // 3), rng.integers(0, w // 3)
            img = Image.fromarray(p[y : y + h // 2, x : x + w // 2])
        img.save(root / f"img{i:03d}.png")
    return str(root)


def _config(tmp_path, corpus: str, name: str, *, max_steps: int, **kw) -> TrainTokenizerConfig:
    opt = OptimizerConfig(lr=1e-3, warmup_steps=3)
    data = kw.pop("data", TrainDataConfig(input=[corpus], eval_fraction=0.0, eval_images=0, read_batch_rows=4))
    return TrainTokenizerConfig(
        tokenizer="preset:tiny",
        data=data,
        train=TrainConfig(
            max_steps=max_steps,
            generator=opt,
            discriminator=opt,
            loss=LossConfig(perceptual_weight=0.0, disc_start=2),
        ),
        **{
            "micro_batch": 2,
            "workers": 2,
            "storage_path": str(tmp_path / "runs"),
            "name": name,
            "checkpoint_every": 2,
            "log_every": 1,
            "image_every": 2,
            "eval_every": 0,
            **kw,
        },
    )


def _weights(tokenizer_dir: str, storage_options: dict | None = None) -> dict:
    from tokenflow import Tokenizer

    return Tokenizer.from_pretrained(tokenizer_dir, storage_options=storage_options).state_dict()


def test_a_zero3_run_on_s3_hit_by_a_killed_worker_ends_as_an_uninterrupted_run_and_tracks_it_in_mlflow(
    s3_endpoint, ray_local, mlflow_server, tmp_path
):
    """Two ZeRO-3 runs of one config side by side: one uninterrupted (local storage), one with its checkpoints and
    tokenizer on S3 (moto, 127.0.0.1) and a real MLflow server, whose worker is killed after the step-4
    checkpoint (Ray Train replaces it; the run resumes from that checkpoint). The resumed run ends with exactly the
    uninterrupted run's weights, all in one MLflow run with losses, codebook statistics, throughput, rejects, eval
    PSNR/SSIM and images, and exports a tokenizer that loads and pretokenizes.

    Every training sample is the same square image (plus one corrupt file) and the crop is the whole image: the
    data order cannot matter, so equality tests what the checkpoint restores (weights, both optimisers, lr
    schedules, step, RNG states). (Rerunning a stopped run's command resumes it through the same checkpoint code:
    the text-to-image job's test, tests/integration/test_train_t2i.py.)"""
    from mlflow.tracking import MlflowClient

    from pipelines.filters import FilterConfig
    from pipelines.pretokenize import PretokenizeConfig
    from pipelines.pretokenize import run as pretokenize
    from tokenflow import Tokenizer

    corpus = _photos(tmp_path / "corpus", 16, identical=True)
    (tmp_path / "corpus" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    held = _photos(tmp_path / "held_out", 3)
    data = TrainDataConfig(
        input=[corpus], eval_input=[held], eval_images=3, read_batch_rows=4, min_crop_frac=1.0, flip_prob=0.0
    )
    steps = 8
    # checkpoints, images and evaluations at 4 (after which a worker is killed) and 8; two runs side by side leave
    # CPUs for read tasks
    every = dict(checkpoint_every=4, image_every=4, eval_every=4, cpus_per_worker=0.5, zero_stage=3)
    straight = _config(tmp_path, corpus, "straight", max_steps=steps, data=data, **every)
    storage = {"endpoint_url": s3_endpoint}
    resumed = _config(
        tmp_path,
        corpus,
        "resumed",
        max_steps=steps,
        data=data,
        mlflow_uri=mlflow_server,
        mlflow_experiment="train-zero3",
        dataset_name="test-corpus",
        storage_path="s3://tokenflow-test/train-runs",  # checkpoints and the tokenizer on S3
        s3_endpoint=s3_endpoint,
        max_failures=1,
        **every,
    )
    done: dict = {}
    side = threading.Thread(target=lambda: done.update(summary=run(straight)), daemon=True)
    side.start()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run(resumed)), daemon=True)
    thread.start()
    kill_a_worker_after(
        "s3://tokenflow-test/train-runs/resumed", "step_00000004", thread.is_alive, storage_options=storage
    )
    thread.join(timeout=600)
    side.join(timeout=600)
    assert "summary" in done, "the uninterrupted run did not complete"
    assert "summary" in result, "the run did not complete after the worker was killed"
    assert result["summary"]["tokenizer"] == resumed.tokenizer_dir

    # ZeRO-3 partitions gathered into plain weights, equal to the uninterrupted run's
    a, b = _weights(straight.tokenizer_dir), _weights(resumed.tokenizer_dir, storage)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])][:5]
    initial = Tokenizer.from_preset("tiny").state_dict()
    assert not any(v.equal(initial[k]) for k, v in b.items() if "decoder" in k and v.numel() > 100)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    state = json.loads(fs.cat(f"tokenflow-test/train-runs/resumed/step_{steps:08d}/state.json"))
    assert state["step"] == steps and state["restarts"] == 1
    assert fs.exists(f"tokenflow-test/train-runs/resumed/step_{steps:08d}/rng/rank_1.pt")

    client = MlflowClient(mlflow_server)
    (run_,) = client.search_runs([client.get_experiment_by_name("train-zero3").experiment_id])  # one run
    assert run_.info.status == "FINISHED"
    assert run_.data.params["zero_stage"] == "3" and run_.data.params["train.max_steps"] == str(steps)
    assert run_.data.tags["dataset"] == "test-corpus" and len(run_.data.tags["git_commit"]) in (40, 7)

    def history(key):  # the restarted worker may log a step again: the last value counts
        return {m.step: m.value for m in client.get_metric_history(run_.info.run_id, key)}

    assert sorted(history("loss/total")) == list(range(1, steps + 1))
    assert all(np.isfinite(v) for v in history("loss/total").values())
    assert set(history("disc/d_loss")) == set(range(1, steps + 1))
    assert history("lr")[1] == pytest.approx(1e-3 / 3 * 2)  # warm-up: lr after the first optimiser step
    assert history("throughput/images_per_s")[steps] > 0
    assert history("data/samples_seen")[steps] == steps * 2 * 2
    # 16 good images: at most 4 steps of 2 workers x 2 images per epoch; every epoch reads the corrupt file again,
    # counted across the restart
    epochs = history("data/epoch")
    assert epochs[1] == 0 and epochs[steps] >= 1 and list(epochs.values()) == sorted(epochs.values())
    assert 1 <= history("data/rejected")[steps] <= epochs[steps] + 2  # read-ahead may reach the next epoch
    assert history("data/rejected.decode_error")[steps] == history("data/rejected")[steps]
    for scale in (1, 2, 4, 6, 8):  # exact per-scale statistics over each window (a step) of 2 workers x 2 images
        usage, perplexity = history(f"codebook/usage/s{scale}"), history(f"codebook/perplexity/s{scale}")
        assert all(0 <= u <= min(1.0, 4 * scale * scale / 1024) for u in usage.values())
        assert usage[steps] > 0 if scale == 1 else max(usage.values()) > 0  # the random scale drop skips later scales
        assert all(1.0 <= p <= 4 * scale * scale for p in perplexity.values())
    assert history("codebook/dead/s1")[steps] >= 1024 - 4
    assert 0 < history("codebook/distance_semantic")[steps] and 0 < history("codebook/distance_pixel")[steps]
    psnr, ssim = history("eval/psnr"), history("eval/ssim")
    assert sorted(psnr) == [4, 8] and all(5 < v < 60 for v in psnr.values())
    assert all(-1 < v <= 1 for v in ssim.values()) and history("eval/images")[steps] == 3.0

    def artifacts(path):
        return sorted(a.path for a in client.list_artifacts(run_.info.run_id, path))

    assert artifacts("train/reconstructions") == [f"train/reconstructions/step_{s:08d}.png" for s in (4, 8)]
    assert len(artifacts("codebook")) == 2 and len(artifacts("eval/reconstructions")) == 2
    assert artifacts("tokenizer") == ["tokenizer/config.json", "tokenizer/model.safetensors"]

    tok = Tokenizer.from_pretrained(resumed.tokenizer_dir, storage_options=storage)
    provenance = json.loads(fs.cat(f"{resumed.tokenizer_dir}/config.json"))["provenance"]
    assert provenance["steps"] == steps and provenance["mlflow_run_id"] == run_.info.run_id
    manifest = pretokenize(
        PretokenizeConfig(
            input=[held],
            output=str(tmp_path / "tokens"),
            tokenizer=resumed.tokenizer_dir,
            s3_endpoint=s3_endpoint,
            filters=FilterConfig(require_caption=False),
            tokenizer_actors=1,
        )
    )
    assert manifest["counts"]["kept"] == 3 and manifest["tokenizer_id"] == tok.fingerprint()
