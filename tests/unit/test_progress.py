"""The pretokenize job's periodic one-line summary."""

import logging

import pyarrow as pa

from pipelines.pretokenize import _Progress


def _batch(reasons: list[str | None]) -> pa.Table:
    # sample rows, then one end-of-shard row that must not count as a sample
    return pa.table({"end_of_shard": [-1] * len(reasons) + [len(reasons)], "reason": [*reasons, None]})


def test_progress_line_counts_samples_kept_share_and_top_reasons(caplog):
    caplog.set_level(logging.INFO, logger="pretokenize")
    progress = _Progress(every_s=0.0)  # a line on every update
    progress.update(_batch([None, "too_small", None, "decode_error"]))
    progress.update(_batch(["too_small", None, "too_small", "aspect_ratio", "clip_score", None]))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "4 samples" in lines[0] and "kept 50.0% (before dedup)" in lines[0]
    assert lines[1].startswith("10 samples, ") and "kept 40.0%" in lines[1]
    assert lines[1].endswith("top rejects: too_small 3, decode_error 1, aspect_ratio 1")


def test_progress_line_waits_for_its_period(caplog):
    caplog.set_level(logging.INFO, logger="pretokenize")
    progress = _Progress(every_s=3600.0)
    progress.update(_batch([None, "too_small"]))
    assert not caplog.records
    progress.log_line(final=True)
    assert caplog.records[-1].getMessage().startswith("done: 2 samples")
