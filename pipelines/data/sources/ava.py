"""AVA v2.2 (spatio-temporal action detection): `ava_{train,val}_v2.2.csv` rows
`video_id,timestamp,x1,y1,x2,y2,action_id,person_id` (boxes normalised to [0, 1]) and the action list
`ava_action_list_v2.2.pbtxt`. Videos are the 15-minute movie excerpts `<video_id>.<mp4|mkv|webm>`
annotated at 1 Hz keyframes, seconds 902..1798 of each movie. `window_s` moves that annotated window
(synthetic sets in the same layout use short videos annotated from second 0, see pipelines/data/synthetic_ava.py)."""

from __future__ import annotations

import csv
import io
import re

from pipelines.data import storage
from pipelines.data.sources.base import (
    Rejected,
    SourceError,
    VideoRecord,
    annotation_key,
    by_name,
    is_folder,
    parent,
    read_text,
    video_files_under,
)

ACTION_LIST_FILE = "ava_action_list_v2.2.pbtxt"
CSV_FILES = {"train": "ava_train_v2.2.csv", "val": "ava_val_v2.2.csv"}
ANNOTATED_START_S, ANNOTATED_END_S = 900, 1800  # the annotated window of every movie
EXTENSIONS = (".mp4", ".mkv", ".webm")
VIDEO_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # YouTube ids; also keeps a row from naming a path outside root
COLUMNS = "video_id,timestamp,x1,y1,x2,y2,action_id,person_id"

# Text-format protobuf: no library parses it without the message's .proto (the TF object-detection
# StringIntLabelMap), which nothing here depends on, so this file's two-level format is tokenised by hand.
_TOKEN = re.compile(r'\s+|#[^\n]*|"(?P<string>(?:[^"\\\n]|\\.)*)"|(?P<punct>[{}:])|(?P<word>[^\s{}:"#]+)')


def _tokens(text: str, uri: str) -> list[tuple[str, str, int]]:
    """(kind, text, line) tokens; kind is "value" (a word or an unquoted string), "{", "}" or ":"."""
    tokens, pos, line = [], 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise SourceError(f"{uri}:{line}: cannot parse {text[pos:pos + 20]!r}; "
                              'expected label { name: "..." label_id: N } blocks')
        start, pos = pos, match.end()
        if match.group("string") is not None:
            tokens.append(("value", re.sub(r"\\(.)", r"\1", match.group("string")), line))
        elif match.group("punct"):
            tokens.append((match.group("punct"), match.group("punct"), line))
        elif match.group("word"):
            tokens.append(("value", match.group("word"), line))
        line += text.count("\n", start, pos)
    return tokens


def parse_action_list(text: str, uri: str) -> dict[int, str]:
    """action id -> name from `label { name: "..." label_id: N ... }` blocks (the AVA files) or
    `item { name: "..." id: N }` blocks (the ActivityNet-2019 60-class list uses either spelling)."""
    tokens = _tokens(text, uri)
    actions: dict[int, str] = {}
    i = 0

    def expect(kind: str) -> str:
        nonlocal i
        if i >= len(tokens) or tokens[i][0] != kind:
            found, line = (tokens[i][1], tokens[i][2]) if i < len(tokens) else ("end of file", tokens[-1][2] if tokens else 1)
            raise SourceError(f"{uri}:{line}: expected {kind!r}, found {found!r}; "
                              'expected label { name: "..." label_id: N } blocks')
        i += 1
        return tokens[i - 1][1]

    while i < len(tokens):
        block = expect("value")
        if i < len(tokens) and tokens[i][0] == ":":
            i += 1
        expect("{")
        fields: dict[str, str] = {}
        while i < len(tokens) and tokens[i][0] != "}":
            name = expect("value")
            expect(":")
            fields[name] = expect("value")
        expect("}")
        if block not in ("label", "item"):
            continue
        raw_id, name = fields.get("label_id", fields.get("id")), fields.get("name")
        if name is None or raw_id is None or not raw_id.isdigit():
            raise SourceError(f"{uri}: block {fields} needs a name and an integer label_id")
        if int(raw_id) in actions or name in actions.values():
            raise SourceError(f"{uri}: action {name!r} / id {raw_id} is listed twice")
        actions[int(raw_id)] = name
    if not actions:
        raise SourceError(f"{uri}: no label blocks; expected label {{ name: \"...\" label_id: N }}")
    return actions


def read_action_list(annotations: str, action_list: str = ACTION_LIST_FILE) -> dict[int, str]:
    """The official action id -> name map of an annotations folder (the AVA head and evaluation use
    these ids; the job's label_map of names is only for statistics and ordering)."""
    uri = storage.join(annotations, action_list)
    return parse_action_list(read_text(uri, "AVA action list"), uri)


def _row(
    row: list[str], actions: dict[int, str], window_s: tuple[int, int]
) -> tuple[str, int, list[float], int, int] | str:
    """(video_id, timestamp, box, action_id, person_id), or the reason the row is unusable."""
    if len(row) not in (7, 8):
        return f"expected {COLUMNS} ({len(row)} columns)"
    video_id = row[0].strip()
    if not VIDEO_ID.match(video_id):
        return f"malformed video_id {video_id!r}"
    try:
        timestamp = int(row[1])
        box = [float(v) for v in row[2:6]]
        action_id = int(row[6])
        person_id = int(row[7]) if len(row) == 8 else -1
    except ValueError as exc:
        return f"non-numeric field ({exc})"
    if not window_s[0] <= timestamp <= window_s[1]:
        return f"timestamp {timestamp} outside AVA's annotated {window_s[0]}..{window_s[1]} s"
    x1, y1, x2, y2 = box
    if not (0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1):
        return f"box {box} is not normalised x1<=x2, y1<=y2 in [0, 1]"
    if action_id not in actions:
        return f"unknown action_id {action_id} (not in the action list)"
    return video_id, timestamp, box, action_id, person_id


def _window(window_s) -> tuple[int, int]:
    """(start, end) whole seconds of the annotated window; anything else is a SourceError."""
    try:
        start, end = window_s
    except (TypeError, ValueError):
        raise SourceError(f"AVA option window_s must be [start, end] seconds, got {window_s!r}") from None
    if not (float(start).is_integer() and float(end).is_integer() and 0 <= start < end):
        raise SourceError(f"AVA option window_s must be whole seconds 0 <= start < end, got {window_s!r}")
    return int(start), int(end)


def ava(
    annotations: str,
    root: str | None = None,
    *,
    chunk_s: float = 60.0,
    context_s: float = 1.5,
    action_list: str = ACTION_LIST_FILE,
    window_s: tuple[int, int] = (ANNOTATED_START_S, ANNOTATED_END_S),
) -> tuple[list[VideoRecord], list[Rejected]]:
    """One record per (video, annotated chunk): AVA's window 900..1800 s (`window_s`: whole movie seconds
    [start, end]) is cut into chunks of `chunk_s` seconds (900 gives one record per movie); chunks without
    any annotated keyframe make no record; keyframes outside the window are rejected.
    A record's time range is its chunk widened by `context_s` on both sides, so that a clip centred on
    a keyframe near a chunk edge (e.g. 64 frames at 30 fps: +-1.07 s) still lies inside the sample.

    `annotations` is the folder holding the CSVs and the action list (a file path means its folder);
    `root` holds the videos, found by name anywhere under it (default: the annotations folder).
    `ava_train_v2.2.csv` gives split "train", `ava_val_v2.2.csv` "val"; at least one must exist.
    The excluded-timestamps CSVs only matter to evaluation and are not read here.

    Record fields: key = `<video_id>_<chunk start>-<chunk end>s` (made safe); label="" (multi-label); labels = sorted names of the actions annotated in the chunk;
    extra = {"video_id": id, "keyframes": [{"t": movie second, "boxes": [[x1, y1, x2, y2], ...],
    "actions": [[official action ids of that box], ...], "person_ids": [...]}, ...]} (sorted by t; one
    box per person, carrying all its actions). Keyframe times are movie seconds: the keyframe is at
    `t - start_s` in the trimmed sample. Bad rows are rejected as `<csv>:<line>`; a video with no file
    is rejected once, naming how many chunks it lost.
    """
    if not chunk_s > 0 or not context_s >= 0:
        raise SourceError(f"AVA options: chunk_s must be > 0 and context_s >= 0 (got {chunk_s}, {context_s})")
    window_start, window_end = _window(window_s)
    folder = annotations if is_folder(annotations) else parent(annotations)
    actions = read_action_list(folder, action_list)
    present = {split: storage.join(folder, name) for split, name in CSV_FILES.items()
               if storage.exists(storage.join(folder, name))}
    if not present:
        raise SourceError(f"no AVA annotation CSV in {folder}: expected {' and/or '.join(CSV_FILES.values())}")
    if root is None:
        root = folder
    last_chunk = int((window_end - window_start - 1e-9) // chunk_s)

    rejected: list[Rejected] = []
    # (split, video_id) -> chunk -> timestamp -> (person_id, box) -> action ids
    videos: dict[tuple[str, str], dict[int, dict[int, dict[tuple, set[int]]]]] = {}
    for split, uri in present.items():
        text = read_text(uri, "AVA annotation CSV")
        for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not row or not "".join(row).strip():
                continue
            parsed = _row(row, actions, (window_start, window_end))
            if isinstance(parsed, str):
                rejected.append(Rejected(f"{uri}:{line}", parsed))
                continue
            video_id, timestamp, box, action_id, person_id = parsed
            chunk = min(int((timestamp - window_start) // chunk_s), last_chunk)
            boxes = videos.setdefault((split, video_id), {}).setdefault(chunk, {}).setdefault(timestamp, {})
            boxes.setdefault((person_id, tuple(box)), set()).add(action_id)

    files = video_files_under(root, "the AVA videos (<video_id>.mp4/.mkv/.webm)")
    names = by_name(files)
    records: list[VideoRecord] = []
    for (split, video_id), chunks in sorted(videos.items()):
        found = [rel for ext in EXTENSIONS for rel in names.get(video_id + ext, [])]
        if not found:
            rejected.append(Rejected(storage.join(root, video_id), f"missing file: no {video_id}.mp4/.mkv/.webm "
                                     f"under {root} ({len(chunks)} annotated chunks of {present[split]})"))
            continue
        rel = min(found, key=lambda r: (r.count("/"), r))
        for chunk, keyframes in sorted(chunks.items()):
            chunk_start = window_start + chunk * chunk_s
            chunk_end = min(chunk_start + chunk_s, window_end)
            start_s, end_s = max(0.0, chunk_start - context_s), float(chunk_end + context_s)
            extra_keyframes, present_actions = [], set()
            for timestamp, boxes in sorted(keyframes.items()):
                entries = sorted(boxes.items())
                extra_keyframes.append({
                    "t": timestamp,
                    "boxes": [list(box) for (_, box), _ in entries],
                    "actions": [sorted(ids) for _, ids in entries],
                    "person_ids": [person for (person, _), _ in entries],
                })
                present_actions.update(a for _, ids in entries for a in ids)
            records.append(VideoRecord(
                key=annotation_key(f"{video_id}_{chunk_start:g}-{chunk_end:g}s"),
                source=storage.join(root, rel),
                label="",
                split=split,
                start_s=float(start_s),
                end_s=end_s,
                # The movie is at least window_end long: this overestimates the chunk's share at most.
                size=max(1, round(files[rel] * (end_s - start_s) / window_end)),
                labels=tuple(sorted(actions[a] for a in present_actions)),
                extra={"video_id": video_id, "keyframes": extra_keyframes},
                path=rel,
            ))
    return records, rejected
