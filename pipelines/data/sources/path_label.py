"""A `path,label[,split]` CSV: the simplest way to describe any dataset."""

from __future__ import annotations

import csv
import io

from pipelines.data import storage
from pipelines.data.sources.base import (
    SPLITS,
    Rejected,
    SourceError,
    VideoRecord,
    files_under,
    inside,
    parent,
    read_text,
    sample_key,
)


def path_label_csv(csv_uri: str, root: str | None = None) -> tuple[list[VideoRecord], list[Rejected]]:
    """A `path,label[,split]` CSV; relative paths are resolved against `root` (default: the CSV's folder)."""
    text = read_text(csv_uri, "annotation file")
    reader = csv.DictReader(io.StringIO(text))
    missing = {"path", "label"} - set(reader.fieldnames or [])
    if missing:
        raise SourceError(f"{csv_uri}: missing column(s) {sorted(missing)}; expected a header 'path,label[,split]'")
    if root is None:
        root = parent(csv_uri)
    files = files_under(root)
    records, rejected = [], []
    for line, row in enumerate(reader, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        split = (row.get("split") or "").strip()
        where = f"{csv_uri}:{line}"
        if not rel or not label:
            rejected.append(Rejected(where, "row without a path or label"))
        elif not inside(rel):
            rejected.append(Rejected(rel, f"path points outside the source root {root} ({where})"))
        elif rel not in files:
            rejected.append(Rejected(storage.join(root, rel), f"missing file ({where})"))
        elif split and split not in SPLITS:
            rejected.append(Rejected(storage.join(root, rel), f"unknown split '{split}' ({where}); use one of {SPLITS}"))
        else:
            records.append(VideoRecord(sample_key(rel), storage.join(root, rel), label, split, size=files[rel], path=rel))
    return records, rejected
