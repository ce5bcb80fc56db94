"""What every adapter returns (`VideoRecord`, `Rejected`), the errors it raises, and the small helpers
they share (sample keys, file listing, reading annotation files with errors that name the file)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from pipelines.data import storage
from pipelines.data.shards import QuarantineEntry

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val", "test")
# Split spellings found in real releases (Kinetics says "validate", SSv2 "validation").
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "validate": "val",
                 "validation": "val", "test": "test", "testing": "test"}
MEDIA = ("video", "image")


class SourceError(ValueError):
    """The source itself (not one video) cannot be read; the message names it and what to do."""


@dataclass(frozen=True)
class VideoRecord:
    """One future sample. Field by field:

    - `label`: the class of a single-label record; "" for a multi-label record (AVA), see `labels`.
    - `labels`: every class name the record carries. Filled in as `(label,)` when `label` is set, so
      consumers can always read `labels`; a record with `label` set must not list other labels.
    - `start_s`/`end_s`: the time range of the source to keep (None: the whole file).
    - `size`: bytes of source this record stands for, used to plan shard sizes: the file size, or for
      a time segment of a longer file (AVA) an estimate of the segment's share of it.
    - `media`: "video" or "image" (ImageNet-style folders).
    - `extra`: adapter-specific annotations, JSON-safe (str keys, lists, numbers), e.g. AVA keyframes.
      It is left out of the hash (a dict is not hashable) but not out of equality.
    - `path`: the file's path under the source root ("/"-separated). `source` says where to read the
      file and nothing else: what is written (the sample's `source` field, shard order, the split) is
      derived from `path` and `key`, so a dataset does not change when its raw files move. Adapters
      always set it; a record made without it falls back to `source` (see `dataset_path`).
    """

    key: str
    source: str  # local path or s3:// URI
    label: str
    split: str = ""
    start_s: float | None = None
    end_s: float | None = None
    size: int = 0
    labels: tuple[str, ...] = ()
    media: str = "video"
    extra: dict[str, Any] = field(default_factory=dict, hash=False)
    path: str = ""

    def __post_init__(self) -> None:
        # Records also come back from JSON (lists, not tuples): normalise so equality holds after a round trip.
        labels = tuple(self.labels) if self.labels else ((self.label,) if self.label else ())
        if self.label and labels != (self.label,):
            raise ValueError(f"record {self.key}: label {self.label!r} with labels {labels}; "
                             "a multi-label record sets label='' and lists its classes in labels")
        if self.media not in MEDIA:
            raise ValueError(f"record {self.key}: media {self.media!r} is not one of {MEDIA}")
        object.__setattr__(self, "labels", labels)


# An input an adapter can already tell is unusable: it becomes one line of quarantine.jsonl.
Rejected = QuarantineEntry


def _safe_key(readable: str, identity: str) -> str:
    """A WebDataset-safe key: [A-Za-z0-9_-] only (no dots: WebDataset splits the key from the extension
    at the first dot), plus a short hash of the full identity so that identities that sanitise to the
    same string stay distinct."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", readable).strip("_")[-80:] or "video"
    digest = hashlib.sha1(identity.encode("utf-8")).hexdigest()[:8]
    return f"{clean}-{digest}"


def sample_key(relative_path: str) -> str:
    """The key of a video known by its path under the source root (folder and path,label CSV sources):
    the path without its extension, made safe, plus a hash of the whole path (duplicate names in
    different folders stay distinct)."""
    return _safe_key(PurePosixPath(relative_path).with_suffix("").as_posix(), relative_path)


def annotation_key(identity: str) -> str:
    """The key of a sample known by its annotation's own id (Kinetics youtube_id + times, SSv2 id, AVA
    video_id + time range): the same whatever folder layout the videos were downloaded into."""
    return _safe_key(identity, identity)


def dataset_path(record: VideoRecord) -> str:
    """The record's file as named inside the dataset (see `VideoRecord.path`)."""
    return record.path or record.source


def files_under(root: str) -> dict[str, int]:
    """relative path -> size of every file under root (local or s3://)."""
    base = root.rstrip("/") + "/"
    found = {}
    for uri, size in storage.list_files(root):
        rel = uri.removeprefix(base)
        found[rel] = size
    return found


def video_files_under(root: str, what: str) -> dict[str, int]:
    """`files_under(root)`, failing with a SourceError when there is nothing there: an empty or absent
    video folder is a configuration mistake, not thousands of individually missing videos."""
    files = files_under(root)
    if not files:
        raise SourceError(f"video folder {root} is empty or does not exist; pass the folder holding {what} as root")
    return files


def by_name(files: dict[str, int]) -> dict[str, list[str]]:
    """file name -> relative paths having that name, for adapters that find files anywhere under a root."""
    index: dict[str, list[str]] = {}
    for rel in sorted(files):
        index.setdefault(PurePosixPath(rel).name, []).append(rel)
    return index


def inside(rel: str) -> bool:
    """A relative path that stays under its root (no absolute paths, `..`, or `scheme:` prefixes)."""
    parts = PurePosixPath(rel).parts
    return not (rel.startswith("/") or ".." in parts or (parts and ":" in parts[0]))


def parent(uri: str) -> str:
    """The folder holding a file (local or s3://)."""
    if storage.is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return str(storage.local_path(uri).parent)


def is_folder(uri: str) -> bool:
    """A local directory, or an s3:// prefix that is not itself an object."""
    if storage.is_s3(uri):
        return not storage.exists(uri)
    return storage.local_path(uri).is_dir()


def read_text(uri: str, what: str) -> str:
    """An annotation file's text; a missing or non-UTF-8 file is a SourceError naming it."""
    if not storage.exists(uri):
        raise SourceError(f"{what} {uri} does not exist")
    try:
        return storage.read_bytes(uri).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{what} {uri} is not UTF-8 text ({exc})") from None


def read_json(uri: str, what: str) -> Any:
    text = read_text(uri, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{what} {uri} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def split_name(value: str) -> str | None:
    """The canonical split (train/val/test) for a spelling found in annotations or folder names."""
    return SPLIT_ALIASES.get(value.strip().lower())
