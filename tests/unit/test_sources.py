"""pipelines.sources: input expansion, the three readers, fault rows and key accounting (all local, in tmp_path)."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import sources
from pipelines.sources import (
    IMAGE_COLUMNS,
    REASONS_FROM_SOURCES,
    Shard,
    expand_braces,
    expand_inputs,
    read_shard,
)

ROW_KEYS = {"key", "source", "image", "caption", "meta", "reason", "detail"}


# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Five small, distinct JPEGs made from scikit-image's sample photos."""
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "camera", "rocket"):
        img = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").resize((24, 24))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_tar(path, members, mode="w"):
    """Write (name, bytes) members in order; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def wds_members(photos, n, prefix=""):
    """img2dataset-style members of n samples: {key}.jpg, {key}.txt, {key}.json."""
    members = []
    for i in range(n):
        key = f"{prefix}{i:09d}"
        members += [
            (f"{key}.jpg", photos[i % len(photos)]),
            (f"{key}.txt", f"caption {i}".encode()),
            (f"{key}.json", json.dumps({"key": key, "width": 24}).encode()),
        ]
    return members


def write_parquet(path, columns: dict, row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rows_of(shard, **kwargs):
    rows = list(read_shard(shard, **kwargs))
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["reason"] is None or row["reason"] in REASONS_FROM_SOURCES
        assert isinstance(json.loads(row["meta"]), dict)
    return rows


def ids(shards):
    return [s.shard_id for s in shards]


# ---- input expansion --------------------------------------------------------------------------------------------


@pytest.fixture
def wds_tree(tmp_path):
    """root/part1/0000{0,1}.tar, root/part2/00000.tar and img2dataset noise files."""
    root = tmp_path / "root"
    for rel in ("part1/00000.tar", "part1/00001.tar", "part2/00000.tar"):
        touch(root / rel)
    touch(root / "part1/00000_stats.json")
    touch(root / "part1/.hidden.tar")
    return root


def test_expand_directory_recursively_sorted(wds_tree):
    shards = expand_inputs([str(wds_tree)])
    assert ids(shards) == ["part1/00000.tar", "part1/00001.tar", "part2/00000.tar"]
    assert [s.path for s in shards] == [str(wds_tree / i) for i in ids(shards)]
    assert {s.format for s in shards} == {"webdataset"}
    # A trailing slash and a lone string mean the same.
    assert expand_inputs(str(wds_tree) + "/") == shards


def test_expand_globs(wds_tree):
    # The root of a glob is its non-glob prefix directory.
    assert ids(expand_inputs([f"{wds_tree}/part1/*.tar"])) == ["00000.tar", "00001.tar"]
    assert ids(expand_inputs([f"{wds_tree}/**/*.tar"])) == ["part1/00000.tar", "part1/00001.tar", "part2/00000.tar"]
    assert ids(expand_inputs([f"{wds_tree}/part?/0000[1].tar"])) == ["part1/00001.tar"]
    # A glob matching directories scans them.
    assert ids(expand_inputs([f"{wds_tree}/part*"])) == ["part1/00000.tar", "part1/00001.tar", "part2/00000.tar"]


def test_expand_brace_ranges_and_lists(tmp_path):
    for i in range(5):
        touch(tmp_path / f"d/{i:05d}.tar")
    assert ids(expand_inputs([f"{tmp_path}/d/{{00000..00002}}.tar"])) == ["00000.tar", "00001.tar", "00002.tar"]
    assert ids(expand_inputs([f"{tmp_path}/d/{{00001,00004}}.tar"])) == ["00001.tar", "00004.tar"]
    # Braces around directories: the root is the prefix before the brace, shared by all alternatives.
    touch(tmp_path / "e/a/x.tar")
    touch(tmp_path / "e/b/x.tar")
    assert ids(expand_inputs([f"{tmp_path}/e/{{a,b}}/*.tar"])) == ["a/x.tar", "b/x.tar"]
    # Ranges that only partly exist expand to what exists.
    assert ids(expand_inputs([f"{tmp_path}/d/{{00003..00009}}.tar"])) == ["00003.tar", "00004.tar"]
    # Wide ranges are looked up in one directory listing, not one existence check per expanded path.
    assert len(expand_inputs([f"{tmp_path}/d/{{00000..99999}}.tar"])) == 5
    # Brace alternatives naming directories scan them.
    assert ids(expand_inputs([f"{tmp_path}/e/{{a,b}}"])) == ["a/x.tar", "b/x.tar"]


def test_expand_braces_helper():
    assert expand_braces("x/{00000..00002}.tar") == ["x/00000.tar", "x/00001.tar", "x/00002.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{a,{b,c}}") == ["a", "b", "c"]
    assert expand_braces("plain{x}") == ["plain{x}"]


def test_expand_dedups_and_sorts(wds_tree):
    shards = expand_inputs([f"{wds_tree}/part2", str(wds_tree), f"{wds_tree}/part1/00000.tar"])
    assert [s.path for s in shards] == sorted({s.path for s in shards})
    assert len(shards) == 3
    # The first input that reaches a path names it.
    assert ids(shards) == ["part1/00000.tar", "part1/00001.tar", "00000.tar"]


def test_single_file_root_is_its_parent(wds_tree):
    (shard,) = expand_inputs([str(wds_tree / "part1/00001.tar")])
    assert shard == Shard(str(wds_tree / "part1/00001.tar"), "00001.tar", "webdataset")


def test_format_detection_and_override(tmp_path):
    touch(tmp_path / "pq/a/0.parquet")
    touch(tmp_path / "pq/b.parquet")
    shards = expand_inputs([str(tmp_path / "pq")])
    assert [(s.shard_id, s.format) for s in shards] == [("a/0.parquet", "parquet"), ("b.parquet", "parquet")]

    # Folders: one shard per directory that directly contains images, "." for the root itself.
    for rel in ("img/a.jpg", "img/a.txt", "img/cats/b.PNG", "img/cats/deep/c.webp", "img/empty/x.txt"):
        touch(tmp_path / rel)
    shards = expand_inputs([str(tmp_path / "img")])
    assert [(s.shard_id, s.format) for s in shards] == [(".", "folder"), ("cats", "folder"), ("cats/deep", "folder")]
    assert shards[0].path == str(tmp_path / "img")

    # format= overrides: tars beside images are ignored when reading folders, and vice versa.
    touch(tmp_path / "img/00000.tar")
    assert ids(expand_inputs([str(tmp_path / "img")])) == ["00000.tar"]
    assert ids(expand_inputs([str(tmp_path / "img")], format="folder")) == [".", "cats", "cats/deep"]
    # A named file is read as the given format whatever its extension.
    touch(tmp_path / "shard.bin")
    assert expand_inputs([str(tmp_path / "shard.bin")], format="webdataset")[0].format == "webdataset"
    with pytest.raises(ValueError, match="cannot detect the format"):
        expand_inputs([str(tmp_path / "shard.bin")])
    with pytest.raises(ValueError, match="unknown format"):
        expand_inputs([str(tmp_path / "img")], format="csv")


def test_img2dataset_parquet_sidecars_are_not_a_second_format(tmp_path):
    for stem in ("00000", "00001"):
        touch(tmp_path / f"out/{stem}.tar")
        touch(tmp_path / f"out/{stem}.parquet")
        touch(tmp_path / f"out/{stem}_stats.json")
    shards = expand_inputs([str(tmp_path / "out")])
    assert [(s.shard_id, s.format) for s in shards] == [("00000.tar", "webdataset"), ("00001.tar", "webdataset")]
    assert ids(expand_inputs([f"{tmp_path}/out/*"], format="parquet")) == ["00000.parquet", "00001.parquet"]


def test_mixed_formats_are_an_error(tmp_path):
    touch(tmp_path / "m/a.tar")
    touch(tmp_path / "m/b.parquet")
    with pytest.raises(ValueError, match="mix formats"):
        expand_inputs([str(tmp_path / "m")])
    touch(tmp_path / "f/x.jpg")
    with pytest.raises(ValueError, match=r"\['folder', 'webdataset'\]"):
        expand_inputs([str(tmp_path / "m/a.tar"), str(tmp_path / "f")])


@pytest.mark.parametrize("pattern", ["missing", "missing/*.tar", "d/{00007..00009}.tar", "d/*.parquet", "empty"])
def test_inputs_matching_nothing_raise(tmp_path, pattern):
    touch(tmp_path / "d/00000.tar")
    (tmp_path / "empty").mkdir()
    spec = f"{tmp_path}/{pattern}"
    with pytest.raises(FileNotFoundError) as err:
        expand_inputs([str(tmp_path / "d"), spec])
    assert spec in str(err.value)


# ---- webdataset -------------------------------------------------------------------------------------------------


def test_webdataset_rows_exact(tmp_path, photos):
    tar = write_tar(
        tmp_path / "wds/part/00000.tar",
        [
            ("000000000.jpg", photos[0]),
            ("000000000.txt", b"an astronaut"),
            ("000000000.json", b'{"width": 24, "url": "http://x/0.jpg", "b": null}'),
            ("000000000.cls", b"3"),  # other extensions are allowed and ignored
            ("000000001.png", photos[1]),  # any image extension; no caption, no json
            ("sub/dir/000000002.webp", photos[2]),  # directories inside the tar stay in the key
            ("sub/dir/000000002.txt", "caf\xe9".encode("latin-1")),  # caption bytes are not decoded
        ],
    )
    (shard,) = expand_inputs([str(tmp_path / "wds")])
    assert rows_of(shard) == [
        {
            "key": "part/00000.tar/000000000",
            "source": str(tar),
            "image": photos[0],
            "caption": b"an astronaut",
            "meta": json.dumps({"b": None, "url": "http://x/0.jpg", "width": 24}, sort_keys=True),
            "reason": None,
            "detail": None,
        },
        {
            "key": "part/00000.tar/000000001",
            "source": str(tar),
            "image": photos[1],
            "caption": None,
            "meta": "{}",
            "reason": None,
            "detail": None,
        },
        {
            "key": "part/00000.tar/sub/dir/000000002",
            "source": str(tar),
            "image": photos[2],
            "caption": b"caf\xe9",
            "meta": "{}",
            "reason": None,
            "detail": None,
        },
    ]


def test_webdataset_group_without_image(tmp_path, photos):
    tar = write_tar(tmp_path / "a.tar", [("k1.txt", b"no image"), ("k1.json", b"{}"), ("k2.jpg", photos[0])])
    rows = rows_of(Shard(str(tar), "a.tar", "webdataset"))
    assert [(r["key"], r["reason"]) for r in rows] == [("a.tar/k1", "image_missing"), ("a.tar/k2", None)]
    assert rows[0]["caption"] == b"no image" and rows[0]["image"] is None
    assert "k1.txt" in rows[0]["detail"] and "k1.json" in rows[0]["detail"]


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b"\xff\xfe\x00garbage"])
def test_webdataset_bad_json_is_kept_with_empty_meta(tmp_path, photos, payload):
    tar = write_tar(tmp_path / "a.tar", [("k.jpg", photos[0]), ("k.txt", b"c"), ("k.json", payload)])
    (row,) = rows_of(Shard(str(tar), "a.tar", "webdataset"))
    assert row["reason"] is None and row["image"] == photos[0] and row["caption"] == b"c"
    assert row["meta"] == "{}"
    assert row["detail"].startswith("bad json metadata: ")


def test_webdataset_json_nan_becomes_null(tmp_path, photos):
    tar = write_tar(tmp_path / "a.tar", [("k.jpg", photos[0]), ("k.json", b'{"p": NaN, "q": 1.5}')])
    (row,) = rows_of(Shard(str(tar), "a.tar", "webdataset"))
    assert row["meta"] == '{"p": null, "q": 1.5}'


def test_webdataset_repeated_key_is_made_unique(tmp_path, photos):
    members = [("a.jpg", photos[0]), ("a.txt", b"1"), ("b.jpg", photos[1]), ("a.jpg", photos[2]), ("a.txt", b"2")]
    members += [("c.jpg", photos[3]), ("a.jpg", photos[4])]
    tar = write_tar(tmp_path / "t.tar", members)
    rows = rows_of(Shard(str(tar), "t.tar", "webdataset"))
    assert [r["key"] for r in rows] == ["t.tar/a", "t.tar/b", "t.tar/a~2", "t.tar/c", "t.tar/a~3"]
    assert [r["image"] for r in rows] == [photos[0], photos[1], photos[2], photos[3], photos[4]]
    assert [r["caption"] for r in rows] == [b"1", None, b"2", None, None]


def _member_offsets(path):
    """name -> (header offset, data offset, size) of each member."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


@pytest.mark.parametrize(
    "cut, expected_keys",
    [
        # Mid-way through the image of sample 3: samples 0-2, nothing of sample 3.
        (lambda o: o["000000003.jpg"][1] + o["000000003.jpg"][2] // 2, [0, 1, 2]),
        # Inside the header of sample 3's image.
        (lambda o: o["000000003.jpg"][0] + 100, [0, 1, 2]),
        # Exactly between two members: tarfile alone would take this for a clean end.
        (lambda o: o["000000003.jpg"][0], [0, 1, 2]),
        # Mid-way through sample 3's caption: sample 3 is still emitted, without caption (documented choice).
        (lambda o: o["000000003.txt"][1] + 3, [0, 1, 2, 3]),
    ],
    ids=["mid-image", "mid-header", "member-boundary", "mid-caption"],
)
def test_webdataset_truncated_tar(tmp_path, photos, cut, expected_keys):
    full = write_tar(tmp_path / "full.tar", wds_members(photos, 6))
    data = full.read_bytes()
    cut_tar = tmp_path / "cut.tar"
    cut_tar.write_bytes(data[: cut(_member_offsets(full))])

    rows = rows_of(Shard(str(cut_tar), "cut.tar", "webdataset"))
    samples, errors = rows[:-1], rows[-1:]
    assert [r["key"] for r in samples] == [f"cut.tar/{i:09d}" for i in expected_keys]
    assert all(r["image"] == photos[i % len(photos)] for r, i in zip(samples, expected_keys))
    assert [r["caption"] for r in samples[:3]] == [b"caption 0", b"caption 1", b"caption 2"]
    assert errors == [
        {
            "key": "cut.tar#shard",
            "source": str(cut_tar),
            "image": None,
            "caption": None,
            "meta": "{}",
            "reason": "shard_error",
            "detail": errors[0]["detail"],
        }
    ]
    assert errors[0]["detail"].startswith("ReadError: ")
    assert errors[0]["detail"].endswith(f"after {len(expected_keys)} samples")


def test_webdataset_complete_tar_has_no_error_row(tmp_path, photos):
    full = write_tar(tmp_path / "full.tar", wds_members(photos, 6))
    rows = rows_of(Shard(str(full), "full.tar", "webdataset"))
    assert len(rows) == 6 and all(r["reason"] is None for r in rows)


def test_webdataset_gzip_and_truncated_gzip(tmp_path, photos):
    tgz = write_tar(tmp_path / "a.tar.gz", wds_members(photos, 4), mode="w:gz")
    (shard,) = expand_inputs([str(tgz)])
    assert shard.format == "webdataset"
    assert [r["caption"] for r in rows_of(shard)] == [b"caption 0", b"caption 1", b"caption 2", b"caption 3"]

    data = tgz.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    rows = rows_of(Shard(str(cut), "cut.tar.gz", "webdataset"))
    assert rows[-1]["reason"] == "shard_error" and rows[-1]["key"] == "cut.tar.gz#shard"
    assert all(r["reason"] is None for r in rows[:-1])
    assert rows[-1]["detail"].endswith(f"after {len(rows) - 1} samples")


@pytest.mark.parametrize("content", [b"this is not a tar file\n" * 100, b"tiny", b""])
def test_webdataset_not_a_tar(tmp_path, content):
    bad = touch(tmp_path / "bad.tar", content)
    (row,) = rows_of(Shard(str(bad), "bad.tar", "webdataset"))
    assert row["reason"] == "shard_error" and row["key"] == "bad.tar#shard"
    assert row["detail"].endswith("after 0 samples")


def test_webdataset_missing_shard(tmp_path):
    (row,) = rows_of(Shard(str(tmp_path / "gone.tar"), "gone.tar", "webdataset"))
    assert row["reason"] == "shard_error" and row["detail"].startswith("FileNotFoundError: ")


def test_webdataset_reads_as_a_stream(tmp_path, photos, monkeypatch):
    """The tar is opened in forward-only stream mode ("r|*"), so memory does not grow with the shard."""
    tar = write_tar(tmp_path / "a.tar", wds_members(photos, 2))
    modes = []
    real_open = tarfile.open

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(sources.tarfile, "open", spy)
    assert len(rows_of(Shard(str(tar), "a.tar", "webdataset"))) == 2
    assert modes == ["r|*"]


# ---- parquet ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", IMAGE_COLUMNS)
def test_parquet_image_column_autodetect(tmp_path, photos, column):
    path = write_parquet(tmp_path / "p.parquet", {"url": ["u0", "u1"], column: [photos[0], photos[1]]})
    rows = rows_of(Shard(str(path), "p.parquet", "parquet"))
    assert [r["image"] for r in rows] == photos[:2]
    assert [r["key"] for r in rows] == ["p.parquet#0", "p.parquet#1"]
    assert [json.loads(r["meta"]) for r in rows] == [{"url": "u0"}, {"url": "u1"}]


def test_parquet_autodetect_order(tmp_path, photos):
    path = write_parquet(tmp_path / "p.parquet", {"img": [photos[1]], "jpg": [photos[0]]})
    (row,) = rows_of(Shard(str(path), "p.parquet", "parquet"))
    assert row["image"] == photos[0]  # "jpg" comes first; "img" is just another binary column (not in meta)
    assert row["meta"] == "{}"


def test_parquet_hugging_face_image_struct(tmp_path, photos):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": photos[0], "path": "a.jpg"}, None, {"bytes": None, "path": "c.jpg"}], type=image_type)
    path = write_parquet(tmp_path / "hf.parquet", {"image": images, "text": ["a", "b", "c"]})
    rows = rows_of(Shard(str(path), "hf.parquet", "parquet"))
    assert [r["image"] for r in rows] == [photos[0], None, None]
    assert [r["reason"] for r in rows] == [None, "image_missing", "image_missing"]
    assert [r["caption"] for r in rows] == [b"a", b"b", b"c"]
    assert all(r["meta"] == "{}" for r in rows)


def test_parquet_captions_str_bytes_null(tmp_path, photos):
    imgs = [photos[0]] * 3
    s = write_parquet(tmp_path / "s.parquet", {"jpg": imgs, "caption": ["caf\xe9", None, ""]})
    b = write_parquet(tmp_path / "b.parquet", {"jpg": imgs, "TEXT": [b"\xff\xfe raw", None, b"x"]})
    none = write_parquet(tmp_path / "n.parquet", {"jpg": imgs, "other": [1, 2, 3]})
    assert [r["caption"] for r in rows_of(Shard(str(s), "s", "parquet"))] == ["caf\xe9".encode(), None, b""]
    assert [r["caption"] for r in rows_of(Shard(str(b), "b", "parquet"))] == [b"\xff\xfe raw", None, b"x"]
    assert [r["caption"] for r in rows_of(Shard(str(none), "n", "parquet"))] == [None, None, None]
    large = write_parquet(
        tmp_path / "l.parquet", {"jpg": imgs, "txt": pa.array(["a", "b", None], type=pa.large_string())}
    )
    assert [r["caption"] for r in rows_of(Shard(str(large), "l", "parquet"))] == [b"a", b"b", None]


def test_parquet_laion_metadata_passthrough(tmp_path, photos):
    columns = {
        "url": ["http://a/0.jpg", "http://a/1.jpg"],
        "caption": ["zero", "one"],
        "jpg": photos[:2],
        "similarity": [0.31, 0.28],
        "punsafe": [0.01, None],
        "pwatermark": [float("nan"), 0.5],
        "width": [512, 300],
        "height": [512, 451],
        "status": ["success", "success"],
        "exif": [b"\x00binary", b"\x01"],  # bytes have no JSON form: left out
        "tags": [["a", "b"], []],
        "box": [{"x": 1, "y": 2}, None],
        "nsfw": [False, True],
    }
    path = write_parquet(tmp_path / "laion.parquet", columns)
    rows = rows_of(Shard(str(path), "laion.parquet", "parquet"))
    assert rows[0]["meta"] == json.dumps(
        {
            "box": {"x": 1, "y": 2},
            "height": 512,
            "nsfw": False,
            "punsafe": 0.01,
            "pwatermark": None,  # NaN is not JSON
            "similarity": 0.31,
            "status": "success",
            "tags": ["a", "b"],
            "url": "http://a/0.jpg",
            "width": 512,
        },
        sort_keys=True,
    )
    assert json.loads(rows[1]["meta"])["punsafe"] is None
    assert json.loads(rows[1]["meta"])["box"] is None
    assert [r["caption"] for r in rows] == [b"zero", b"one"]


def test_parquet_overrides_and_errors(tmp_path, photos):
    path = write_parquet(
        tmp_path / "p.parquet", {"pixels": [photos[0]], "alt": ["override caption"], "caption": ["default"]}
    )
    shard = Shard(str(path), "p.parquet", "parquet")
    (row,) = rows_of(shard, image_column="pixels", caption_column="alt")
    assert row["image"] == photos[0] and row["caption"] == b"override caption"
    assert json.loads(row["meta"]) == {"caption": "default"}

    with pytest.raises(ValueError, match="no image column found.*pixels"):
        list(read_shard(shard))
    with pytest.raises(ValueError, match="image column 'nope' not found.*pixels.*alt"):
        list(read_shard(shard, image_column="nope"))
    with pytest.raises(ValueError, match="caption column 'nope' not found"):
        list(read_shard(shard, image_column="pixels", caption_column="nope"))
    with pytest.raises(ValueError, match="unsupported type"):
        list(read_shard(shard, image_column="alt"))


def test_parquet_null_image_and_row_groups(tmp_path, photos):
    images = [photos[i % 5] if i != 4 else None for i in range(10)]
    path = write_parquet(tmp_path / "p.parquet", {"jpg": images, "caption": [str(i) for i in range(10)]}, 3)
    assert pq.ParquetFile(path).num_row_groups == 4
    rows = rows_of(Shard(str(path), "sub/p.parquet", "parquet"))
    assert [r["key"] for r in rows] == [f"sub/p.parquet#{i}" for i in range(10)]
    assert [r["caption"] for r in rows] == [str(i).encode() for i in range(10)]
    assert rows[4]["reason"] == "image_missing" and rows[4]["image"] is None and "jpg" in rows[4]["detail"]
    assert all(r["reason"] is None for i, r in enumerate(rows) if i != 4)


@pytest.mark.parametrize("content", [b"not parquet at all", b"PAR1garbage"])
def test_parquet_corrupt_file(tmp_path, content):
    bad = touch(tmp_path / "bad.parquet", content)
    (row,) = rows_of(Shard(str(bad), "bad.parquet", "parquet"))
    assert row["key"] == "bad.parquet#shard" and row["reason"] == "shard_error"
    assert row["detail"].endswith("after 0 samples")


def test_parquet_corrupt_row_group_keeps_earlier_rows(tmp_path, photos):
    path = write_parquet(tmp_path / "p.parquet", {"jpg": photos[:4], "caption": list("abcd")}, row_group_size=2)
    meta = pq.ParquetFile(path).metadata
    # Overwrite the page header of row group 1's first column: its thrift no longer parses.
    offset = meta.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 32] = b"\xff" * 32
    path.write_bytes(bytes(data))

    rows = rows_of(Shard(str(path), "p.parquet", "parquet"))
    assert [r["key"] for r in rows] == ["p.parquet#0", "p.parquet#1", "p.parquet#shard"]
    assert rows[-1]["reason"] == "shard_error" and rows[-1]["detail"].endswith("after 2 samples")


def test_parquet_missing_file(tmp_path):
    (row,) = rows_of(Shard(str(tmp_path / "gone.parquet"), "gone.parquet", "parquet"))
    assert row["reason"] == "shard_error" and row["detail"].startswith("FileNotFoundError")


# ---- folders ----------------------------------------------------------------------------------------------------


def test_folder_rows(tmp_path, photos):
    root = tmp_path / "photos"
    touch(root / "a.jpg", photos[0])
    touch(root / "a.txt", b"caption a")
    touch(root / "b.PNG", photos[1])  # no caption
    touch(root / "c.txt", b"stray caption")  # no image: not a sample
    touch(root / "d.jpeg", photos[2])
    touch(root / "d.json", b'{"source": "camera"}')
    touch(root / "e.webp", photos[3])
    touch(root / "e.json", b"[not an object]")
    touch(root / "cats/x.jpg", photos[4])
    touch(root / "cats/x.txt", b"a cat")

    shards = expand_inputs([str(root)])
    assert ids(shards) == [".", "cats"]
    top, cats = (rows_of(s) for s in shards)
    assert [r["key"] for r in top] == ["a.jpg", "b.PNG", "d.jpeg", "e.webp"]
    assert [r["image"] for r in top] == photos[:4]
    assert [r["caption"] for r in top] == [b"caption a", None, None, None]
    assert [r["meta"] for r in top] == ["{}", "{}", '{"source": "camera"}', "{}"]
    assert top[3]["detail"].startswith("bad json metadata") and top[3]["reason"] is None
    assert all(r["source"] == str(root) for r in top)
    assert cats == [
        {
            "key": "cats/x.jpg",
            "source": str(root / "cats"),
            "image": photos[4],
            "caption": b"a cat",
            "meta": "{}",
            "reason": None,
            "detail": None,
        }
    ]


def test_folder_dangling_symlink_is_image_missing(tmp_path, photos):
    """expand_inputs counts symlinks named like images as images, so the reader must give each a row."""
    root = tmp_path / "photos"
    touch(root / "a.jpg", photos[0])
    (root / "b.jpg").symlink_to(root / "moved" / "b.jpg")
    touch(root / "b.txt", b"caption b")
    (root / "c.txt").symlink_to(root / "moved" / "c.txt")  # a dangling sidecar: read fails, said in detail
    touch(root / "c.jpg", photos[1])
    (root / "sub").mkdir()
    (root / "d.jpg").symlink_to(root / "sub")  # expand_inputs counts it as an image too: a row, not a sample

    (shard,) = expand_inputs([str(root)])
    rows = rows_of(shard)
    assert [r["key"] for r in rows] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert rows[1]["reason"] == "image_missing" and rows[1]["image"] is None and rows[1]["caption"] == b"caption b"
    assert rows[1]["detail"].startswith("cannot read b.jpg: FileNotFoundError")
    assert rows[2]["reason"] is None and rows[2]["caption"] is None
    assert rows[2]["detail"].startswith("cannot read c.txt: FileNotFoundError")
    assert rows[3]["reason"] == "image_missing" and rows[3]["detail"].startswith("cannot read d.jpg: ")


def test_folder_missing_directory(tmp_path):
    (row,) = rows_of(Shard(str(tmp_path / "gone"), "gone", "folder"))
    assert row["key"] == "gone#shard" and row["reason"] == "shard_error"


def test_read_shard_unknown_format():
    with pytest.raises(ValueError, match="unknown shard format"):
        read_shard(Shard("/x", "x", "csv"))  # type: ignore[arg-type]


# ---- accounting -------------------------------------------------------------------------------------------------


def test_one_row_per_sample_and_unique_keys(tmp_path, photos):
    """Across a whole job: rows == samples (keys) in the input, and keys are unique."""
    # webdataset: two parts with the same tar names and member keys, a repeated key, a group without image.
    write_tar(tmp_path / "wds/p1/00000.tar", wds_members(photos, 5))
    write_tar(tmp_path / "wds/p2/00000.tar", wds_members(photos, 5) + [("x.txt", b"t"), ("000000001.jpg", b"j")])
    # parquet: several row groups in two directories with the same file name.
    for part in ("p1", "p2"):
        write_parquet(tmp_path / f"pq/{part}/0.parquet", {"jpg": [photos[0]] * 7, "caption": ["c"] * 7}, 3)
    # folders: the same file names in two directories.
    for rel in ("img/a.jpg", "img/b.jpg", "img/sub/a.jpg", "img/sub/a.txt"):
        touch(tmp_path / rel, photos[0])

    for root, samples in (("wds", 5 + 7), ("pq", 14), ("img", 3)):
        rows = [row for shard in expand_inputs([str(tmp_path / root)]) for row in read_shard(shard)]
        assert len(rows) == samples
        assert len({r["key"] for r in rows}) == samples
        assert not any(r["reason"] == "shard_error" for r in rows)
