"""Dataset adapters: annotations -> `VideoRecord`s (source, label(s), split, optional time range).

An adapter never opens a video; it only says what should become a sample. Inputs it can already tell
are unusable (a row naming a missing file, an unknown label, a path outside the source root) become
`Rejected` records so that the job can account for every input in quarantine.jsonl. A source that
cannot be read at all (missing annotation file, wrong columns, malformed JSON) raises `SourceError`.

source_format  source                                   root (videos)          module
folder         folder of <label>/<video>                -                      folders.py
imagefolder    folder of [<split>/]<wnid>/<image>       -                      folders.py
csv            path,label[,split] CSV                   default: CSV's folder  path_label.py
kinetics       Kinetics-400/600/700 CSV                 default: CSV's folder  kinetics.py
ssv2           folder of the SSv2 JSONs (or labels.json) default: that folder  ssv2.py
ava            folder of the AVA v2.2 CSVs + pbtxt      default: that folder   ava.py
auto           picks one of the above from what `source` is (see `detect_format`)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from pipelines.data import storage
from pipelines.data.sources.ava import ACTION_LIST_FILE, ava, read_action_list
from pipelines.data.sources.ava import CSV_FILES as AVA_CSV_FILES
from pipelines.data.sources.base import (
    IMAGE_EXTENSIONS,
    SPLITS,
    VIDEO_EXTENSIONS,
    Rejected,
    SourceError,
    VideoRecord,
    annotation_key,
    dataset_path,
    is_folder,
    read_text,
    sample_key,
)
from pipelines.data.sources.folders import folder_per_class, image_folder
from pipelines.data.sources.kinetics import REQUIRED_COLUMNS as KINETICS_COLUMNS
from pipelines.data.sources.kinetics import kinetics_csv
from pipelines.data.sources.path_label import path_label_csv
from pipelines.data.sources.ssv2 import LABELS_FILE as SSV2_LABELS_FILE
from pipelines.data.sources.ssv2 import ssv2_json

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "VIDEO_EXTENSIONS",
    "Rejected",
    "SourceError",
    "VideoRecord",
    "annotation_key",
    "ava",
    "dataset_path",
    "detect_format",
    "folder_per_class",
    "image_folder",
    "kinetics_csv",
    "load_records",
    "path_label_csv",
    "read_action_list",
    "sample_key",
    "ssv2_json",
]

# format -> (adapter(source, root, **options), the options it takes)
_ADAPTERS: dict[str, tuple[Callable[..., tuple[list[VideoRecord], list[Rejected]]], tuple[str, ...]]] = {
    "folder": (lambda source, root: folder_per_class(source), ()),
    "imagefolder": (lambda source, root: image_folder(source), ()),
    "csv": (path_label_csv, ()),
    "kinetics": (kinetics_csv, ()),
    "ssv2": (ssv2_json, ()),
    "ava": (ava, ("chunk_s", "context_s", "action_list", "window_s", "proposals")),
}
FORMATS = ("auto", *_ADAPTERS)


def _csv_format(uri: str) -> str:
    name = PurePosixPath(uri).name
    if name in AVA_CSV_FILES.values():
        return "ava"
    header = next(csv.reader(io.StringIO(read_text(uri, "annotation CSV"))), [])
    columns = {column.strip() for column in header}
    if set(KINETICS_COLUMNS) <= columns:
        return "kinetics"
    if {"path", "label"} <= columns:
        return "csv"
    raise SourceError(f"{uri}: cannot tell the CSV format from its header {header}; expected 'path,label[,split]' "
                      f"or Kinetics' '{','.join(KINETICS_COLUMNS)},split' (or set source_format)")


def _folder_format(folder: str) -> str:
    if storage.exists(storage.join(folder, SSV2_LABELS_FILE)):
        return "ssv2"
    if any(storage.exists(storage.join(folder, name)) for name in (ACTION_LIST_FILE, *AVA_CSV_FILES.values())):
        return "ava"
    # The first media file decides between videos and images (listing stops there).
    for uri, _ in storage.list_files(folder):
        suffix = uri.lower().rsplit("/", 1)[-1]
        if suffix.endswith(VIDEO_EXTENSIONS):
            return "folder"
        if suffix.endswith(IMAGE_EXTENSIONS):
            return "imagefolder"
    return "folder"  # which then reports the folder as empty


def detect_format(source: str) -> str:
    """What `auto` means: a .csv -> kinetics (by its header), csv (path,label) or ava (by name); the SSv2
    labels JSON -> ssv2; an AVA .pbtxt -> ava; a folder holding the SSv2 labels JSON -> ssv2; a folder
    holding the AVA action list or CSVs -> ava; any other folder -> folder (videos) or imagefolder
    (images), by the first media file in it."""
    if not storage.is_s3(source) and not storage.local_path(source).exists():
        raise SourceError(f"source {source} does not exist; pass a folder or an annotation file")
    if is_folder(source):
        return _folder_format(source)
    name = PurePosixPath(source).name.lower()
    if name.endswith(".csv"):
        return _csv_format(source)
    if name == SSV2_LABELS_FILE:
        return "ssv2"
    if name.endswith(".pbtxt"):
        return "ava"
    raise SourceError(f"cannot tell the format of {source}; set source_format to one of {', '.join(FORMATS[1:])}")


def load_records(
    source: str, source_format: str = "auto", root: str | None = None, **options: Any
) -> tuple[list[VideoRecord], list[Rejected]]:
    """Records and rejections of `source` read as `source_format` (see the table above). `root` is where
    the videos are for annotation-file formats; `options` go to the adapter (AVA: chunk_s, context_s,
    action_list, window_s, proposals)."""
    if source_format not in FORMATS:
        raise SourceError(f"unknown source_format '{source_format}'; use one of {', '.join(FORMATS)}")
    fmt = detect_format(source) if source_format == "auto" else source_format
    adapter, accepted = _ADAPTERS[fmt]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SourceError(f"source_format '{fmt}' takes no option(s) {unknown}; it takes {list(accepted) or 'none'}")
    if fmt in ("folder", "imagefolder") and not is_folder(source):
        raise SourceError(f"source folder {source} does not exist or is a file; source_format '{fmt}' needs a folder")
    return adapter(source, root, **options)
