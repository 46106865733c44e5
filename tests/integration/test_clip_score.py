"""The optional CLIP-score stage, alone and inside the pretokenize job (a tiny random CLIP saved to disk)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data

from pipelines.clip_score import ClipScoreConfig, ClipScoreStage
from pipelines.pretokenize import PretokenizeConfig, run
from tests.integration.tiny_clip import save_tiny_clip


@pytest.fixture(scope="module")
def clip_cfg(tmp_path_factory):
    """A tiny CLIP architecture (registered from JSON) with seeded random weights in a local checkpoint."""
    root = tmp_path_factory.mktemp("clip")
    save_tiny_clip(root, "tiny-clip")
    return ClipScoreConfig(
        enabled=True,
        model="tiny-clip",
        pretrained=str(root / "tiny-clip.pt"),
        model_config=str(root / "tiny-clip.json"),
        threshold=None,
        batch_size=4,
    )


def _pixels(name: str, size: int = 64) -> bytes:
    img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size))
    return np.asarray(img, dtype=np.uint8).tobytes()


def _batch(rows):
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("reason", pa.string()),
            ("detail", pa.string()),
            ("clip_score", pa.float32()),
            ("pixels", pa.binary()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def test_scores_are_cosines_and_threshold_rejects(clip_cfg):
    stage = ClipScoreStage(clip_cfg, image_size=64, device="cpu")
    pix = [_pixels("astronaut"), _pixels("coffee")]
    caps = ["an astronaut", "a cup of coffee"]
    s = stage.scores(pix, caps)
    assert s.shape == (2,) and np.all(np.abs(s) <= 1.0 + 1e-6)
    # by hand: the same normalised embeddings, dot product
    x = torch.from_numpy(np.stack([np.frombuffer(p, np.uint8) for p in pix]).reshape(2, 64, 64, 3))
    x = torch.nn.functional.interpolate(
        x.permute(0, 3, 1, 2).float() / 255, size=(32, 32), mode="bicubic", antialias=True
    ).clamp(0, 1)
    with torch.no_grad():
        img = torch.nn.functional.normalize(stage.model.encode_image((x - stage.mean) / stage.std), dim=-1)
        txt = torch.nn.functional.normalize(stage.model.encode_text(stage.tokenizer(caps)), dim=-1)
    assert np.allclose(s, (img * txt).sum(-1).numpy(), atol=1e-5)

    threshold = float(s.max()) + 1e-3  # everything falls below
    stage.cfg = ClipScoreConfig(**{**clip_cfg.__dict__, "threshold": threshold})
    out = stage(
        _batch(
            [
                {"key": "a", "caption": caps[0], "pixels": pix[0]},
                {"key": "b", "caption": caps[1], "pixels": pix[1]},
                {"key": "c", "caption": None, "reason": "decode_error", "detail": "x", "pixels": None},
            ]
        )
    ).to_pylist()
    assert [r["reason"] for r in out] == ["clip_score", "clip_score", "decode_error"]
    assert out[0]["pixels"] is None and out[0]["clip_score"] == pytest.approx(float(s[0]), abs=1e-6)
    assert out[2]["clip_score"] is None
    assert out[0]["detail"].endswith(f"< {threshold}")


def test_pipeline_records_scores_and_rejects_below_threshold(ray_local, clip_cfg, tmp_path):
    """One pretokenize run with a threshold between the sample images' scores: the two below it are recorded
    rejections, the two above are kept with the score the stage computes on the tokenizer-preprocessed square."""
    from pipelines.tokenize import load_tokenizer

    tok = load_tokenizer("preset:tiny")
    stage = ClipScoreStage(clip_cfg, image_size=64, device="cpu")
    captions = {p.stem: p.read_text().strip() for p in Path("samples/images").glob("*.txt")}
    expected = {}
    for name, caption in captions.items():
        (image,) = [p for p in Path("samples/images").glob(f"{name}.*") if p.suffix != ".txt"]
        square, _ = tok.preprocessor.load(str(image))
        expected[image.name] = float(stage.scores([np.asarray(square, np.uint8).tobytes()], [caption])[0])
    assert len(expected) == 4
    ordered = sorted(expected.values())
    cut = (ordered[1] + ordered[2]) / 2  # two below, two above, with a margin for batch-size rounding
    out = tmp_path / "out"
    cfg = PretokenizeConfig(
        input=["samples/images"],
        output=str(out),
        tokenizer="preset:tiny",
        tokenizer_actors=1,
        clip=ClipScoreConfig(**{**clip_cfg.__dict__, "threshold": cut}),
    )
    manifest = run(cfg)
    assert manifest["counts"]["kept"] == 2 and manifest["counts"]["reasons"] == {"clip_score": 2}
    (shards_file,) = (out / "shards").glob("*.parquet")
    kept = pq.read_table(shards_file).to_pylist()
    assert {r["key"] for r in kept} == {k for k, v in expected.items() if v > cut}
    for r in kept:
        assert r["clip_score"] == pytest.approx(expected[r["key"]], abs=1e-5)
    rejects = pq.read_table(next((out / "rejects").glob("*.parquet"))).to_pylist()
    assert {r["key"] for r in rejects} == {k for k, v in expected.items() if v < cut}
    assert all(r["reason"] == "clip_score" and r["detail"].endswith(f"< {cut}") for r in rejects)
