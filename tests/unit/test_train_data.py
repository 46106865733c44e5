"""The tokenizer-training data path without Ray: per-sample decisions, the epoch plan, data positions and the
worker-side batching (rejects counted and skipped, keys consumed only when handed out)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.train_data import (
    TRAIN_SCHEMA,
    DataPosition,
    EpochPlan,
    MicroBatches,
    RandomCrop,
    TrainDataConfig,
    epoch_order,
    held_out,
    pixels_to_tensor,
    sample_rng,
)
from tokenflow.image import to_tensor


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_held_out_is_stable_and_close_to_the_fraction():
    keys = [f"sample{i:06d}" for i in range(20_000)]
    chosen = [k for k in keys if held_out(k, 0.05)]
    assert 0.045 < len(chosen) / len(keys) < 0.055
    assert chosen == [k for k in keys if held_out(k, 0.05)]
    assert not any(held_out(k, 0.0) for k in keys[:100])
    assert set(k for k in keys if held_out(k, 0.01)) <= set(chosen)  # a smaller split is a subset


def test_sample_rng_depends_on_identity_only():
    a = sample_rng(0, 3, "part/000.tar", "k1").random()
    assert a == sample_rng(0, 3, "part/000.tar", "k1").random()
    others = {sample_rng(*args).random() for args in [(1, 3, "part/000.tar", "k1"), (0, 4, "part/000.tar", "k1")]}
    others |= {sample_rng(0, 3, "part/001.tar", "k1").random(), sample_rng(0, 3, "part/000.tar", "k2").random()}
    assert a not in others and len(others) == 4


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    orders = [epoch_order(50, seed=7, epoch=e) for e in range(3)]
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert orders[1] == epoch_order(50, seed=7, epoch=1)
    assert epoch_order(50, seed=8, epoch=1) != orders[1]


def test_random_crop_is_size_by_size_and_replays_with_the_same_rng():
    data = _jpeg(300, 200)
    crop = RandomCrop(64, sample_rng(0, 0, "s", "k"))
    img, original = crop.load(data, max_pixels=10**8)
    assert img.size == (64, 64) and original == (300, 200)
    again, _ = RandomCrop(64, sample_rng(0, 0, "s", "k")).load(data, max_pixels=10**8)
    assert np.array_equal(np.asarray(img), np.asarray(again))
    views = {
        np.asarray(RandomCrop(64, sample_rng(0, e, "s", "k")).load(data, max_pixels=10**8)[0]).tobytes()
        for e in range(6)
    }
    assert len(views) > 1  # different epochs see different crops


def test_pixels_to_tensor_matches_to_tensor():
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)) for i in range(3)]
    blobs = [np.asarray(im).tobytes() for im in imgs]
    assert pixels_to_tensor(blobs, 8).equal(to_tensor(imgs))


def test_data_position_merges_and_closes_finished_shards():
    a, b = DataPosition(2), DataPosition(2)
    for k in ("x0", "x1"):
        a.consume("s0", k)
    b.consume("s0", "x2")
    b.end_of_shard("s0", 3)
    b.consume("s1", "y0")
    merged = a.merged([b])
    assert merged.done == {"s0"} and merged.consumed == {"s1": {"y0"}} and merged.epoch == 2
    assert DataPosition.from_dict(merged.to_dict()) == merged
    with pytest.raises(ValueError, match="epochs 2 and 3"):
        a.merged([DataPosition(3)])


def test_epoch_plan_skips_finished_shards_and_consumed_keys_of_its_epoch_only():
    ids = ["a", "b", "c", "d"]
    plan = EpochPlan(ids, seed=1)
    position = {"epoch": 5, "done": ["b"], "consumed": {"c": ["k1", "k0"]}}
    plan.start(5, position)
    order = [i for i in epoch_order(4, seed=1, epoch=5) if ids[i] != "b"]
    tasks = [plan.task(i) for i in range(4)]
    assert [t[1] for t in tasks] == order + [None]
    assert all(t[0] == 5 for t in tasks)
    assert dict((ids[t[1]], t[2]) for t in tasks[:3])["c"] == ["k0", "k1"]
    plan.start(6, position)  # a position of another epoch changes nothing
    assert [plan.task(i)[1] for i in range(4)] == epoch_order(4, seed=1, epoch=6)
    assert all(plan.task(i)[2] == [] for i in range(4))


class _FakeShard:
    def __init__(self, tables):
        self.tables = tables

    def iter_batches(self, **_):
        return iter(self.tables)


def _table(rows):
    full = [{"epoch": 0, "end_of_shard": -1, "reason": None, "detail": None, "pixels": None, **r} for r in rows]
    return pa.Table.from_pylist(full, schema=TRAIN_SCHEMA)


def test_micro_batches_skip_and_count_rejects_and_consume_keys_when_taken():
    px = [np.full((4, 4, 3), i, dtype=np.uint8).tobytes() for i in range(5)]
    tables = [
        _table(
            [
                {"key": "k0", "shard_id": "s", "pixels": px[0]},
                {"key": "bad", "shard_id": "s", "reason": "decode_error"},
                {"key": "k1", "shard_id": "s", "pixels": px[1]},
                {"key": "ev", "shard_id": "s", "reason": "held_out"},
            ]
        ),
        _table([{"key": "k2", "shard_id": "s", "pixels": px[2]}, {"key": "s#end", "shard_id": "s", "end_of_shard": 5}]),
    ]
    mb = MicroBatches(_FakeShard(tables), batch_size=2, image_size=4)
    mb.start_epoch(0)
    assert mb.fill(2)
    x, keys = mb.take()
    assert keys == ["k0", "k1"] and x.shape == (2, 3, 4, 4)
    assert float(x[1, 0, 0, 0]) == pytest.approx(1 / 255 * 2 - 1, abs=1e-7)
    assert mb.rejects == {"decode_error": 1}  # held-out samples are not rejects
    assert mb.position.consumed == {"s": {"k0", "k1", "bad", "ev"}}
    assert not mb.fill(2)  # one image left: the epoch ends here, k2 stays unconsumed
    assert mb.position.totals == {"s": 5} and "k2" not in mb.position.consumed["s"]


def test_micro_batches_refuse_rows_of_another_epoch():
    mb = MicroBatches(_FakeShard([_table([{"key": "k", "shard_id": "s", "epoch": 1}])]), batch_size=1, image_size=4)
    mb.start_epoch(0)
    with pytest.raises(RuntimeError, match="epoch plan"):
        mb.fill(1)


def test_config_checks():
    with pytest.raises(ValueError, match="crop_frac"):
        TrainDataConfig(min_crop_frac=0.9, max_crop_frac=0.8)
    with pytest.raises(ValueError, match="eval_fraction"):
        TrainDataConfig(eval_fraction=1.0)
    assert TrainDataConfig(input="a.tar").input == ["a.tar"]
    assert TrainDataConfig().filters.require_caption is False


def test_draft_decoding_gives_a_crop_of_the_same_size_close_to_the_full_decode():
    rng_img = np.random.default_rng(1)
    base = np.kron(rng_img.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((40, 40, 1), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, format="JPEG", quality=95)  # 1600 x 1200: libjpeg can decode at 1/8
    full, _ = RandomCrop(64, sample_rng(0, 0, "s", "k")).load(buf.getvalue(), max_pixels=10**8)
    fast, _ = RandomCrop(64, sample_rng(0, 0, "s", "k"), draft=True).load(buf.getvalue(), max_pixels=10**8)
    assert fast.size == full.size == (64, 64)
    diff = np.abs(np.asarray(fast, dtype=np.int16) - np.asarray(full, dtype=np.int16))
    assert diff.mean() < 8  # the same view of the image, resampled from a smaller decode
