"""Dataset adapters: annotations -> `VideoRecord`s (source, label, split, optional time range).

An adapter never opens a video; it only says what should become a sample. Inputs it can already tell
are unusable (a row naming a missing file, an unknown label, a path outside the source root) become
`Rejected` records so that the job can account for every input in quarantine.jsonl.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from pipelines.data import storage

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """The source itself (not one video) cannot be read; the message names it and what to do."""


@dataclass(frozen=True)
class VideoRecord:
    key: str
    source: str  # local path or s3:// URI
    label: str
    split: str = ""
    start_s: float | None = None
    end_s: float | None = None
    size: int = 0


@dataclass(frozen=True)
class Rejected:
    source: str
    reason: str


def sample_key(relative_path: str) -> str:
    """A WebDataset-safe key from a file name: [A-Za-z0-9_-] only (no dots: WebDataset splits the key
    from the extension at the first dot), plus a short hash of the full path so that names that
    sanitise to the same string (or duplicate ids in different folders) stay distinct."""
    stem = PurePosixPath(relative_path).with_suffix("").as_posix()
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[-80:] or "video"
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:8]
    return f"{clean}-{digest}"


def hashed_split(key: str, val_fraction: float) -> str:
    """Deterministic split for sources that carry none: stable across runs and machines."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def _files_under(root: str) -> dict[str, int]:
    """relative path -> size of every file under root (local or s3://)."""
    base = root.rstrip("/") + "/"
    found = {}
    for uri, size in storage.list_files(root):
        rel = uri[len(base):] if uri.startswith(base) else uri
        found[rel] = size
    return found


def _inside(root: str, rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return not (rel.startswith("/") or ".." in parts or (parts and ":" in parts[0]))


def folder_per_class(root: str) -> tuple[list[VideoRecord], list[Rejected]]:
    """`root/<label>/<video>`; a `root/<split>/<label>/<video>` layout is detected from the top folders."""
    files = _files_under(root)
    if not files:
        raise SourceError(f"source folder {root} is empty or does not exist; point `source` at a folder of <label>/<video> files")
    records, rejected = [], []
    top = {PurePosixPath(rel).parts[0] for rel in files if len(PurePosixPath(rel).parts) > 1}
    has_splits = bool(top) and top <= set(SPLITS)
    for rel, size in sorted(files.items()):
        parts = PurePosixPath(rel).parts
        if not rel.lower().endswith(VIDEO_EXTENSIONS):
            continue
        depth = 3 if has_splits else 2
        if len(parts) != depth:
            rejected.append(Rejected(storage.join(root, rel), f"not in a <label>/ folder (expected depth {depth})"))
            continue
        split, label = (parts[0], parts[1]) if has_splits else ("", parts[0])
        records.append(VideoRecord(sample_key(rel), storage.join(root, rel), label, split, size=size))
    return records, rejected


def path_label_csv(csv_uri: str, root: str | None = None) -> tuple[list[VideoRecord], list[Rejected]]:
    """A `path,label[,split]` CSV; relative paths are resolved against `root` (default: the CSV's folder)."""
    if not storage.exists(csv_uri):
        raise SourceError(f"annotation file {csv_uri} does not exist")
    text = storage.read_bytes(csv_uri).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    missing = {"path", "label"} - set(reader.fieldnames or [])
    if missing:
        raise SourceError(f"{csv_uri}: missing column(s) {sorted(missing)}; expected a header 'path,label[,split]'")
    if root is None:
        root = csv_uri.rsplit("/", 1)[0] if storage.is_s3(csv_uri) else str(storage.local_path(csv_uri).parent)
    files = _files_under(root)
    records, rejected = [], []
    for line, row in enumerate(reader, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        split = (row.get("split") or "").strip()
        where = f"{csv_uri}:{line}"
        if not rel or not label:
            rejected.append(Rejected(where, "row without a path or label"))
        elif not _inside(root, rel):
            rejected.append(Rejected(rel, f"path points outside the source root {root} ({where})"))
        elif rel not in files:
            rejected.append(Rejected(storage.join(root, rel), f"missing file ({where})"))
        elif split and split not in SPLITS:
            rejected.append(Rejected(storage.join(root, rel), f"unknown split '{split}' ({where}); use one of {SPLITS}"))
        else:
            records.append(VideoRecord(sample_key(rel), storage.join(root, rel), label, split, size=files[rel]))
    return records, rejected


def load_records(source: str, source_format: str = "auto", root: str | None = None):
    """Dispatch on `source_format` ('auto' picks csv for a .csv file and folder otherwise)."""
    fmt = source_format
    if fmt == "auto":
        fmt = "csv" if source.lower().endswith(".csv") else "folder"
    if fmt == "csv":
        return path_label_csv(source, root)
    if fmt == "folder":
        if not storage.is_s3(source) and not storage.local_path(source).is_dir():
            raise SourceError(f"source folder {source} does not exist; pass source=<folder or .csv>")
        return folder_per_class(source)
    raise SourceError(f"unknown source_format '{source_format}'; use auto, folder or csv")
