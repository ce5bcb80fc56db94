"""AVA keyframes in a preprocessed dataset: their class ids, where they fall in a stored sample, and the
ledger that accounts for every annotated keyframe.

A sample is one chunk of a movie (`preprocess.ava.chunk_s` seconds plus `context_s` on both sides), not
one keyframe: stored once, a chunk serves every clip length (16x4, 32x3, 64x3 need 2.1 s, 3.2 s, 6.4 s at
30 fps around their keyframe), while one sample per keyframe clip would store each second of movie 2-6
times over (consecutive keyframes are 1 s apart) and tie the dataset to one T x tau. Decoding costs the
same either way (a clip's frames only, from the keyframe before them; see `decode_frames`), and the
training loader reads a chunk once per epoch and yields each of its keyframes (pipelines/detection/data.py).

Where a keyframe is: preprocessing re-encodes a chunk at a constant `fps` from its first frame, which
shows the source at `first_frame_s` (movie seconds), so keyframe `t` is stored frame
`round((t - first_frame_s) * fps)`. The worker writes that index into each keyframe (`"frame"`), so
nothing downstream recomputes it; a keyframe outside the stored frames (the movie ends, or starts, before
it) is dropped from the sample's keyframes and listed in `extra.dropped_keyframes` with its reason, never
moved to a frame that exists.

The ledger: every keyframe that an annotation row names (by a readable video id and timestamp) is either
usable (in a sample, with at least one groundtruth box) or lost for one reason: its every row was
rejected, its movie is missing, its chunk did not decode, it lies past the end of the stored video.
`keyframe_ledger(prefix)` adds them up from index.jsonl (per-sample counts) and quarantine.jsonl (entries
with `keyframes`): `usable + sum(lost) == keyframes`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipelines.data import storage
from pipelines.data.shards import INDEX, QUARANTINE
from pipelines.data.sources.ava import read_action_list
from pipelines.data.sources.base import SourceError, is_folder, parent

PAST_THE_END = "keyframe past the end of the video"
BEFORE_THE_START = "keyframe before the first frame of the video"
COUNTS_FIELD = "keyframe_counts"  # sample json and index.jsonl: what the sample holds


def action_label_map(source: str, action_list: str) -> dict[str, int]:
    """The dataset's label map for AVA: every action of the list, id = official action id - 1 (as SlowFast:
    the head has one output per action id, 80 for AVA v2.2, whether or not the data holds that action)."""
    folder = source if is_folder(source) else parent(source)
    actions = read_action_list(folder, action_list)
    if min(actions) < 1:
        raise SourceError(f"{storage.join(folder, action_list)}: action ids must be >= 1 (got {min(actions)})")
    return {name: action_id - 1 for action_id, name in actions.items()}


def labelled_keyframes(extra: dict[str, Any]) -> int:
    """Keyframes of a record/sample with at least one groundtruth box (0 for other sources)."""
    return sum(1 for keyframe in extra.get("keyframes", ()) if keyframe.get("boxes"))


def place_keyframes(extra: dict[str, Any], *, first_frame_s: float, fps: float, frames: int) -> tuple[dict, dict]:
    """The sample's `extra` with each keyframe's stored frame index (`"frame"`), those outside the stored
    frames moved to `dropped_keyframes`, and the counts index.jsonl records (`labelled`, `unlabelled`
    keyframes kept; `dropped`: reason -> labelled keyframes lost)."""
    kept, dropped = [], []
    for keyframe in extra.get("keyframes", ()):
        frame = round((keyframe["t"] - first_frame_s) * fps)
        if 0 <= frame < frames:
            kept.append({**keyframe, "frame": frame})
            continue
        reason = PAST_THE_END if frame >= frames else BEFORE_THE_START
        dropped.append({"t": keyframe["t"], "reason": reason, "labelled": bool(keyframe.get("boxes")),
                        "detail": f"frame {frame}, the stored video holds frames 0..{frames - 1} "
                                  f"({first_frame_s:.3f}..{first_frame_s + (frames - 1) / fps:.3f} s at {fps:g} fps)"})
    counts = {
        "labelled": sum(1 for k in kept if k.get("boxes")),
        "unlabelled": sum(1 for k in kept if not k.get("boxes")),
        "dropped": dict(Counter(d["reason"] for d in dropped if d["labelled"])),
    }
    return {**extra, "keyframes": kept, "dropped_keyframes": dropped, "first_frame_s": first_frame_s}, counts


@dataclass
class KeyframeLedger:
    """Where every annotated keyframe of a dataset went (see the module docstring)."""

    usable: int = 0  # in a sample with >= 1 groundtruth box: a training / evaluation example
    lost: dict[str, int] = field(default_factory=dict)  # reason -> annotated keyframes lost
    unlabelled: int = 0  # keyframes with proposals only (test-time detections), not annotated
    rejected_rows: dict[str, int] = field(default_factory=dict)  # reason -> annotation rows rejected
    by_split: dict[str, int] = field(default_factory=dict)  # usable keyframes per split

    @property
    def keyframes(self) -> int:
        """Annotated keyframes: every one is usable or lost."""
        return self.usable + sum(self.lost.values())

    def to_dict(self) -> dict[str, Any]:
        return {"keyframes": self.keyframes, "usable": self.usable, "lost": self.lost, "unlabelled": self.unlabelled,
                "rejected_rows": self.rejected_rows, "by_split": self.by_split}


def _lines(prefix: str, name: str) -> list[dict]:
    uri = storage.join(prefix, name)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def keyframe_ledger(prefix: str) -> KeyframeLedger:
    """The ledger of a preprocessed AVA dataset, from its index.jsonl and quarantine.jsonl."""
    ledger = KeyframeLedger()
    lost: Counter = Counter()
    rows: Counter = Counter()
    by_split: Counter = Counter()
    for entry in _lines(prefix, INDEX):
        counts = entry.get(COUNTS_FIELD)
        if counts is None:
            continue
        ledger.usable += counts["labelled"]
        ledger.unlabelled += counts["unlabelled"]
        by_split[entry["split"]] += counts["labelled"]
        lost.update(counts["dropped"])
    for entry in _lines(prefix, QUARANTINE):
        if entry.get("keyframes"):
            lost[entry["reason"]] += int(entry["keyframes"])
        else:
            rows[entry["reason"]] += 1
    ledger.lost, ledger.rejected_rows, ledger.by_split = dict(lost), dict(rows), dict(by_split)
    return ledger


def split_keyframes(prefix: str, split: str) -> int:
    """Usable (labelled) keyframes of one split: the examples of a training epoch."""
    return keyframe_ledger(prefix).by_split.get(split, 0)
