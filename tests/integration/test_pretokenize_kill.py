"""kill -9 of the pretokenize driver in the middle of a commit, then the same command again: every input sample ends in
exactly one row, tokens equal a clean run's, and readers never saw a partial or uncommitted file."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data

from pipelines.tokenize import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins"]


def _jpeg(name: str, size=(96, 72)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").resize(size).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _corpus(root: Path) -> None:
    """Six shards of three samples: one photo each, a corrupt image, and a copy of shard 0's photo in shard 5."""
    root.mkdir()
    for s, name in enumerate(PHOTOS):
        members = [(f"{s}a.jpg", _jpeg(name)), (f"{s}b.jpg", _jpeg(name, (120, 90))), (f"{s}c.jpg", b"not a jpeg")]
        if s == 5:
            members[1] = ("5b.jpg", _jpeg(PHOTOS[0]))
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for member, payload in members:
                for fname, blob in ((member, payload), (member.replace(".jpg", ".txt"), f"caption {member}".encode())):
                    info = tarfile.TarInfo(fname)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))


def _run(corpus: Path, out: Path, ray_tmp: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    # a private Ray per run, whose files (ray_current_cluster included) a SIGKILL leaves in ray_tmp, not in
    # /tmp/ray where they would send the next `ray.init()` on this machine to a dead cluster
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    env.pop("TOKENFLOW_FAILPOINT", None)
    if failpoint:
        env["TOKENFLOW_FAILPOINT"] = failpoint
    cmd = [sys.executable, "jobs/pretokenize.py", "--input", str(corpus), "--output", str(out)]
    cmd += ["--tokenizer", "preset:tiny", "--tokenizer-actors", "1", "--batch-size", "4"]
    cmd += ["--set", "target_file_mb=0.000001"]  # one part per input shard: many commits to kill
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        stdout, _ = proc.communicate(timeout=240)
    finally:
        try:  # Ray's agents outlive a SIGKILLed driver: end the whole process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout)


def _visible(out: Path) -> tuple[dict, dict]:
    """What a reader globbing shards/ and rejects/ sees; every file must be complete and committed."""
    committed = {json.loads(p.read_text())["name"] for p in (out / "_progress").glob("*.json")}
    kept, rejects = {}, {}
    for sub, rows in (("shards", kept), ("rejects", rejects)):
        for path in (out / sub).glob("*.parquet"):
            assert path.stem in committed, f"{path} is visible but not committed"
            for row in pq.read_table(path).to_pylist():
                assert row["key"] not in rows, f"{row['key']} twice"
                rows[row["key"]] = row
    return kept, rejects


@pytest.fixture()
def ray_tmp():
    path = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_kill_9_at_commit_steps_then_resume(tmp_path, ray_tmp):
    corpus = tmp_path / "corpus"
    _corpus(corpus)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"counts": "from an earlier run"}')  # must not outlive a new run's start
    # after the first part's commit record, between its moves (every other step is covered in-process by
    # tests/unit/test_writer.py; this is the real SIGKILL of a Ray driver, and a rerun)
    killed = _run(corpus, out, ray_tmp, failpoint="part_half_moved:1")
    assert killed.returncode == -signal.SIGKILL, f"rc {killed.returncode}\n{killed.stdout}"
    assert not (out / "manifest.json").exists()
    assert list((out / "_progress").glob("*.json")), "the kill came before any commit record"
    assert any(p.is_file() for p in (out / "_staging").rglob("*")), "no move left for the rerun to finish"
    _visible(out)
    final = _run(corpus, out, ray_tmp)
    assert final.returncode == 0, final.stdout
    kept, rejects = _visible(out)

    # every sample exactly once, with the decisions a clean run makes; either copy of the duplicate may be first
    keys = {f"{s:05d}.tar/{s}{m}" for s in range(6) for m in "abc"}
    assert kept.keys() | rejects.keys() == keys and not kept.keys() & rejects.keys()
    dup_pair = {"00000.tar/0a", "00005.tar/5b"}
    (dup,) = dup_pair - kept.keys()
    assert {k: r["reason"] for k, r in rejects.items()} == {
        **{f"{s:05d}.tar/{s}c": "decode_error" for s in range(6)},
        dup: "duplicate",
    }
    tok = load_tokenizer("preset:tiny")
    for key, row in kept.items():
        s, m = int(key[:5]), key[-1]
        name = PHOTOS[0] if key in dup_pair else PHOTOS[s]
        img = Image.open(io.BytesIO(_jpeg(name, (96, 72) if m == "a" or key in dup_pair else (120, 90))))
        assert row["tokens"] == tok.encode(tok.preprocess([img]))[0].tolist(), key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 18 and manifest["shards_done"] == 6
    assert not (out / "_staging").exists()
