"""Something-Something v2: a labels JSON ({template: id}) and train/validation lists of
{"id", "label", "template", "placeholders"}."""

from __future__ import annotations

import re

from pipelines.data import storage
from pipelines.data.sources.base import (
    VIDEO_EXTENSIONS,
    Rejected,
    SourceError,
    VideoRecord,
    annotation_key,
    by_name,
    is_folder,
    parent,
    read_json,
    video_files_under,
)

LABELS_FILE = "something-something-v2-labels.json"
LIST_FILES = {"train": "something-something-v2-train.json", "val": "something-something-v2-validation.json"}
VIDEO_ID = re.compile(r"^[A-Za-z0-9_-]+$")
# The release ships .webm; a re-encoded copy with another container is taken when no .webm exists.
EXTENSIONS = (".webm",) + tuple(ext for ext in VIDEO_EXTENSIONS if ext != ".webm")


def class_name(template: str) -> str:
    """The class of an entry, spelled as in the labels file: the template without its placeholder
    brackets, stripped the way the official code does it."""
    return template.replace("[", "").replace("]", "")


def ssv2_json(source: str, root: str | None = None) -> tuple[list[VideoRecord], list[Rejected]]:
    """`source` is the folder holding the JSONs, or the path of `something-something-v2-labels.json`
    (the lists are then read from its folder). `root` holds the videos `<id>.webm`, found anywhere under
    it (default: the annotation folder). The train list gives split "train", the validation list "val";
    the test list has no labels and is not read. Both lists are optional, but at least one must exist.

    Each entry's class is its template with the brackets removed; it must be a key of the labels file.
    Keys are the video ids (made safe). Records also carry `extra = {"caption": <the entry's filled-in label>, "placeholders": [...]}`.
    The labels file's ids are the official class ids: pass it to the job as `labels_file` to use them.
    """
    given_folder = is_folder(source)
    folder = source if given_folder else parent(source)
    labels_uri = storage.join(folder, LABELS_FILE) if given_folder else source
    labels = read_json(labels_uri, "Something-Something v2 labels file")
    if not isinstance(labels, dict) or not labels:
        raise SourceError(f"{labels_uri}: expected a JSON object of template -> class id, "
                          'e.g. {"Holding something": "16"}')
    lists = {split: storage.join(folder, name) for split, name in LIST_FILES.items()}
    present = {split: uri for split, uri in lists.items() if storage.exists(uri)}
    if not present:
        raise SourceError(f"no Something-Something v2 list next to {labels_uri}: expected "
                          f"{' and/or '.join(lists.values())}")
    if root is None:
        root = folder
    files = video_files_under(root, "the Something-Something v2 videos (<id>.webm)")
    names = by_name(files)
    records, rejected = [], []
    for split, uri in present.items():
        entries = read_json(uri, "Something-Something v2 list")
        if not isinstance(entries, list):
            raise SourceError(f"{uri}: expected a JSON list of {{\"id\", \"label\", \"template\", \"placeholders\"}} objects")
        for index, entry in enumerate(entries):
            where = f"{uri}[entry {index}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("template"), str):
                rejected.append(Rejected(where, "entry is not an object with a string 'template'"))
                continue
            video_id = str(entry.get("id", "")).strip()
            label = class_name(entry["template"])
            if not VIDEO_ID.match(video_id):
                rejected.append(Rejected(where, f"malformed video id {video_id!r}"))
                continue
            if label not in labels:
                rejected.append(Rejected(where, f"unknown template {entry['template']!r} (not in {labels_uri})"))
                continue
            found = [rel for ext in EXTENSIONS for rel in names.get(video_id + ext, [])]
            if not found:
                rejected.append(Rejected(storage.join(root, video_id + ".webm"), f"missing file ({where})"))
                continue
            rel = min(found, key=lambda r: (r.count("/"), EXTENSIONS.index("." + r.rsplit(".", 1)[1].lower()), r))
            placeholders = entry.get("placeholders")
            placeholders = [str(p) for p in placeholders] if isinstance(placeholders, list) else []
            extra = {"caption": str(entry.get("label", "")), "placeholders": placeholders}
            records.append(VideoRecord(annotation_key(video_id), storage.join(root, rel), label, split, size=files[rel],
                                       extra=extra, path=rel))
    return records, rejected
