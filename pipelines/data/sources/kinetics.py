"""Kinetics-400/600/700 annotation CSVs: `label,youtube_id,time_start,time_end,split[,is_cc]`."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import PurePosixPath

from pipelines.data import storage
from pipelines.data.sources.base import (
    VIDEO_EXTENSIONS,
    Rejected,
    SourceError,
    VideoRecord,
    annotation_key,
    by_name,
    parent,
    read_text,
    split_name,
    video_files_under,
)

REQUIRED_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # also what keeps a row from naming a path outside the root


def _seconds(value: str) -> int | None:
    """A whole number of seconds (the CSVs hold integers; "14.0" is accepted)."""
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number >= 0 and number == int(number) else None


def _pick(paths: list[str], split: str) -> str:
    """Several files of one name: prefer one inside a folder named after the row's split, then the
    shallowest, then the first by name, so the choice is deterministic."""
    def rank(rel: str) -> tuple:
        in_split = any(split_name(part) == split for part in PurePosixPath(rel).parts[:-1]) if split else False
        return (not in_split, rel.count("/"), rel)
    return min(paths, key=rank)


def kinetics_csv(csv_uri: str, root: str | None = None) -> tuple[list[VideoRecord], list[Rejected]]:
    """One record per CSV row whose video is found under `root` (default: the CSV's folder).

    Files are looked up by name anywhere under root, which covers the common layouts of the releases and
    downloaders: flat (`root/<name>`, e.g. the CVDF tarballs `k400/train/*.mp4`), per split
    (`root/<split>/<name>`, split spelled train/val/validate/test), and per class
    (`root/<split>/<label>/<name>` or `root/<label>/<name>`, however the downloader spelled the label
    folder). Names tried, in this order, with .mp4/.avi/.mkv/.webm/.mov/.m4v:
      - `<youtube_id>_<time_start:06d>_<time_end:06d>.<ext>`: the trimmed clip, used whole;
      - `<youtube_id>.<ext>`: the full untrimmed video; the record then carries start_s/end_s.
    Keys are the row's clip id `<youtube_id>_<time_start:06d>_<time_end:06d>` (made safe), whichever
    file, layout or root holds it. Split values train/validate/test map to train/val/test (a CSV without a split column gives
    split="", which the job fills by hash). Label ids are not decided here: the job maps names to ids.
    Rows with an empty label, a malformed id or times, an unknown split, or no file are rejected with
    `<csv>:<line>` in the reason.
    """
    text = read_text(csv_uri, "Kinetics annotation CSV")
    reader = csv.DictReader(io.StringIO(text))
    reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in REQUIRED_COLUMNS if name not in reader.fieldnames]
    if missing:
        found = ",".join(reader.fieldnames) or "no header"
        raise SourceError(f"{csv_uri}: missing column(s) {missing}; expected a Kinetics header "
                          f"'label,youtube_id,time_start,time_end,split' (found {found})")
    if root is None:
        root = parent(csv_uri)
    files = video_files_under(root, "the Kinetics videos")
    names = by_name(files)
    records, rejected = [], []
    for line, row in enumerate(reader, start=2):
        where = f"{csv_uri}:{line}"
        label = (row.get("label") or "").strip()
        youtube_id = (row.get("youtube_id") or "").strip()
        start, end = _seconds((row.get("time_start") or "").strip()), _seconds((row.get("time_end") or "").strip())
        raw_split = (row.get("split") or "").strip()
        split = split_name(raw_split) if raw_split else ""
        if not label:
            rejected.append(Rejected(where, "row without a label"))
        elif not YOUTUBE_ID.match(youtube_id):
            rejected.append(Rejected(where, f"malformed youtube_id {youtube_id!r} (expected letters, digits, - and _)"))
        elif start is None or end is None or end <= start:
            rejected.append(Rejected(where, f"bad time range {row.get('time_start')!r}..{row.get('time_end')!r} "
                                            "(expected whole seconds, time_start < time_end)"))
        elif split is None:
            rejected.append(Rejected(where, f"unknown split {raw_split!r} (expected train, validate or test)"))
        else:
            clip = f"{youtube_id}_{start:06d}_{end:06d}"
            # The key is the row's clip id, whichever file holds it and wherever: two rows cutting one
            # full video stay two samples, and a re-download in another layout gives the same keys.
            key = annotation_key(clip)
            trimmed = [rel for ext in VIDEO_EXTENSIONS for rel in names.get(clip + ext, [])]
            full = [rel for ext in VIDEO_EXTENSIONS for rel in names.get(youtube_id + ext, [])]
            if trimmed:
                rel = _pick(trimmed, split)
                records.append(VideoRecord(key, storage.join(root, rel), label, split, size=files[rel], path=rel))
            elif full:
                rel = _pick(full, split)
                records.append(VideoRecord(key, storage.join(root, rel), label, split, start_s=float(start),
                                           end_s=float(end), size=files[rel], path=rel))
            else:
                rejected.append(Rejected(storage.join(root, clip + ".mp4"),
                                         f"missing file ({where}): no {clip}.<ext> or {youtube_id}.<ext> under {root}"))
    return records, rejected
