"""Every bad-input kind in each input format, end to end on a real local Ray.

One job run per format (WebDataset tars, Parquet files, a folder tree with sidecar captions). Each corpus holds
good samples, one sample of every reject reason the format can express, an exact duplicate in another shard, a
shard-level fault where the format has one, and valid but unusual images that must be kept. The expectations come
from the contracts, not from the job's output: README.md ("Token shards"), pipelines/sources.py (keys,
image_missing, shard_error), pipelines/filters.py (reasons and check order) and tokenflow/image.py (decode, EXIF,
bomb guard). Outputs are read by globbing shards/ and rejects/, never by file name.
"""

import hashlib
import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data

from pipelines.filters import REJECT_REASONS, FilterConfig
from pipelines.pretokenize import PretokenizeConfig, run
from pipelines.tokenize import load_tokenizer

SIZE = (160, 120)  # every kept photo is stored at this size
MAX_PIXELS = 100_000  # the decompression-bomb guard, far below Pillow's default so a bomb is a small file
FILTERS = FilterConfig(
    caption_min_chars=3,
    caption_max_chars=100,
    metadata_max={"punsafe": 0.5, "pwatermark": 0.8},
    metadata_min={"similarity": 0.28},
    max_pixels=MAX_PIXELS,
)
GOOD_META = {"punsafe": 0.1, "pwatermark": 0.2, "similarity": 0.35, "url": "https://example.com/good.jpg"}
NULL_META = {"punsafe": None, "pwatermark": None, "similarity": float("nan")}  # unknown values pass (LAION nulls)
NULL_META_COLUMNS = {"punsafe": None, "pwatermark": None, "similarity": None}  # NaN arrives as null


# ---- images ---------------------------------------------------------------------------------------------------


def _photo(name: str, size=SIZE) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB").resize(size)


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h (the pixel data is garbage)."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def _images() -> dict[str, bytes]:
    jpeg = {name: _save(_photo(name), "JPEG", quality=85) for name in ("astronaut", "chelsea", "coffee", "rocket")}
    la = _photo("chelsea").convert("L")
    la.putalpha(Image.linear_gradient("L").resize(SIZE))
    palette = _photo("rocket").convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    frames = [_photo(n).convert("P", palette=Image.Palette.ADAPTIVE) for n in ("coffee", "astronaut")]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 160 x 120, displayed turned by 90 degrees: 120 x 160
    gray16 = np.asarray(_photo("camera").convert("L"), dtype=np.uint16) * 257
    images = {
        **jpeg,
        "astronaut_small": _save(_photo("astronaut", (128, 96)), "JPEG", quality=85),
        "garbage": b"this is not an image",
        "truncated": jpeg["coffee"][: len(jpeg["coffee"]) // 2],
        "bomb": _save(_photo("coffee", (400, 300)), "JPEG"),  # 120,000 pixels > MAX_PIXELS
        "bomb_header": _png_header_only(30_000, 30_000),  # past Pillow's own limit: refused by Image.open
        "small": _save(_photo("rocket", (40, 30)), "JPEG"),
        "wide": _save(_photo("rocket", (320, 64)), "JPEG"),  # shorter side 64 passes, ratio 5 does not
        "cmyk": _save(_photo("coffee").convert("CMYK"), "JPEG", quality=90),
        "palette": _save(palette, "PNG", transparency=0),
        "la": _save(la, "PNG"),
        "gray": _save(_photo("camera").convert("L"), "JPEG", quality=90),
        "png16": _save(Image.fromarray(gray16), "PNG"),
        "anim": _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "exif6": _save(_photo("chelsea"), "JPEG", quality=80, exif=exif),
    }
    with Image.open(io.BytesIO(images["cmyk"])) as im:
        assert im.mode == "CMYK"
    with Image.open(io.BytesIO(images["palette"])) as im:
        assert im.mode == "P" and "transparency" in im.info
    with Image.open(io.BytesIO(images["la"])) as im:
        assert im.mode == "LA"
    with Image.open(io.BytesIO(images["png16"])) as im:
        assert im.mode in ("I;16", "I") and np.asarray(im).max() > 255
    with Image.open(io.BytesIO(images["anim"])) as im:
        assert im.n_frames == 2
    with Image.open(io.BytesIO(images["exif6"])) as im:
        assert im.size == SIZE and im.getexif()[0x0112] == 6
    return images


IMAGES = _images()
EXT = {"palette": "png", "la": "png", "png16": "png", "bomb_header": "png", "anim": "gif"}  # else jpg


@dataclass(frozen=True)
class Kind:
    name: str  # the sample's name in the corpus (member key, file stem, or row)
    image: str  # key of IMAGES
    caption: bytes | None
    meta: dict | None
    reason: str | None  # expected reject reason; None: kept
    size: tuple[int, int] = SIZE  # (width, height) of a kept sample: as displayed, EXIF applied

    @property
    def ext(self) -> str:
        return EXT.get(self.image, "jpg")


def _ok(name: str, image: str, **kw) -> Kind:
    return Kind(name, image, f"a photo ({name})".encode(), None, None, **kw)


def _bad(name: str, image: str, reason: str, caption: bytes | None = b"a fine caption", meta=None) -> Kind:
    return Kind(name, image, caption, meta, reason)


# The first shard of every format: one of each kind the reader and the filters can see in a sample.
KINDS = [
    Kind("good", "astronaut", b"  an astronaut \n", GOOD_META, None),
    Kind("nullmeta", "coffee", b"a cup of coffee", NULL_META, None),
    _ok("first", "chelsea"),  # its copy is in the second shard: one of the two is a duplicate
    _bad("capmissing", "astronaut", "caption_missing", caption=None),
    _bad("capempty", "astronaut", "caption_empty", caption=b" \n\t "),
    _bad("capshort", "astronaut", "caption_too_short", caption=b"ab"),
    _bad("caplong", "astronaut", "caption_too_long", caption=b"x" * 101),
    _bad("capbad", "astronaut", "caption_encoding", caption=b"\xff\xfe a cat"),
    _bad("unsafe", "astronaut", "metadata_filter", meta={"punsafe": 0.9}),
    _bad("watermark", "astronaut", "metadata_filter", meta={"pwatermark": 0.95}),
    _bad("lowsim", "astronaut", "metadata_filter", meta={"similarity": 0.1}),
    _bad("order", "garbage", "metadata_filter", meta={"punsafe": 0.9}),  # metadata is checked before decoding
    _bad("corrupt", "garbage", "decode_error"),
    _bad("truncated", "truncated", "truncated"),
    _bad("bomb", "bomb", "decompression_bomb"),
    _bad("bombheader", "bomb_header", "decompression_bomb"),
    _bad("small", "small", "too_small"),
    _bad("wide", "wide", "aspect_ratio"),
    _ok("cmyk", "cmyk"),
    _ok("palette", "palette"),
    _ok("la", "la"),
    _ok("gray", "gray"),
    _ok("png16", "png16"),
    _ok("anim", "anim"),
    _ok("exif6", "exif6", size=(SIZE[1], SIZE[0])),
]
# The second shard: the copy of "first"; a valid sample whose invalid copy sorts first (it must be kept, never
# dropped for an invalid copy); and a valid copy of it in the same shard, where the smallest key is kept.
SECOND = [
    _ok("copy", "chelsea"),
    _bad("twin_a", "rocket", "caption_missing", caption=None),
    _ok("twin_b", "rocket"),
    _bad("twin_c", "rocket", "duplicate"),
]
# A shard with a fault after two samples: both are still processed.
BEFORE_FAULT = [_ok("t0", "astronaut_small", size=(128, 96)), _bad("t1", "small", "too_small")]


@dataclass
class Corpus:
    root: Path
    expected: dict[str, str | None] = field(default_factory=dict)  # key -> reason, None when kept
    sources: dict[str, str] = field(default_factory=dict)  # key -> the input shard path in `source`
    kinds: dict[str, Kind] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # key -> image file (folders)
    shard_errors: dict[str, int] = field(default_factory=dict)  # shard-error key -> samples read before the fault
    details: dict[str, str] = field(default_factory=dict)  # key -> expected start of the reject detail
    meta_columns: dict[str, dict] = field(default_factory=dict)  # kept key -> expected extra columns
    dup: tuple[str, str] = ("", "")
    shards: int = 0

    def add(self, key: str, kind: Kind | None, source: Path, reason: str | None = None) -> None:
        assert key not in self.expected
        self.expected[key] = kind.reason if kind else reason
        self.sources[key] = str(source)
        if kind:
            self.kinds[key] = kind


# ---- WebDataset ---------------------------------------------------------------------------------------------


def _members(kinds: list[Kind]) -> list[tuple[str, bytes]]:
    out = []
    for k in kinds:
        out.append((f"{k.name}.{k.ext}", IMAGES[k.image]))
        if k.caption is not None:
            out.append((f"{k.name}.txt", k.caption))
        if k.meta is not None:
            out.append((f"{k.name}.json", json.dumps(k.meta).encode()))
    return out


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def _webdataset(root: Path) -> Corpus:
    root.mkdir()
    c = Corpus(root, shards=3)
    noimage = [("noimage.txt", b"a caption without an image"), ("noimage.json", b'{"punsafe": 0.1}')]
    _tar(root / "00000.tar", _members(KINDS) + noimage)
    _tar(root / "00001.tar", _members(SECOND))
    # 00002.tar is cut in the middle of the third sample's image: that sample is lost, the two before are not.
    cut = root / "00002.tar"
    _tar(cut, _members([*BEFORE_FAULT, _ok("t2", "coffee")]))
    with tarfile.open(cut) as tf:
        member = tf.getmember("t2.jpg")
    cut.write_bytes(cut.read_bytes()[: member.offset_data + member.size // 2])

    for shard, kinds in (("00000.tar", KINDS), ("00001.tar", SECOND), ("00002.tar", BEFORE_FAULT)):
        for k in kinds:
            c.add(f"{shard}/{k.name}", k, root / shard)
    c.add("00000.tar/noimage", None, root / "00000.tar", "image_missing")
    c.details["00001.tar/twin_c"] = "same image bytes as 00001.tar/twin_b"
    c.details["00000.tar/noimage"] = "no image member among: noimage.txt, noimage.json"
    c.add("00002.tar#shard", None, cut, "shard_error")
    c.shard_errors["00002.tar#shard"] = 2
    c.details["00002.tar#shard"] = "ReadError: "
    c.meta_columns = {"00000.tar/good": GOOD_META, "00000.tar/nullmeta": NULL_META_COLUMNS}
    c.dup = ("00000.tar/first", "00001.tar/copy")
    return c


# ---- Parquet ------------------------------------------------------------------------------------------------

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _captions(values: list[bytes | None]) -> pa.Array:
    """A string column holding the bytes as given: Arrow does not validate UTF-8, so bad captions survive."""
    return pa.array(values, pa.binary()).view(pa.string())


def _parquet(root: Path) -> Corpus:
    root.mkdir()
    c = Corpus(root, shards=4)
    # a.parquet: Hugging Face image structs, LAION-style metadata columns ("width" collides with a core column).
    images = [{"bytes": IMAGES[k.image], "path": f"{k.name}.{k.ext}"} for k in KINDS]
    images += [None, {"bytes": None, "path": "only/a/path.jpg"}]  # a null struct, a struct without bytes
    captions = [k.caption for k in KINDS] + [b"a caption", b"a caption"]
    metas = [k.meta or {} for k in KINDS] + [{}, {}]
    width = [1024 if k.name == "good" else None for k in KINDS] + [None, None]
    columns = {"image": pa.array(images, HF_IMAGE), "caption": _captions(captions)}
    for name, type_ in (("punsafe", pa.float64()), ("pwatermark", pa.float64()), ("similarity", pa.float64())):
        columns[name] = pa.array([m.get(name) for m in metas], type_)
    columns["url"] = pa.array([m.get("url") for m in metas], pa.string())
    columns["width"] = pa.array(width, pa.int64())
    pq.write_table(pa.table(columns), root / "a.parquet")
    for i, k in enumerate(KINDS):
        c.add(f"a.parquet#{i}", k, root / "a.parquet")
    for i in (len(KINDS), len(KINDS) + 1):
        c.add(f"a.parquet#{i}", None, root / "a.parquet", "image_missing")
        c.details[f"a.parquet#{i}"] = "null image in column 'image'"
    c.meta_columns = {
        "a.parquet#0": {**GOOD_META, "meta_width": 1024},
        "a.parquet#1": {**NULL_META_COLUMNS, "url": None, "meta_width": None},
    }

    # b.parquet: plain binary images, LAION's TEXT caption column; the copy of a.parquet's "first".
    pq.write_table(
        pa.table({"jpg": [IMAGES[k.image] for k in SECOND], "TEXT": _captions([k.caption for k in SECOND])}),
        root / "b.parquet",
    )
    for i, k in enumerate(SECOND):
        c.add(f"b.parquet#{i}", k, root / "b.parquet")
    c.details["b.parquet#3"] = "same image bytes as b.parquet#2"

    # c.parquet: row groups of two rows; the last one is corrupt (its first page header overwritten).
    rows = [*BEFORE_FAULT, _ok("t2", "coffee"), _ok("t3", "rocket")]
    path = root / "c.parquet"
    table = pa.table({"jpg": [IMAGES[k.image] for k in rows], "caption": _captions([k.caption for k in rows])})
    pq.write_table(table, path, row_group_size=2)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 32] = b"\xff" * 32
    path.write_bytes(bytes(raw))
    for i, k in enumerate(BEFORE_FAULT):
        c.add(f"c.parquet#{i}", k, path)
    c.add("c.parquet#shard", None, path, "shard_error")
    c.shard_errors["c.parquet#shard"] = 2

    # d.parquet: cut in half, footer gone: nothing is readable, one shard_error row.
    path = root / "d.parquet"
    pq.write_table(table, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    c.add("d.parquet#shard", None, path, "shard_error")
    c.shard_errors["d.parquet#shard"] = 0
    c.dup = ("a.parquet#2", "b.parquet#0")
    return c


# ---- folders ------------------------------------------------------------------------------------------------


def _write_kinds(directory: Path, kinds: list[Kind], prefix: str, c: Corpus) -> None:
    directory.mkdir(parents=True)
    for k in kinds:
        image = directory / f"{k.name}.{k.ext}"
        image.write_bytes(IMAGES[k.image])
        if k.caption is not None:
            (directory / f"{k.name}.txt").write_bytes(k.caption)
        if k.meta is not None:
            (directory / f"{k.name}.json").write_text(json.dumps(k.meta))
        key = f"{prefix}{image.name}"
        c.add(key, k, directory)
        c.files[key] = image


def _folder(root: Path) -> Corpus:
    c = Corpus(root, shards=2)
    _write_kinds(root, KINDS, "", c)
    _write_kinds(root / "sub", SECOND, "sub/", c)
    # sidecars without an image are not samples (sources.read_folder_shard): no row anywhere
    (root / "orphan.txt").write_bytes(b"a caption without an image")
    (root / "orphan.json").write_text('{"punsafe": 0.1}')
    # an image that cannot be read (a dangling symlink, the store it pointed to is gone) is image_missing
    (root / "gone.jpg").symlink_to(root / "moved-away" / "gone.jpg")
    (root / "gone.txt").write_bytes(b"a caption whose image is gone")
    c.details["sub/twin_c.jpg"] = "same image bytes as sub/twin_b.jpg"
    c.add("gone.jpg", None, root, "image_missing")
    c.details["gone.jpg"] = "cannot read gone.jpg: FileNotFoundError"
    c.meta_columns = {"good.jpg": GOOD_META, "nullmeta.jpg": NULL_META_COLUMNS}
    c.dup = ("first.jpg", "sub/copy.jpg")
    return c


BUILDERS = {"webdataset": _webdataset, "parquet": _parquet, "folder": _folder}


# ---- the job ------------------------------------------------------------------------------------------------


@dataclass
class Job:
    corpus: Corpus
    out: Path
    manifest: dict
    kept: dict[str, dict]
    rejects: dict[str, dict]
    expected: dict[str, str | None]  # the corpus's expectations, with the duplicate pair resolved
    first: str  # the committed copy of the duplicate pair
    copy: str


def _rows(directory: Path) -> list[dict]:
    """Rows of every Parquet file under `directory`, each file read alone (their metadata columns may differ)."""
    return [row for path in sorted(directory.glob("**/*.parquet")) for row in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("preset:tiny")


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def job(request, ray_local, tmp_path_factory) -> Job:
    base = tmp_path_factory.mktemp(request.param)
    corpus = BUILDERS[request.param](base / "corpus")
    out = base / "out"
    cfg = PretokenizeConfig(
        input=[str(corpus.root)],
        output=str(out),
        tokenizer="preset:tiny",
        tokenizer_actors=1,
        batch_size=4,
        read_batch_rows=8,
        filters=FILTERS,
    )
    manifest = run(cfg)
    kept_rows, reject_rows = _rows(out / "shards"), _rows(out / "rejects")
    keys = [r["key"] for r in kept_rows + reject_rows]
    assert [k for k, n in Counter(keys).items() if n > 1] == [], "keys written twice"
    kept, rejects = {r["key"]: r for r in kept_rows}, {r["key"]: r for r in reject_rows}
    # The first committed copy is kept (README): the two shards may commit in either order.
    first, copy = corpus.dup
    if copy in kept:
        first, copy = copy, first
    expected = {**corpus.expected, first: None, copy: "duplicate"}
    return Job(corpus, out, manifest, kept, rejects, expected, first, copy)


def test_every_sample_has_exactly_one_row_with_its_reason(job):
    kept, rejects = job.kept, job.rejects
    assert not set(kept) & set(rejects)
    assert sorted(set(kept) | set(rejects)) == sorted(job.expected)
    assert sorted(kept) == sorted(k for k, reason in job.expected.items() if reason is None)
    assert {k: r["reason"] for k, r in rejects.items()} == {k: v for k, v in job.expected.items() if v}
    for key, row in rejects.items():
        assert row["reason"] in REJECT_REASONS and row["detail"], key
        assert row["detail"].startswith(job.corpus.details.get(key, "")), (key, row["detail"])
    for key, row in [*kept.items(), *rejects.items()]:
        assert row["source"] == job.corpus.sources[key], key


def test_duplicate_names_the_kept_copy(job):
    assert job.rejects[job.copy]["detail"] == f"same image bytes as {job.first}"
    assert job.kept[job.first]["image_sha256"] == hashlib.sha256(IMAGES["chelsea"]).hexdigest()


def test_shard_fault_keeps_every_sample_read_before_it(job):
    # a folder shard fails only when its directory cannot be listed, which a test running as root cannot stage
    # (tests/unit/test_sources.py covers that reader); tars and Parquet files are cut or corrupted here
    assert bool(job.corpus.shard_errors) == (not job.corpus.files)  # files: only folder corpora list them
    for key, before in job.corpus.shard_errors.items():
        assert job.rejects[key]["reason"] == "shard_error"
        assert job.rejects[key]["detail"].endswith(f" after {before} samples"), job.rejects[key]["detail"]
    # the samples before each fault went through every later stage (decode, filters, tokenize)
    shard_of = {key.split("#")[0] for key in job.corpus.shard_errors}
    before_fault = {k: v for k, v in job.expected.items() if k.split("/")[0].split("#")[0] in shard_of}
    assert {k: job.kept.get(k, job.rejects.get(k, {})).get("reason") for k in before_fault} == before_fault


def test_kept_rows_tokens_size_caption(job, tok):
    for key, row in job.kept.items():
        kind = job.corpus.kinds[key]
        image = IMAGES[kind.image]
        source = job.corpus.files.get(key) or io.BytesIO(image)
        direct = tok.encode(tok.preprocess([Image.open(source)]))[0]
        assert torch.equal(torch.tensor(row["tokens"], dtype=torch.long), direct), key
        assert (row["width"], row["height"]) == kind.size, key
        assert row["caption"] == kind.caption.decode().strip(), key
        assert row["image_sha256"] == hashlib.sha256(image).hexdigest(), key
        assert row["clip_score"] is None


def test_unusual_images_are_kept(job):
    """CMYK, palette + transparency, LA, L, 16-bit, animated (first frame), EXIF-rotated: all valid, all kept."""
    unusual = {"cmyk", "palette", "la", "gray", "png16", "anim", "exif6"}
    kept = {job.corpus.kinds[k].name for k in job.kept}
    assert unusual <= kept
    (exif_key,) = [k for k in job.kept if job.corpus.kinds[k].name == "exif6"]
    assert (job.kept[exif_key]["width"], job.kept[exif_key]["height"]) == (120, 160)  # displayed, not stored


def test_metadata_reaches_kept_rows(job):
    for key, columns in job.corpus.meta_columns.items():
        row = job.kept[key]
        assert {name: row[name] for name in columns} == columns, key
    for key, row in job.kept.items():
        assert row["width"] == job.corpus.kinds[key].size[0]  # the core column, never the metadata's


def test_manifest_counts(job):
    reasons = Counter(r for r in job.expected.values() if r)
    assert job.manifest["counts"] == {
        "samples": len(job.expected),
        "kept": len(job.expected) - sum(reasons.values()),
        "rejected": sum(reasons.values()),
        "reasons": dict(sorted(reasons.items())),
    }
    assert job.manifest["shards_done"] == job.corpus.shards
    assert json.loads((job.out / "manifest.json").read_text())["counts"] == job.manifest["counts"]
    listed = {f["path"]: f["rows"] for f in job.manifest["files"]}
    on_disk = {
        str(p.relative_to(job.out)): pq.read_metadata(p).num_rows
        for sub in ("shards", "rejects")
        for p in (job.out / sub).glob("**/*.parquet")
    }
    assert listed == on_disk
    assert sum(listed.values()) == len(job.expected)


# ---- LLaVA annotations ----------------------------------------------------------------------------------------


def _chat(question: str, answer: str, image: bool = True) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


def test_llava_annotations_with_an_image_root(ray_local, tok, tmp_path):
    """`--format llava` end to end: a JSON annotation file split into two entry ranges, images under an image root.
    Image and text-only samples are kept (text-only with null tokens), a missing image, a broken one and a malformed
    conversation are rejected with their reasons, and one image asked about twice is two samples, not a duplicate."""
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    (images / "coco/a.jpg").write_bytes(IMAGES["astronaut"])
    (images / "coco/broken.jpg").write_bytes(IMAGES["garbage"])
    entries = [
        {"id": "img", "image": "coco/a.jpg", "conversations": _chat("What is this? (ü, 😀)", "An astronaut.")},
        {"id": "text", "conversations": _chat("Write a haiku.", "Frost on the window", image=False)},
        {"id": "gone", "image": "coco/gone.jpg", "conversations": _chat("Q", "A")},
        {"id": "broken", "image": "coco/broken.jpg", "conversations": _chat("Q", "A")},
        {"id": "bad", "image": "coco/a.jpg", "conversations": "<image>\nnot a list of turns"},
        {"id": "img2", "image": "coco/a.jpg", "conversations": _chat("What colour is the suit?", "White.")},
    ]
    annotations = tmp_path / "ann" / "llava.json"
    annotations.parent.mkdir()
    annotations.write_text(json.dumps(entries, indent=1))
    out = tmp_path / "out"
    cfg = PretokenizeConfig(
        input=[str(annotations)],
        output=str(out),
        tokenizer="preset:tiny",
        format="llava",
        image_root=str(images),
        llava_entries_per_shard=4,
        tokenizer_actors=1,
        batch_size=4,
        read_batch_rows=8,
        filters=FILTERS,
    )
    manifest = run(cfg)

    key = {e["id"]: f"llava.json#{'0-3' if i < 4 else '4-5'}/{e['id']}" for i, e in enumerate(entries)}
    kept_rows, reject_rows = _rows(out / "shards"), _rows(out / "rejects")
    assert sorted(r["key"] for r in kept_rows + reject_rows) == sorted(key.values())  # each sample exactly once
    kept, rejects = {r["key"]: r for r in kept_rows}, {r["key"]: r for r in reject_rows}
    assert sorted(kept) == sorted(key[i] for i in ("img", "text", "img2"))
    assert {k: (r["reason"], r["source"]) for k, r in rejects.items()} == {
        key["gone"]: ("image_missing", str(annotations)),
        key["broken"]: ("decode_error", str(annotations)),
        key["bad"]: ("conversations_invalid", str(annotations)),
    }
    assert rejects[key["gone"]]["detail"] == f"image not found: {images}/coco/gone.jpg"
    assert rejects[key["bad"]]["detail"] == "entry 4: 'conversations' is a string, not a list of turns"

    by_id = {e["id"]: e for e in entries}
    direct = tok.encode(tok.preprocess([Image.open(io.BytesIO(IMAGES["astronaut"]))]))[0]
    for k, row in kept.items():
        entry = by_id[row["id"]]
        assert json.loads(row["conversations"]) == entry["conversations"], k  # the turns exactly, <image> kept
        assert row["caption"] is None and row["source"] == str(annotations) and row["image"] == entry.get("image")
        if "image" in entry:
            assert torch.equal(torch.tensor(row["tokens"], dtype=torch.long), direct), k
            assert (row["width"], row["height"]) == SIZE
            assert row["image_sha256"] == hashlib.sha256(IMAGES["astronaut"]).hexdigest()
        else:  # text-only: kept, never tokenized
            assert (row["tokens"], row["width"], row["height"], row["image_sha256"]) == (None,) * 4
    assert manifest["counts"] == {
        "samples": 6,
        "kept": 3,
        "rejected": 3,
        "reasons": {"conversations_invalid": 1, "decode_error": 1, "image_missing": 1},
    }
    assert manifest["shards_done"] == 2 and manifest["inputs_done"] == [str(annotations)]
