"""Folder-per-class layouts: videos (`<label>/<video>`) and ImageNet-style images (`<wnid>/<image>`)."""

from __future__ import annotations

from pathlib import PurePosixPath

from pipelines.data import storage
from pipelines.data.sources.base import (
    IMAGE_EXTENSIONS,
    SPLIT_ALIASES,
    VIDEO_EXTENSIONS,
    Rejected,
    SourceError,
    VideoRecord,
    files_under,
    sample_key,
    split_name,
)


def _class_folders(root: str, extensions: tuple[str, ...], media: str) -> tuple[list[VideoRecord], list[Rejected]]:
    """`root/<label>/<file>`, or `root/<split>/<label>/<file>` when every top folder is a split name
    (train, val/validate/validation, test). Files with other extensions (READMEs, lists) are ignored;
    a media file at the wrong depth is rejected, since it has no class folder."""
    files = files_under(root)
    if not files:
        raise SourceError(f"source folder {root} is empty or does not exist; point `source` at a folder of <label>/<file> files")
    top = {PurePosixPath(rel).parts[0] for rel in files if len(PurePosixPath(rel).parts) > 1}
    has_splits = bool(top) and top <= set(SPLIT_ALIASES)
    depth = 3 if has_splits else 2
    records, rejected = [], []
    for rel, size in sorted(files.items()):
        if not rel.lower().endswith(extensions):
            continue
        parts = PurePosixPath(rel).parts
        if len(parts) != depth:
            rejected.append(Rejected(storage.join(root, rel), f"not in a <label>/ folder (expected depth {depth})"))
            continue
        split, label = (split_name(parts[0]) or "", parts[1]) if has_splits else ("", parts[0])
        records.append(VideoRecord(sample_key(rel), storage.join(root, rel), label, split, size=size, media=media,
                                   path=rel))
    return records, rejected


def folder_per_class(root: str) -> tuple[list[VideoRecord], list[Rejected]]:
    """Videos in `root/<label>/<video>` or `root/<split>/<label>/<video>` (the split layout is detected
    from the top folders)."""
    return _class_folders(root, VIDEO_EXTENSIONS, "video")


def image_folder(root: str) -> tuple[list[VideoRecord], list[Rejected]]:
    """ImageNet-style image folders for the image MViT: `root/train/<wnid>/*.JPEG`,
    `root/val/<wnid>/*.JPEG` (or `root/<wnid>/*` without splits); .jpeg/.jpg/.png in any case.
    ImageNet's raw `val/` folder is flat (labels in a separate file): its images are rejected as
    "not in a <label>/ folder" until they are sorted into class folders. Records have media="image"."""
    return _class_folders(root, IMAGE_EXTENSIONS, "image")
