"""jobs/eval_t2i.py end to end: a hand-made generated directory (real photos at 64 px, written by the generator's
OutputWriter), a reference directory of photos of other sizes with a corrupt file, a tiny random CLIP and a small
random feature extractor (a torch.export archive given as --inception), metrics checked against direct
computations, MLflow in a local sqlite store."""

import io
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage import data
from torch import nn

from jobs.eval_t2i import main
from pipelines.generate import GenerateConfig, OutputWriter
from tests.integration.tiny_clip import save_tiny_clip
from tokenflow.image import Preprocess

PROMPTS = ["an astronaut", "a cup of coffee", "a ginger cat", "a rocket on its launch pad"]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
REFERENCE = ["hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "colorwheel", "clock"]


class SmallFeatures(nn.Module):
    """uint8 N x 3 x 64 x 64 -> N x 4 features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, stride=4)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x.float() / 127.5 - 1))).mean((2, 3))


def _png(name: str, size: int, variant: int) -> bytes:
    img = Image.fromarray(getattr(data, name)()).convert("RGB")
    w, h = img.size
    s = min(w, h) - 40 * variant  # two different square crops per photo
    img = img.crop((variant * 20, variant * 20, variant * 20 + s, variant * 20 + s)).resize((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_generated(root, *, geneval: bool = False) -> None:
    cfg = GenerateConfig(
        model="unused",
        tokenizer="unused",
        output=str(root),
        prompts=PROMPTS,
        images_per_prompt=2,
        geneval_layout=geneval,
    )
    writer = OutputWriter(cfg)
    for row in cfg.rows():
        png = _png(PHOTOS[row["prompt_index"]], 64, row["image"])
        writer.add(row["index"], row["prompt_index"], row["image"], row["prompt"], row["seed"], [1, 2, 3], png)
    writer.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):

    root = tmp_path_factory.mktemp("eval")
    clip, _, _ = save_tiny_clip(root, "tiny-clip-eval")

    torch.manual_seed(1)
    net = SmallFeatures().eval()
    example = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, root / "features.pt2")

    _write_generated(root / "generated")
    ref = root / "reference"
    (ref / "sub").mkdir(parents=True)
    for i, name in enumerate(REFERENCE):  # other sizes and aspect ratios, some greyscale, one in a subfolder
        Image.fromarray(getattr(data, name)()).save(ref / ("sub" if i == 0 else "") / f"{name}.png")
    (ref / "broken.jpg").write_bytes(b"this is not an image")
    (ref / "captions.txt").write_text("not an image")
    return {"root": root, "net": net, "clip": clip}


def _args(s, *extra):
    root = s["root"]
    return [
        "--generated",
        str(root / "generated"),
        "--reference",
        str(root / "reference"),
        "--inception",
        str(root / "features.pt2"),
        "--clip-model",
        "tiny-clip-eval",
        "--clip-pretrained",
        str(root / "tiny-clip-eval.pt"),
        "--clip-model-config",
        str(root / "tiny-clip-eval.json"),
        "--batch-size",
        "3",
        "--device",
        "cpu",
        *extra,
    ]


def _generated_images(root) -> list[np.ndarray]:
    return [np.asarray(Image.open(root / "generated" / "images" / f"{i:05d}.png").convert("RGB")) for i in range(8)]


def _fid_by_hand(net, generated, reference) -> float:
    """pytorch-fid's formula: np.cov and scipy's sqrtm."""

    def stats(arrays):
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            f = net(x).double().numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    (m1, s1), (m2, s2) = stats(generated), stats(reference)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _clip_by_hand(clip, generated) -> tuple[float, float]:
    import open_clip

    x = torch.from_numpy(np.stack(generated)).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    prompts = [p for p in PROMPTS for _ in range(2)]
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.encode_image((x - mean) / std), dim=-1)
        txt = torch.nn.functional.normalize(
            clip.encode_text(open_clip.get_tokenizer("tiny-clip-eval")(prompts)), dim=-1
        )
    cos = (img * txt).sum(-1).double().numpy()
    return float(np.mean(100 * np.maximum(cos, 0))), float(np.mean(cos))


def test_metrics_json_and_mlflow_run(setup, capsys):
    import mlflow

    root = setup["root"]
    uri = f"sqlite:///{root}/mlflow.db"
    stats = root / "stats" / "reference.npz"
    assert main(_args(setup, "--mlflow-uri", uri, "--save-reference-stats", str(stats))) == 0
    out = json.loads((root / "generated" / "eval.json").read_text())
    assert out["n_generated"] == 8 and out["image_size"] == 64
    assert out["n_reference"] == 7 and out["reference_image_size"] == 64 and out["reference_kind"] == "images"
    assert out["n_reference_rejected"] == 1 and out["n_reference_ignored"] == 1  # broken.jpg; captions.txt
    (reject,) = out["reference_rejects"]
    assert reject["path"] == str(root / "reference" / "broken.jpg") and reject["reason"] == "decode_error"
    assert out["feature_dim"] == 4

    generated = _generated_images(root)
    reference = _reference_arrays(root)
    assert len(reference) == 7 and all(r.shape == (64, 64, 3) for r in reference)
    assert np.isfinite(out["fid"]) and out["fid"] > 0
    assert out["fid"] == pytest.approx(_fid_by_hand(setup["net"], generated, reference), rel=1e-6)
    clip_score, clip_cosine = _clip_by_hand(setup["clip"], generated)
    assert out["clip_score"] == pytest.approx(clip_score, abs=1e-4)
    assert out["clip_cosine"] == pytest.approx(clip_cosine, abs=1e-6)
    assert "fid " in capsys.readouterr().out

    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["t2i-eval"], output_format="list")
    m = run.data.metrics
    assert m["fid"] == pytest.approx(out["fid"]) and m["clip_score"] == pytest.approx(out["clip_score"])
    assert m["clip_cosine"] == pytest.approx(out["clip_cosine"])
    assert (m["n_generated"], m["n_reference"], m["n_reference_rejected"]) == (8, 7, 1)
    assert run.data.params["eval.inception"] == str(root / "features.pt2")
    artifact = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="eval/eval.json")
    assert json.loads(open(artifact).read())["fid"] == out["fid"]

    # the saved reference statistics give the same FID, logged into an existing run (e.g. the training run)
    client = mlflow.MlflowClient(uri)
    training = client.create_run(client.create_experiment("t2i")).info.run_id
    client.log_param(training, "batch_size", "256")  # a training param with a name the evaluation also has
    other = root / "eval_stats.json"
    args = _args(setup, "--reference", str(stats), "--output", str(other), "--mlflow-uri", uri, "--run-id", training)
    assert main([*args, "--step", "1000"]) == 0
    again = json.loads(other.read_text())
    assert again["reference_kind"] == "statistics" and again["n_reference"] == 7
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-12)
    assert again["clip_score"] == out["clip_score"]
    assert main([*args, "--step", "2000"]) == 0  # a second evaluation of the same run: a metric history
    history = client.get_metric_history(training, "fid")
    assert sorted(h.step for h in history) == [1000, 2000]
    assert all(h.value == pytest.approx(out["fid"]) for h in history)
    logged = client.get_run(training).data
    assert logged.tags["eval.reference"] == str(stats) and logged.params == {"batch_size": "256"}
    names = {a.path for a in client.list_artifacts(training, "eval")}
    assert names == {"eval/step_1000", "eval/step_2000"}
    assert len(mlflow.search_runs(experiment_names=["t2i-eval"], output_format="list")) == 1

    # an unknown run id fails before evaluating
    assert main(_args(setup, "--mlflow-uri", uri, "--run-id", "0" * 32, "--output", str(root / "x.json"))) == 2
    assert "MLflow run '0000" in capsys.readouterr().err
    assert not (root / "x.json").exists()


def test_clip_only(setup, tmp_path):
    root = setup["root"]
    args = _args(setup, "--output", str(tmp_path / "clip.json"))
    i = args.index("--reference")
    del args[i : i + 4]  # no --reference, no --inception
    assert main(args) == 0
    out = json.loads((tmp_path / "clip.json").read_text())
    assert out["fid"] is None and out["n_reference"] is None
    assert out["clip_score"] == pytest.approx(_clip_by_hand(setup["clip"], _generated_images(root))[0], abs=1e-4)


def _reference_arrays(root) -> list[np.ndarray]:
    files = sorted((root / "reference").rglob("*.png"))
    return [np.asarray(Preprocess(size=64, mode="center_crop").load(str(f))[0]) for f in files]


def test_reference_on_s3(setup, s3_endpoint, tmp_path):
    """An s3:// reference directory (with --s3-endpoint), statistics saved to S3 and read back."""
    import s3fs

    root = setup["root"]
    s3 = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    for f in (root / "reference").rglob("*"):
        if f.is_file():
            s3.pipe(f"tokenflow-test/eval/ref/{f.relative_to(root / 'reference')}", f.read_bytes())
    args = [
        "--generated",
        str(root / "generated"),
        "--inception",
        str(root / "features.pt2"),
        "--device",
        "cpu",
        "--s3-endpoint",
        s3_endpoint,
    ]
    stats = "s3://tokenflow-test/eval/stats/reference.npz"
    first = [*args, "--reference", "s3://tokenflow-test/eval/ref/", "--save-reference-stats", stats]
    assert main([*first, "--output", str(tmp_path / "a.json")]) == 0
    out = json.loads((tmp_path / "a.json").read_text())
    assert (out["n_reference"], out["n_reference_rejected"], out["n_reference_ignored"]) == (7, 1, 1)
    assert out["reference_rejects"][0]["path"] == "s3://tokenflow-test/eval/ref/broken.jpg"
    expected = _fid_by_hand(setup["net"], _generated_images(root), _reference_arrays(root))
    assert out["fid"] == pytest.approx(expected, rel=1e-6)
    assert main([*args, "--reference", stats, "--output", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["fid"] == pytest.approx(out["fid"], rel=1e-12)


def test_errors(setup, tmp_path, capsys):
    root = setup["root"]

    def error(*extra) -> str:
        assert main(_args(setup, *extra)) == 2
        return capsys.readouterr().err

    # a directory of images without samples.parquet
    (tmp_path / "bare" / "images").mkdir(parents=True)
    (tmp_path / "bare" / "images" / "00000.png").write_bytes(_png("astronaut", 64, 0))
    assert "has no samples.parquet" in error("--generated", str(tmp_path / "bare"))

    # GenEval's layout points at GenEval's evaluator
    _write_generated(tmp_path / "geneval", geneval=True)
    err = error("--generated", str(tmp_path / "geneval"))
    assert "GenEval's layout" in err and "evaluation/evaluate_images.py" in err

    # an image samples.parquet lists is missing
    import shutil

    shutil.copytree(root / "generated", tmp_path / "holes")
    (tmp_path / "holes" / "images" / "00003.png").unlink()
    assert "1 of the 8 images samples.parquet lists are missing" in error("--generated", str(tmp_path / "holes"))

    # empty reference sets: no image file, or none that decodes
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert "the reference set is empty: no image files" in error("--reference", str(tmp_path / "empty"))
    assert "none of the 1 files" in error("--reference", str(root / "reference" / "broken.*"))
    assert "reference set not found" in error("--reference", str(tmp_path / "nowhere"))

    # one image makes no covariance
    assert "at least 2 reference images" in error("--reference", str(root / "reference" / "clock.png*"))
    assert "at least 2 generated images for a covariance, got 1" in error("--limit", "1")

    # the feature extractor: a missing file is named
    assert str(tmp_path / "missing.pth") in error("--inception", str(tmp_path / "missing.pth"))
    # FID needs both inputs; CLIP needs its weights
    assert "needs both the reference set" in error("--inception", str(root / "features.pt2"), "--reference", "")
    assert "--clip-model needs --clip-pretrained" in error("--clip-pretrained", "")
