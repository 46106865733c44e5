"""Input side of the pretokenization job: find shards, then stream each one as plain sample rows.

Plain Python on purpose (fsspec, pyarrow, tarfile; no Ray): the Ray Data stages call `expand_inputs` on the
driver and `read_shard` inside tasks, one shard per task, so everything here must be picklable and bounded in
memory per shard.

Row contract (every reader yields exactly these keys; llava rows also carry `conversations`):

    {"key": str,              # unique across the job (see "Keys")
     "source": str,           # the Shard.path the row came from ("s3://b/x/00001.tar", "/data/x/00001.tar")
     "image": bytes | None,   # raw encoded image bytes, never decoded here
     "caption": bytes | None, # raw caption bytes, not decoded (a later stage checks UTF-8)
     "meta": str,             # json.dumps(..., sort_keys=True) of a JSON object, "{}" when none
     "reason": str | None,    # None for a normal sample, else one of REASONS_FROM_SOURCES
     "detail": str | None}    # human-readable explanation (also set on kept rows, e.g. bad json metadata)
    llava rows: "conversations": str | None  # the entry's turns as JSON text, exactly as given; None if rejected
                                             # caption None; image None for a text-only sample (no `image`)

Keys. `shard_id` is the shard's path relative to its input root, with "/" separators: the directory given, the
non-glob prefix directory of a glob/brace pattern, or the parent directory of a single file. Then:
    webdataset  f"{shard_id}/{member_key}"   member_key = member path up to the first dot of its basename
                                             (the webdataset `__key__`); a key that reappears later in the same
                                             tar gets "~2", "~3", ... appended
    parquet     f"{shard_id}#{row_index}"    0-based row index in the file
    folder      the image's path relative to the input root, extension included ("cats/a.jpg")
    llava       f"{shard_id}/{id}"           the entry's `id` ("#{entry_index}" when it has none); repeated ids
                                             within a shard get "~2", "~3", ... A file of more entries than
                                             `entries_per_shard` is split into shards of entry ranges whose
                                             shard_id is f"{file}#{first}-{last}" ("mix665k.json#0-4999")
    shard error f"{shard_id}#shard"

LLaVA annotations (format "llava"): a JSON array or a JSON Lines file of `{"id", "image"?, "conversations": [{"from":
"human"|"gpt", "value": str}, ...]}` (role/content keys are accepted too), `image` relative to an image root (by
default the annotation file's directory, as LLaVA's `--image_folder`). `expand_inputs` makes one pass over each file
to find where its entry ranges start (a byte offset each), so a read task seeks to its range and parses only that,
streaming, in memory bounded by one chunk and one entry. An entry that is not an object with a list of turns is a
`conversations_invalid` row (so is a JSON Lines line that is not JSON); an image that is not found or cannot be read
is `image_missing` (the path in its detail); an entry without `image` is a text-only sample (image None).

Faults. Bad data never raises: a sample without an image is a row with reason "image_missing"; a shard that is
missing, unreadable, truncated or corrupt yields every sample read before the fault and then exactly one row with
reason "shard_error" whose detail is "<ExceptionType>: <message> after N samples" (for a JSON array: invalid JSON, a
missing "," or "]", data after the "]"). Configuration mistakes (an unknown format, a parquet column override that
does not exist, no image column) raise ValueError, and inputs that match nothing raise FileNotFoundError, because
retrying or skipping cannot fix those.
"""

from __future__ import annotations

import codecs
import itertools
import json
import lzma
import math
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "CAPTION_COLUMNS",
    "FORMATS",
    "IMAGE_COLUMNS",
    "IMAGE_EXTENSIONS",
    "JSON_EXTENSIONS",
    "LLAVA_ENTRIES_PER_SHARD",
    "PARQUET_EXTENSIONS",
    "REASONS_FROM_SOURCES",
    "TAR_EXTENSIONS",
    "AnnotationError",
    "Shard",
    "Span",
    "expand_braces",
    "expand_inputs",
    "read_folder_shard",
    "read_llava_shard",
    "read_parquet_shard",
    "read_shard",
    "read_webdataset_shard",
    "resolve_directory",
]

Format = Literal["webdataset", "parquet", "folder", "llava"]
FORMATS: tuple[str, ...] = ("webdataset", "parquet", "folder", "llava")

# Lower-case, without the dot. Matching is case-insensitive ("a.JPG" is an image).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
TAR_EXTENSIONS: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTENSIONS: tuple[str, ...] = (".parquet",)
# LLaVA annotation files. Only read as such with format "llava", or a single file named as an input: directories of
# other formats hold .json files too (webdataset/folder sidecars, img2dataset's *_stats.json).
JSON_EXTENSIONS: tuple[str, ...] = (".json", ".jsonl")
REASONS_FROM_SOURCES: tuple[str, ...] = ("conversations_invalid", "image_missing", "shard_error")

# Entries of a LLaVA annotation file per shard (read task, resume unit): llava_v1_5_mix665k.json is 133 shards.
LLAVA_ENTRIES_PER_SHARD = 5000

# Auto-detection order for parquet columns (img2dataset, Hugging Face datasets, LAION metadata).
IMAGE_COLUMNS: tuple[str, ...] = ("jpg", "image", "image_bytes", "img", "png", "webp")
CAPTION_COLUMNS: tuple[str, ...] = ("caption", "TEXT", "text", "txt")

# What "the shard is broken" looks like: I/O and archive errors (s3fs maps its failures to OSError), truncated
# gzip/xz streams, and Arrow's errors for corrupt parquet. Anything else is a bug and should surface.
_SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError, pa.ArrowException)

# Rows per Arrow batch when reading parquet: small enough that the Python copies of one batch stay small,
# large enough that per-batch overhead is noise. Memory is bounded by one row group either way.
_PARQUET_BATCH_ROWS = 1024

# LLaVA annotations are read in chunks of this many bytes; one entry (a JSON Lines line, an array element) may not
# exceed _MAX_ENTRY_BYTES, which bounds the memory a corrupt file (an unterminated string) can take.
_JSON_CHUNK = 1 << 20
_MAX_ENTRY_BYTES = 64 << 20
# Images of a llava shard are fetched this many entries at a time, by this many threads (object stores: latency).
_IMAGE_BATCH = 32
_IMAGE_THREADS = 8

_GLOB_CHARS = "*?[{"


# ---------------------------------------------------------------------------------------------------------------
# Input expansion
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """The part of a LLaVA annotation file a shard reads: `count` entries from entry `first`, which starts at byte
    `offset` (found by expand_inputs' pass over the file)."""

    first: int = 0
    offset: int = 0
    count: int | None = None  # None: to the end of the file, which is then checked to end properly
    layout: Literal["array", "lines"] | None = None  # a JSON array or JSON Lines; None: detect from the file


@dataclass(frozen=True)
class Shard:
    """One unit of reading work: a tar, a parquet file, one directory of images, or a LLaVA annotation file (or a
    range of its entries)."""

    path: str  # full path or URI, protocol kept for remote files ("s3://bucket/x/00001.tar")
    shard_id: str  # path relative to the input root, "/"-separated ("part1/00001.tar"; "." for a root folder)
    format: Format
    span: Span | None = None  # llava: the entries this shard reads; None: the whole file


def expand_inputs(
    inputs: Sequence[str],
    *,
    format: str | None = None,
    storage_options: dict | None = None,
    entries_per_shard: int = LLAVA_ENTRIES_PER_SHARD,
) -> list[Shard]:
    """Expand files, directories, globs and brace patterns into shards, sorted by path and deduplicated.

    The format is detected from extensions (.tar/.tar.gz/.tgz -> webdataset, .parquet -> parquet, directories of
    images -> folder, one Shard per directory that directly holds images, a single named .json/.jsonl file ->
    llava) unless `format` is given. With format "llava" every .json/.jsonl file found is an annotation file, read
    once here to split it into shards of `entries_per_shard` entries. When the same path is reached through
    several inputs it appears once, with the shard_id of the first input that reached it.
    Raises FileNotFoundError for an input that matches nothing and ValueError for a job mixing formats.
    """
    if isinstance(inputs, str):  # a lone string is one input, not a sequence of one-character inputs
        inputs = [inputs]
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    if entries_per_shard < 1:
        raise ValueError(f"entries_per_shard must be >= 1, got {entries_per_shard}")
    options = storage_options or {}
    by_path: dict[tuple[str, Span | None], Shard] = {}
    for spec in inputs:
        for shard in _expand_one(spec, format, options, entries_per_shard):
            by_path.setdefault((shard.path, shard.span), shard)
    shards = sorted(by_path.values(), key=lambda s: (s.path, s.span.first if s.span else 0))
    _check_single_format(shards)
    return shards


def resolve_directory(uri: str, *, storage_options: dict | None = None) -> str:
    """`uri` as a full path (absolute for local paths, so that read tasks in other working directories find it)
    or URI; FileNotFoundError unless it is a directory (or, on object stores, a prefix holding objects)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    path = _strip_trailing_slash(path)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{uri!r} is not a directory")
    return _full_path(fs, path)


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a,b}` lists and `{00000..00003}` numeric ranges (zero padding kept), webdataset/bash style.

    Nested braces expand too; a brace group with neither a comma nor a range is kept literally.
    """
    span = _first_brace_group(pattern)
    if span is None:
        return [pattern]
    start, end = span
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    range_match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if range_match:
        middles = _numeric_range(*range_match.groups())
    else:
        parts = _split_top_level_commas(body)
        if len(parts) > 1:
            middles = [m for part in parts for m in expand_braces(part)]
        else:
            middles = ["{" + m + "}" for m in expand_braces(body)]
    tails = expand_braces(tail)
    return [head + m + t for m in middles for t in tails]


def _expand_one(spec: str, fmt: str | None, options: dict, per_shard: int) -> list[Shard]:
    """Shards reached by one input (file, directory, glob or brace pattern)."""
    fs, path = fsspec.core.url_to_fs(spec, **options)
    path = _strip_trailing_slash(path)
    if any(c in path for c in _GLOB_CHARS):
        # The root is computed on the unexpanded pattern so that every brace alternative shares it:
        # "data/{a,b}/x.tar" gives shard ids "a/x.tar" and "b/x.tar".
        root = _pattern_root(path)
        matches = _match_patterns(fs, expand_braces(path))
        if not matches:
            raise FileNotFoundError(f"input {spec!r} matched nothing")
        files = _files_of(fs, matches)
        shards = _shards_from_files(fs, files, root, fmt, per_shard)
    else:
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"input {spec!r} does not exist") from None
        if info["type"] == "directory":
            shards = _shards_from_files(fs, _files_of(fs, {path: info}), path, fmt, per_shard)
        else:
            shards = _named_file_shards(fs, path, fmt, per_shard)
    if not shards:
        wanted = {
            "webdataset": "tar files (" + ", ".join(TAR_EXTENSIONS) + ")",
            "parquet": "parquet files",
            "folder": "image files",
            "llava": "annotation files (" + ", ".join(JSON_EXTENSIONS) + ")",
        }.get(fmt or "", "tar, parquet or image files")
        raise FileNotFoundError(f"input {spec!r} matched no {wanted}")
    return shards


def _match_patterns(fs, patterns: list[str]) -> dict[str, dict]:
    """path -> info for everything the (brace-expanded) patterns match.

    Brace ranges such as `{00000..99999}.tar` expand to many plain paths; checking each one would cost a request
    per path on object stores, so plain paths are looked up in one listing of their parent directory instead.
    """
    matches: dict[str, dict] = {}
    plain_by_dir: dict[str, set[str]] = {}
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches.update(fs.glob(pattern, detail=True))
        else:
            plain_by_dir.setdefault(posixpath.dirname(pattern), set()).add(pattern)
    for directory, wanted in plain_by_dir.items():
        try:
            listing = fs.ls(directory, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for info in listing:
            name = info["name"].rstrip("/")
            if name in wanted:
                matches[name] = info
    return matches


def _files_of(fs, matches: dict[str, dict]) -> list[str]:
    """Files among glob matches, with matched directories scanned recursively; hidden files are skipped."""
    files: list[str] = []
    for name, info in matches.items():
        if info.get("type") == "directory":
            files.extend(fs.find(name))
        else:
            files.append(name)
    # Hidden files (".DS_Store", macOS "._x.jpg" resource forks) are never data.
    return [f for f in files if not posixpath.basename(f).startswith(".")]


def _shards_from_files(fs, files: list[str], root: str, fmt: str | None, per_shard: int) -> list[Shard]:
    """Shards for the files found under one input, detecting the format unless `fmt` is given."""
    tars = [f for f in files if _has_ext(f, TAR_EXTENSIONS)]
    parquets = [f for f in files if _has_ext(f, PARQUET_EXTENSIONS)]
    images = [f for f in files if _is_image(f)]
    if fmt is None and tars and parquets:
        # img2dataset's webdataset output keeps a metadata 00000.parquet next to each 00000.tar: those are
        # sidecars of the tars, not a second dataset. Parquets without a same-named tar stay (-> mixed error).
        tar_stems = {_strip_ext(t, TAR_EXTENSIONS) for t in tars}
        parquets = [p for p in parquets if _strip_ext(p, PARQUET_EXTENSIONS) not in tar_stems]
    if fmt is None:
        shards = [_file_shard(fs, t, root, "webdataset") for t in tars]
        shards += [_file_shard(fs, p, root, "parquet") for p in parquets]
        if shards:
            return shards
        return _folder_shards(fs, images, root)
    if fmt == "webdataset":
        return [_file_shard(fs, t, root, "webdataset") for t in tars]
    if fmt == "parquet":
        return [_file_shard(fs, p, root, "parquet") for p in parquets]
    if fmt == "llava":
        annotations = [f for f in files if _has_ext(f, JSON_EXTENSIONS)]
        return [s for a in annotations for s in _llava_shards(fs, a, root, per_shard)]
    return _folder_shards(fs, images, root)


def _named_file_shards(fs, path: str, fmt: str | None, per_shard: int) -> list[Shard]:
    """The shards for a single file named by the user (one, or a llava file's ranges); its root is its parent
    directory.

    A named file is read as `fmt` whatever its extension. A named image stands for its whole directory
    (the folder shard unit), so the other images beside it are read too.
    """
    root = posixpath.dirname(path)
    if fmt is None:
        if _has_ext(path, TAR_EXTENSIONS):
            fmt = "webdataset"
        elif _has_ext(path, PARQUET_EXTENSIONS):
            fmt = "parquet"
        elif _is_image(path):
            fmt = "folder"
        elif _has_ext(path, JSON_EXTENSIONS):
            fmt = "llava"
        else:
            raise ValueError(f"cannot detect the format of {_full_path(fs, path)!r} from its extension; pass format=")
    if fmt == "folder":
        return [Shard(_full_path(fs, root), ".", "folder")]
    if fmt == "llava":
        return _llava_shards(fs, path, root, per_shard)
    return [_file_shard(fs, path, root, fmt)]


def _file_shard(fs, path: str, root: str, fmt: str) -> Shard:
    return Shard(_full_path(fs, path), _relative(path, root), fmt)


def _folder_shards(fs, images: list[str], root: str) -> list[Shard]:
    """One folder Shard per directory that directly contains images."""
    dirs = sorted({posixpath.dirname(f) for f in images})
    return [Shard(_full_path(fs, d), _relative(d, root), "folder") for d in dirs]


def _check_single_format(shards: list[Shard]) -> None:
    formats = sorted({s.format for s in shards})
    if len(formats) > 1:
        examples = "; ".join(f"{f}: {next(s.path for s in shards if s.format == f)}" for f in formats)
        raise ValueError(
            f"inputs mix formats {formats} (e.g. {examples}); one job reads one format: "
            "narrow the inputs with a glob such as '*.tar', or pass format="
        )


def _full_path(fs, path: str) -> str:
    """Path as stored in Shard.path: plain for local files, protocol kept for everything else."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def _relative(path: str, root: str) -> str:
    """`path` relative to `root` with "/" separators, "." for the root itself."""
    if path == root:
        return "."
    prefix = root if root.endswith("/") else root + "/"
    if root and path.startswith(prefix):
        return path[len(prefix) :]
    return path  # root "" (e.g. a bucket-level pattern on a remote filesystem)


def _strip_trailing_slash(path: str) -> str:
    return path.rstrip("/") or path  # keep "/" itself


def _pattern_root(pattern: str) -> str:
    """Directory part of the pattern before its first glob or brace character."""
    first = min(i for i in (pattern.find(c) for c in _GLOB_CHARS) if i >= 0)
    head = pattern[:first]
    if "/" not in head:
        return ""
    root = head.rsplit("/", 1)[0]
    return root or "/"


def _first_brace_group(s: str) -> tuple[int, int] | None:
    """(start, end) indices of the first balanced `{...}` group, or None."""
    start = s.find("{")
    while start >= 0:
        depth = 0
        for i in range(start, len(s)):
            if s[i] == "{":
                depth += 1
            elif s[i] == "}":
                depth -= 1
                if depth == 0:
                    return start, i
        start = s.find("{", start + 1)  # unbalanced: that "{" is literal, try the next one
    return None


def _split_top_level_commas(body: str) -> list[str]:
    parts, depth, current = [], 0, []
    for c in body:
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += (c == "{") - (c == "}")
        current.append(c)
    parts.append("".join(current))
    return parts


def _numeric_range(first: str, last: str) -> list[str]:
    """{00000..00003} -> 00000 00001 00002 00003; padded when either bound has a leading zero."""
    a, b = int(first), int(last)

    def padded(s: str) -> bool:
        digits = s.lstrip("-")
        return len(digits) > 1 and digits.startswith("0")

    width = max(len(first), len(last)) if padded(first) or padded(last) else 0
    step = 1 if b >= a else -1
    return [f"{n:0{width}d}" for n in range(a, b + step, step)]


def _has_ext(path: str, exts: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(exts))


def _strip_ext(path: str, exts: Sequence[str]) -> str:
    lower = path.lower()
    for ext in exts:
        if lower.endswith(ext):
            return path[: -len(ext)]
    return path


def _is_image(path: str) -> bool:
    name = posixpath.basename(path)
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


def _row(
    key: str,
    source: str,
    image: bytes | None = None,
    caption: bytes | None = None,
    meta: str = "{}",
    reason: str | None = None,
    detail: str | None = None,
) -> dict:
    return {
        "key": key,
        "source": source,
        "image": image,
        "caption": caption,
        "meta": meta,
        "reason": reason,
        "detail": detail,
    }


def _shard_error_row(shard: Shard, exc: BaseException, samples: int) -> dict:
    detail = f"{type(exc).__name__}: {exc} after {samples} samples"
    return _row(f"{shard.shard_id}#shard", shard.path, reason="shard_error", detail=detail)


def _join_details(*parts: str | None) -> str | None:
    kept = [p for p in parts if p]
    return "; ".join(kept) if kept else None


def _nonfinite_to_none(_constant: str) -> None:
    # json.loads accepts NaN/Infinity, which are not JSON; map them to null so `meta` is strict JSON.
    return None


def _parse_json_meta(data: bytes) -> tuple[str, str | None]:
    """(meta, detail) for a JSON sidecar: the object re-serialised with sorted keys, or ("{}", why not)."""
    try:
        obj = json.loads(data, parse_constant=_nonfinite_to_none)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return "{}", f"bad json metadata: {type(e).__name__}: {e}"
    if not isinstance(obj, dict):
        return "{}", f"bad json metadata: expected an object, got {type(obj).__name__}"
    return json.dumps(obj, sort_keys=True), None


def read_shard(
    shard: Shard,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    image_root: str | None = None,
    storage_options: dict | None = None,
) -> Iterator[dict]:
    """Rows of one shard (see the module docstring), dispatching on `shard.format`.

    `image_column` / `caption_column` apply to parquet shards only, `image_root` to llava shards only.
    """
    if shard.format == "webdataset":
        return read_webdataset_shard(shard, storage_options=storage_options)
    if shard.format == "parquet":
        return read_parquet_shard(
            shard, image_column=image_column, caption_column=caption_column, storage_options=storage_options
        )
    if shard.format == "folder":
        return read_folder_shard(shard, storage_options=storage_options)
    if shard.format == "llava":
        return read_llava_shard(shard, image_root=image_root, storage_options=storage_options)
    raise ValueError(f"unknown shard format {shard.format!r}; expected one of {FORMATS}")


# ---------------------------------------------------------------------------------------------------------------
# WebDataset tars
# ---------------------------------------------------------------------------------------------------------------


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that reports a missing end-of-archive marker instead of treating it as a clean end.

    tarfile silently ends iteration when the data stops at a header boundary, or when a header after the first
    is garbage: a tar cut between two members would look complete and its lost samples would go unnoticed. A
    well-formed tar ends with zero blocks, which still end iteration normally (EOFHeaderError is not caught).
    """

    @classmethod
    def fromtarfile(cls, tarfile_obj):
        try:
            return super().fromtarfile(tarfile_obj)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            if tarfile_obj.offset == 0:
                raise  # tarfile turns these into ReadError("empty file" / "invalid header") itself
            # A plain ReadError is not one of the header errors tarfile swallows, so it propagates.
            raise tarfile.ReadError(
                f"archive ends without an end-of-archive marker at offset {tarfile_obj.offset} ({e})"
            ) from None


@dataclass
class _Group:
    """Members of one webdataset sample (consecutive members sharing a key)."""

    key: str
    names: list[str] = field(default_factory=list)
    image: bytes | None = None
    caption: bytes | None = None
    json: bytes | None = None


def _split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member, webdataset style: the key is everything before the first dot of the
    basename (directories inside the tar kept), the extension everything after it, lower-cased.
    Names without an extension, or hidden ones (".x", "._x.jpg"), are not sample members: None."""
    directory, _, base = name.rpartition("/")
    dot = base.find(".")
    if dot <= 0:
        return None
    key = f"{directory}/{base[:dot]}" if directory else base[:dot]
    return key, base[dot + 1 :].lower()


def _wanted(group: _Group | None, key: str, ext: str) -> bool:
    """Whether a member's bytes are needed: the first image, caption and json of its group; nothing else."""
    same = group is not None and group.key == key
    if ext in IMAGE_EXTENSIONS:
        return not (same and group.image is not None)
    if ext == "txt":
        return not (same and group.caption is not None)
    if ext == "json":
        return not (same and group.json is not None)
    return False


def _add_member(group: _Group, name: str, ext: str, data: bytes | None) -> None:
    group.names.append(name)
    if data is None:
        return
    if ext in IMAGE_EXTENSIONS:
        group.image = data
    elif ext == "txt":
        group.caption = data
    else:
        group.json = data


def _group_row(shard: Shard, group: _Group, key: str) -> dict:
    meta, meta_detail = ("{}", None) if group.json is None else _parse_json_meta(group.json)
    reason = image_detail = None
    if group.image is None:
        reason = "image_missing"
        image_detail = "no image member among: " + ", ".join(group.names)
    return _row(
        key,
        shard.path,
        image=group.image,
        caption=group.caption,
        meta=meta,
        reason=reason,
        detail=_join_details(image_detail, meta_detail),
    )


def _unique_key(key: str, used: set[str]) -> str:
    """`key`, or `key~2`, `key~3`, ... if it was already emitted from this shard."""
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}~{n}"
    used.add(candidate)
    return candidate


def read_webdataset_shard(shard: Shard, *, storage_options: dict | None = None) -> Iterator[dict]:
    """Yield one row per key group of a webdataset tar (plain or compressed), streaming in constant memory.

    On a fault (truncated/corrupt archive, unreadable or missing file) yields the rows read so far, then one
    shard_error row. The group being read when the fault hit is still emitted if at least one of its members was
    read completely: it may only lack its caption or json, and the later stages reject it properly if it lacks
    its image (it arrives as image_missing). A member cut mid-way is never used.
    """
    fs, path = fsspec.core.url_to_fs(shard.path, **(storage_options or {}))
    used: set[str] = set()
    group: _Group | None = None
    emitted = 0
    try:
        # "r|*": a forward-only stream (never seeks, never holds more than one member), any compression.
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                split = _split_member_name(member.name) if member.isfile() else None
                if split is None:
                    continue
                key, ext = split
                # Read before touching the groups, so that a member cut mid-way leaves no trace.
                data = tar.extractfile(member).read() if _wanted(group, key, ext) else None
                if group is not None and group.key != key:
                    done, group = group, None
                    yield _group_row(shard, done, f"{shard.shard_id}/{_unique_key(done.key, used)}")
                    emitted += 1
                if group is None:
                    group = _Group(key)
                _add_member(group, member.name, ext, data)
            if group is not None:
                done, group = group, None
                yield _group_row(shard, done, f"{shard.shard_id}/{_unique_key(done.key, used)}")
                emitted += 1
    except _SHARD_ERRORS as e:
        if group is not None:
            yield _group_row(shard, group, f"{shard.shard_id}/{_unique_key(group.key, used)}")
            emitted += 1
        yield _shard_error_row(shard, e, emitted)


# ---------------------------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------------------------


def _is_binary_type(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_image_type(t: pa.DataType) -> bool:
    """Binary, or a Hugging Face image struct {bytes: binary, path: string}."""
    if _is_binary_type(t):
        return True
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and _is_binary_type(t.field(i).type)
    return False


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or _is_binary_type(t)


def _pick_column(
    schema: pa.Schema, override: str | None, candidates: Sequence[str], accepts, what: str, required: bool
) -> str | None:
    """The column to use for `what`: the override if given, else the first candidate of an accepted type."""
    columns = ", ".join(f"{n} ({schema.field(n).type})" for n in schema.names)
    if override is not None:
        if override not in schema.names:
            raise ValueError(f"{what} column {override!r} not found; available columns: {columns}")
        if not accepts(schema.field(override).type):
            raise ValueError(f"{what} column {override!r} has unsupported type {schema.field(override).type}")
        return override
    for name in candidates:
        if name in schema.names and accepts(schema.field(name).type):
            return name
    if required:
        raise ValueError(
            f"no {what} column found (looked for {', '.join(candidates)}); pass {what}_column=. "
            f"Available columns: {columns}"
        )
    return None


def _image_values(column: pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(column.type):
        # flatten() (unlike .field()) folds the struct's own nulls into the child.
        column = column.flatten()[column.type.get_field_index("bytes")]
    return column.to_pylist()


def _caption_values(column: pa.Array) -> list[bytes | None]:
    # Viewing strings as binary is zero-copy and skips UTF-8 decoding: the bytes are passed on as stored.
    if pa.types.is_string(column.type):
        column = column.view(pa.binary())
    elif pa.types.is_large_string(column.type):
        column = column.view(pa.large_binary())
    return column.to_pylist()


_SKIP = object()  # marks values left out of `meta` (bytes)


def _json_value(value: Any) -> Any:
    """A metadata value as JSON: bytes left out, non-finite floats null, dates and decimals as strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _SKIP
    if isinstance(value, dict):
        items = ((str(k), _json_value(v)) for k, v in value.items())
        return {k: v for k, v in items if v is not _SKIP}
    if isinstance(value, (list, tuple)):
        return [v for v in map(_json_value, value) if v is not _SKIP]
    if hasattr(value, "isoformat"):  # datetime, date, time
        return value.isoformat()
    return str(value)  # Decimal, timedelta, ...


def _meta_values(column: pa.Array) -> list[Any]:
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        # A string column holding invalid UTF-8 (Arrow does not validate on read): keep what can be read.
        binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        return [None if v is None else v.decode("utf-8", "replace") for v in column.view(binary).to_pylist()]


def _parquet_batch_rows(
    shard: Shard, batch: pa.RecordBatch, first_index: int, image_col: str, caption_col: str | None, meta_cols
) -> Iterator[dict]:
    images = _image_values(batch.column(image_col))
    captions = _caption_values(batch.column(caption_col)) if caption_col else [None] * batch.num_rows
    metas = {name: _meta_values(batch.column(name)) for name in meta_cols}
    for i in range(batch.num_rows):
        meta = {name: _json_value(values[i]) for name, values in metas.items()}
        meta = {k: v for k, v in meta.items() if v is not _SKIP}
        image = images[i]
        yield _row(
            f"{shard.shard_id}#{first_index + i}",
            shard.path,
            image=image,
            caption=captions[i],
            meta=json.dumps(meta, sort_keys=True),
            reason=None if image is not None else "image_missing",
            detail=None if image is not None else f"null image in column {image_col!r}",
        )


def read_parquet_shard(
    shard: Shard,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    storage_options: dict | None = None,
) -> Iterator[dict]:
    """Yield one row per parquet row, row group by row group, in batches (memory bounded by a row group).

    Raises ValueError when the image column (or an override) cannot be found: that is configuration, not data.
    On a corrupt or unreadable file yields the rows read so far, then one shard_error row.
    """
    fs, path = fsspec.core.url_to_fs(shard.path, **(storage_options or {}))
    try:
        f = fs.open(path, "rb")
    except _SHARD_ERRORS as e:
        yield _shard_error_row(shard, e, 0)
        return
    with f:
        try:
            parquet = pq.ParquetFile(f)
        except _SHARD_ERRORS as e:
            yield _shard_error_row(shard, e, 0)
            return
        schema = parquet.schema_arrow
        image_col = _pick_column(schema, image_column, IMAGE_COLUMNS, _is_image_type, "image", required=True)
        caption_col = _pick_column(schema, caption_column, CAPTION_COLUMNS, _is_text_type, "caption", required=False)
        # Binary columns other than the image are dropped up front: bytes have no JSON form.
        meta_cols = [
            n for n in schema.names if n not in (image_col, caption_col) and not _is_binary_type(schema.field(n).type)
        ]
        emitted = 0
        try:
            # One row group at a time: a batch never spans two row groups, so every row group before a corrupt
            # one is emitted in full, and memory stays bounded by one row group.
            for row_group in range(parquet.num_row_groups):
                batches = parquet.iter_batches(
                    batch_size=_PARQUET_BATCH_ROWS, row_groups=[row_group], use_threads=False
                )
                for batch in batches:
                    for row in _parquet_batch_rows(shard, batch, emitted, image_col, caption_col, meta_cols):
                        yield row
                        emitted += 1
        except _SHARD_ERRORS as e:
            yield _shard_error_row(shard, e, emitted)


# ---------------------------------------------------------------------------------------------------------------
# Folders of images
# ---------------------------------------------------------------------------------------------------------------


def _read_optional(fs, path: str | None) -> tuple[bytes | None, str | None]:
    """(bytes, None), (None, None) when there is no such file, or (None, why) when it cannot be read."""
    if path is None:
        return None, None
    try:
        return fs.cat_file(path), None
    except _SHARD_ERRORS as e:
        return None, f"cannot read {posixpath.basename(path)}: {type(e).__name__}: {e}"


def read_folder_shard(shard: Shard, *, storage_options: dict | None = None) -> Iterator[dict]:
    """Yield one row per image file directly inside the shard's directory, sorted by name.

    Sidecars share the image's stem: `a.txt` is the caption of `a.jpg`, `a.json` its metadata (same rules as in
    tars). Sidecars without an image are not samples. An image that cannot be read is an image_missing row; a
    directory that cannot be listed is a shard_error row.
    """
    fs, path = fsspec.core.url_to_fs(shard.path, **(storage_options or {}))
    try:
        entries = fs.ls(path, detail=True)
    except _SHARD_ERRORS as e:
        yield _shard_error_row(shard, e, 0)
        return
    # fsspec lists a symlink it cannot read as a file (a dangling one, or one to a directory) as type "other", and
    # expand_inputs counts it as an image: keep it, so that reading it fails into an image_missing row.
    files = {
        posixpath.basename(e["name"].rstrip("/")): e["name"]
        for e in entries
        if e.get("type") == "file" or e.get("islink")
    }
    for name in sorted(files):
        if name.startswith(".") or not _is_image(name):
            continue
        stem = name.rsplit(".", 1)[0]
        image, image_error = _read_optional(fs, files[name])
        caption, caption_error = _read_optional(fs, files.get(stem + ".txt"))
        meta_bytes, meta_error = _read_optional(fs, files.get(stem + ".json"))
        meta, meta_detail = ("{}", None) if meta_bytes is None else _parse_json_meta(meta_bytes)
        yield _row(
            name if shard.shard_id == "." else f"{shard.shard_id}/{name}",
            shard.path,
            image=image,
            caption=caption,
            meta=meta,
            reason=None if image is not None else "image_missing",
            detail=_join_details(image_error, caption_error, meta_error, meta_detail),
        )


# ---------------------------------------------------------------------------------------------------------------
# LLaVA annotations (JSON array or JSON Lines) and an image root
# ---------------------------------------------------------------------------------------------------------------


class AnnotationError(ValueError):
    """An annotation file stops being a JSON array or JSON Lines file (a shard fault, not a sample's)."""


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _detect_layout(f) -> Literal["array", "lines"]:
    """ "array" when the file's first character that is not whitespace (or a UTF-8 BOM) is "[", else "lines";
    the file is left at its start. AnnotationError for a file with nothing but whitespace."""
    first = True
    while True:
        chunk = f.read(65536)
        if not chunk:
            raise AnnotationError("the file is empty")
        if first and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8) :]
        first = False
        rest = chunk.lstrip(b" \t\r\n")
        if rest:
            f.seek(0)
            return "array" if rest.startswith(b"[") else "lines"


class _ArrayEntries:
    """The elements of a JSON array, read forward in chunks: memory bounded by one chunk and one element.

    Iterating gives (byte offset, value) per element from byte `offset`: 0 (the file's start, "[" first) or the
    offset of an element found by an earlier pass. Raises AnnotationError where the file stops being a JSON array:
    invalid JSON, a missing "," or "]" (a file cut between two elements), data after the "]".
    """

    def __init__(self, f, offset: int = 0):
        self.f, self.start = f, offset
        if offset:
            f.seek(offset)
        self.text, self.pos, self.byte, self.eof = "", 0, offset, False  # self.byte: the offset of text[pos]
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.json = json.JSONDecoder(parse_constant=_nonfinite_to_none)

    def _more(self, want: int = 0) -> bool:
        """Read a chunk (or `want` bytes) more, dropping what was consumed; False when the file had ended."""
        if self.eof:
            return False
        data = self.f.read(max(_JSON_CHUNK, want))
        try:
            text = self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise AnnotationError(f"not UTF-8 after byte {self.byte}: {e.reason}") from None
        self.text, self.pos, self.eof = self.text[self.pos :] + text, 0, not data
        return True

    def _advance(self, to: int) -> None:
        self.byte += len(self.text[self.pos : to].encode("utf-8"))
        self.pos = to

    def _peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file); the whitespace is consumed."""
        while True:
            self._advance(_JSON_WS.match(self.text, self.pos).end())
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._more():
                return ""

    def _value(self) -> tuple[int, Any]:
        while True:
            try:
                value, end = self.json.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as e:
                # An element cut by the end of the text fails near its end ("\\u12" of an escape), or as an unterminated
                # string (reported where the string starts): before the end of the file, read more and parse again.
                margin = 0 if self.eof else 8
                cut = e.pos >= len(self.text) - margin or e.msg.startswith("Unterminated string")
                pending = len(self.text) - self.pos
                if cut and not self.eof and pending <= _MAX_ENTRY_BYTES:
                    self._more(pending)
                    continue
                if cut and not self.eof:
                    raise AnnotationError(
                        f"the element at byte {self.byte} is over {_MAX_ENTRY_BYTES >> 20} MiB or not valid JSON"
                    ) from None
                if cut:
                    raise AnnotationError(
                        f"the file ends inside the element at byte {self.byte} (cut short?)"
                    ) from None
                where = self.byte + len(self.text[self.pos : e.pos].encode("utf-8"))
                raise AnnotationError(f"invalid JSON at byte {where}: {e.msg}") from None
            except RecursionError:
                raise AnnotationError(f"the element at byte {self.byte} is nested too deeply") from None
            if not self.eof and (end == len(self.text) or self.text[end] in "0123456789.eE+-"):
                self._more()  # a number may go on in the next chunk ("1" of "1.5")
                continue
            offset = self.byte
            self._advance(end)
            return offset, value

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if self.start == 0:
            c = self._peek()
            if c == "\ufeff":  # a UTF-8 byte order mark
                self._advance(self.pos + 1)
                c = self._peek()
            if c != "[":
                raise AnnotationError(f"expected a JSON array, found {c!r}" if c else "the file is empty")
            self._advance(self.pos + 1)
            if self._peek() == "]":
                self._advance(self.pos + 1)
                self._end()
                return
        while True:
            if not self._peek():
                raise AnnotationError(f"the file ends at byte {self.byte} inside the array (cut short?)")
            yield self._value()
            c = self._peek()
            if c == ",":
                self._advance(self.pos + 1)
            elif c == "]":
                self._advance(self.pos + 1)
                self._end()
                return
            elif not c:
                raise AnnotationError(f"the array has no closing ']': the file ends at byte {self.byte} (cut short?)")
            else:
                raise AnnotationError(f"expected ',' or ']' at byte {self.byte}, found {c!r}")

    def _end(self) -> None:
        c = self._peek()
        if c:
            raise AnnotationError(f"data after the array's closing ']' at byte {self.byte}: {c!r}")


def _line_entries(f, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of each line that is not blank, from byte `offset` (a line start), read in chunks."""
    if offset:
        f.seek(offset)
    carry, at = b"", offset  # at: the offset of carry[0]
    while True:
        data = f.read(max(_JSON_CHUNK, len(carry)))
        if not data:
            break
        buf, start = carry + data, 0
        while (end := buf.find(b"\n", start)) >= 0:
            line = buf[start:end]
            if line and not line.isspace():
                yield at + start, line
            start = end + 1
        carry, at = buf[start:], at + start
        if len(carry) > _MAX_ENTRY_BYTES:
            raise AnnotationError(f"the line at byte {at} is over {_MAX_ENTRY_BYTES >> 20} MiB")
    if carry and not carry.isspace():
        yield at, carry


@dataclass(frozen=True)
class _NotJSON:
    """A JSON Lines line that does not parse: a bad entry (the next line is read), not a shard fault."""

    why: str


def _parse_line(line: bytes, *, first: bool) -> Any:
    """One JSON Lines entry, or _NotJSON. The file's first entry must parse: a file whose first line is not JSON is
    not JSON Lines at all (an error page saved as .json, binary data) and raises AnnotationError."""
    if first and line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8) :]
    try:
        return json.loads(line, parse_constant=_nonfinite_to_none)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if first:
            raise AnnotationError(f"neither a JSON array nor JSON Lines: the first line is not JSON ({e})") from None
        return _NotJSON(f"{type(e).__name__}: {e}")


def _span_entries(f, span: Span) -> Iterator[tuple[int, Any]]:
    """(entry index in the file, parsed entry or _NotJSON) for the entries of `span`."""
    layout = span.layout or _detect_layout(f)
    if layout == "array":
        values = (value for _, value in _ArrayEntries(f, span.offset))
    else:
        lines = enumerate(line for _, line in _line_entries(f, span.offset))
        values = (_parse_line(line, first=span.first == k == 0) for k, line in lines)
    yield from zip(itertools.count(span.first), itertools.islice(values, span.count))


def _llava_shards(fs, path: str, root: str, per_shard: int) -> list[Shard]:
    """The shards of one annotation file: ranges of `per_shard` entries, found by one streaming pass over the file
    (JSON Lines: its lines; a JSON array: its parsed elements). One range: the shard_id is the file's.

    A file that cannot be read or parsed to its end still gets shards: those of the ranges before the fault, then
    one from there to the end ("file#first-"), whose reader meets the fault again and records it (shard_error).
    """
    file_id, full = _relative(path, root), _full_path(fs, path)
    starts: list[tuple[int, int]] = []  # (first entry, byte offset) of each range
    layout, n, complete = None, 0, False
    try:
        with fs.open(path, "rb") as f:
            layout = _detect_layout(f)
            entries = _ArrayEntries(f) if layout == "array" else _line_entries(f)
            for offset, entry in entries:
                if n == 0 and layout == "lines":
                    _parse_line(entry, first=True)  # raises for a file that is not JSON Lines
                if n % per_shard == 0:
                    starts.append((n, offset))
                n += 1
        complete = True
    except (*_SHARD_ERRORS, AnnotationError):
        pass
    if len(starts) <= 1:
        return [Shard(full, file_id, "llava", Span(layout=layout))]
    shards = []
    for i, (first, offset) in enumerate(starts):
        if i < len(starts) - 1:
            last, count = first + per_shard - 1, per_shard
        else:  # the last range reads to the end of the file, and checks that it ends properly
            last, count = (n - 1 if complete else ""), None
        shards.append(Shard(full, f"{file_id}#{first}-{last}", "llava", Span(first, offset, count, layout)))
    return shards


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _turns_problem(turns: Any) -> str | None:
    """Why `conversations` is not a non-empty list of {from, value} (or {role, content}) turns with string values;
    None when it is. Turn order and roles are checked by the training job's chat template."""
    if turns is None:
        return "no 'conversations'"
    if not isinstance(turns, list):
        return f"'conversations' is {_json_type(turns)}, not a list of turns"
    if not turns:
        return "'conversations' is empty"
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {k} is {_json_type(turn)}, not an object"
        role, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if not isinstance(role, str):
            return f"turn {k} has no 'from' string (got {_json_type(role)})"
        if not isinstance(text, str):
            return f"turn {k} has no 'value' string (got {_json_type(text)})"
    return None


def _sample_id(value: Any) -> str | None:
    """An entry's `id` as a string (integers converted); None when it has no usable one."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _llava_row(shard: Shard, index: int, entry: Any, used: set[str]) -> tuple[dict, str | None]:
    """The row of one annotation entry before its image is read, and the entry's image path (None: text-only, or
    the row is already rejected)."""
    if isinstance(entry, _NotJSON):
        problem, obj = f"not JSON ({entry.why})", {}
    elif not isinstance(entry, dict):
        problem, obj = f"{_json_type(entry)}, not an object", {}
    else:
        problem, obj = _turns_problem(entry.get("conversations")), entry
    sample_id = _sample_id(obj.get("id"))
    key = _unique_key(f"{shard.shard_id}/{sample_id if sample_id is not None else f'#{index}'}", used)
    # `meta` (the output's metadata columns): the entry's fields but its turns, `id` as a string, `image` always
    # present (null when text-only) so that the first output file's columns fit every later one.
    meta = {"image": None, **{k: v for k, v in obj.items() if k != "conversations"}, "id": sample_id}
    row = {**_row(key, shard.path, meta=json.dumps(meta, sort_keys=True)), "conversations": None}
    if problem is not None:
        row.update(reason="conversations_invalid", detail=f"entry {index}: {problem}")
        return row, None
    row["conversations"] = json.dumps(obj["conversations"])  # ASCII: a lone surrogate escape stays valid text
    image = obj.get("image")
    if image is None:
        return row, None
    if not isinstance(image, str) or not image.strip():
        what = "an empty string" if isinstance(image, str) else _json_type(image)
        row.update(reason="image_missing", detail=f"entry {index}: 'image' is {what}, not a path")
        return row, None
    return row, image


def _fetch(fs, path: str) -> tuple[bytes | None, str | None]:
    """(bytes, None), or (None, why not) for a file that is missing or cannot be read."""
    try:
        return fs.cat_file(path), None
    except FileNotFoundError:
        return None, f"image not found: {_full_path(fs, path)}"
    except _SHARD_ERRORS as e:
        return None, f"cannot read image {_full_path(fs, path)}: {type(e).__name__}: {e}"


def read_llava_shard(
    shard: Shard, *, image_root: str | None = None, storage_options: dict | None = None
) -> Iterator[dict]:
    """Yield one row per annotation entry of the shard's span (the whole file without one), in file order.

    `image` paths are relative to `image_root` (path or URI; default: the annotation file's directory) unless
    absolute (os.path.join's rule, as LLaVA joins them). Images are read a few entries at a time by a few threads.
    A file that is missing, unreadable, cut short or not JSON yields the rows read so far, then one shard_error row.
    """
    options = storage_options or {}
    fs, path = fsspec.core.url_to_fs(shard.path, **options)
    root = image_root if image_root is not None else posixpath.dirname(shard.path)
    root_fs, root_path = fsspec.core.url_to_fs(root, **options)
    root_path = _strip_trailing_slash(root_path)
    span = shard.span or Span()
    used: set[str] = set()
    emitted = 0
    try:
        f = fs.open(path, "rb")
    except _SHARD_ERRORS as e:
        yield {**_shard_error_row(shard, e, 0), "conversations": None}
        return
    with f, ThreadPoolExecutor(_IMAGE_THREADS) as pool:
        entries = _span_entries(f, span)
        fault: BaseException | None = None
        while True:
            batch: list[tuple[int, Any]] = []
            try:
                for item in entries:
                    batch.append(item)
                    if len(batch) == _IMAGE_BATCH:
                        break
            except (*_SHARD_ERRORS, AnnotationError) as e:
                fault = e
            rows = [_llava_row(shard, index, entry, used) for index, entry in batch]
            paths = sorted({image for _, image in rows if image is not None})
            full = [posixpath.join(root_path, image) for image in paths]  # an absolute `image` stays as it is
            fetched = dict(zip(paths, pool.map(lambda p: _fetch(root_fs, p), full)))
            for row, image in rows:
                if image is not None:
                    row["image"], error = fetched[image]
                    if error is not None:
                        row.update(reason="image_missing", detail=error)
                yield row
                emitted += 1
            if fault is not None:
                yield {**_shard_error_row(shard, fault, emitted), "conversations": None}
                return
            if len(batch) < _IMAGE_BATCH:
                return
