"""A tiny synthetic set in the AVA v2.2 layout, for tests and a detection demo.

Each video shows 2-3 "persons" (bright rectangles with a head of another colour on a dark, noisy
background) that each move at a constant velocity for the whole video; a person's actions are read off
its motion, so the labels are multi-label: a person walking up and to the left is both "move left" and
"move up", one running right is "move right" and "run", one standing is "stand still". The motions are dealt round-robin from a
seeded shuffle of the motion table, so every set of 6+ persons holds multi-label ones.

Layout (what pipelines/data/sources/ava.py reads, with `window_s=set.window_s`):

    <out>/ava_action_list_v2.2.pbtxt                 label { name: "..." label_id: N label_type: ... }
    <out>/ava_{train,val}_v2.2.csv                   video_id,timestamp,x1,y1,x2,y2,action_id,person_id
    <out>/ava_{train,val}_excluded_timestamps_v2.2.csv   video_id,timestamp
    <out>/person_proposals_{train,val}.csv           video_id,timestamp,x1,y1,x2,y2,score
    <out>/videos/<video_id>.mp4                      H.264, `fps` frames per second, `duration_s` long

The annotated window is seconds 0..duration_s of each video (AVA's is 900..1800 of each movie), with
keyframes at 1 Hz from second 1 to duration_s - 1 (AVA: 902..1798), timestamps written `%04d` as in the
official CSVs. One keyframe per video is excluded: like the official files, the groundtruth CSV has no
rows for it, while the proposals do (a detector sees every frame).

Person proposals stand in for the official detector boxes (SlowFast reads them from a pickle or an
8-column CSV): ours are one documented CSV without header, one row per box, `score` in [0, 1]. Every
person gets one box jittered around its true box (each edge by 5% of the box size, sd; score 0.8..1.0);
some keyframes also get a false box somewhere else (score 0.05..0.5).

Deterministic given `seed`: each video draws from its own generator seeded with (seed, split, index).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data.sources.ava import ACTION_LIST_FILE, CSV_FILES, EXCLUSION_FILES
from pipelines.data.video import encode_mp4

ACTIONS = {1: "move left", 2: "move right", 3: "move up", 4: "move down", 5: "stand still", 6: "run"}
# How far a person gets over the whole video, in frame widths (heights): speeds scale with the duration
# so that every path fits in the frame. Runs are horizontal only: a run down the frame would not fit.
WALK_TRAVEL = 0.36
RUN_TRAVEL = 0.72
PROPOSAL_FILES = {split: f"person_proposals_{split}.csv" for split in CSV_FILES}
VIDEO_DIR = "videos"


@dataclass(frozen=True)
class Motion:
    travel: tuple[float, float]  # (dx, dy) over the whole video, normalised coordinates; y grows downwards
    actions: tuple[int, ...]


def _motions() -> tuple[Motion, ...]:
    table = [Motion((0.0, 0.0), (5,))]
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            if dx or dy:
                actions = tuple(a for a, on in ((1, dx < 0), (2, dx > 0), (3, dy < 0), (4, dy > 0)) if on)
                table.append(Motion((dx * WALK_TRAVEL, dy * WALK_TRAVEL), actions))
    table += [Motion((-RUN_TRAVEL, 0.0), (1, 6)), Motion((RUN_TRAVEL, 0.0), (2, 6))]
    return tuple(table)


MOTIONS = _motions()


@dataclass
class SyntheticAvaSpec:
    train_videos: int = 2
    val_videos: int = 2
    duration_s: int = 6
    fps: int = 10
    width: int = 128
    height: int = 96
    min_persons: int = 2
    max_persons: int = 3
    false_proposal_rate: float = 0.3  # chance per keyframe of one false proposal
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s < 3:
            raise ValueError(f"duration_s must be >= 3 (keyframes at 1..duration_s-1, one excluded), "
                             f"got {self.duration_s}")
        if not 1 <= self.min_persons <= self.max_persons:
            raise ValueError(f"need 1 <= min_persons <= max_persons, got {self.min_persons}, {self.max_persons}")
        if self.width < 32 or self.height < 32 or self.fps < 1:
            raise ValueError("width and height must be >= 32 pixels and fps >= 1")


@dataclass(frozen=True)
class SyntheticPerson:
    person_id: int
    actions: tuple[int, ...]
    start: tuple[float, float]  # top-left corner at t = 0, normalised
    size: tuple[float, float]  # (w, h), normalised
    velocity: tuple[float, float]  # per second
    colour: tuple[int, int, int]
    head_colour: tuple[int, int, int]  # the top quarter of the rectangle: vertical motion shows inside the box too

    def pixel_box(self, t: float, width: int, height: int) -> tuple[int, int, int, int]:
        """The rectangle drawn at time t: pixel columns [x1, x2) and rows [y1, y2)."""
        x = self.start[0] + self.velocity[0] * t
        y = self.start[1] + self.velocity[1] * t
        return (round(x * width), round(y * height), round((x + self.size[0]) * width),
                round((y + self.size[1]) * height))

    def box(self, t: float, width: int, height: int) -> tuple[float, float, float, float]:
        """The groundtruth box at time t: the drawn rectangle, normalised."""
        x1, y1, x2, y2 = self.pixel_box(t, width, height)
        return x1 / width, y1 / height, x2 / width, y2 / height


@dataclass(frozen=True)
class SyntheticVideo:
    video_id: str
    split: str
    persons: tuple[SyntheticPerson, ...]
    keyframes: tuple[int, ...]  # annotated seconds (the excluded one not among them)
    excluded: int  # the excluded keyframe


@dataclass(frozen=True)
class SyntheticAvaSet:
    root: Path
    window_s: tuple[int, int]  # pass to the AVA adapter: load_records(root, "ava", window_s=...)
    videos: tuple[SyntheticVideo, ...]

    def groundtruth(self, split: str) -> Path:
        return self.root / CSV_FILES[split]

    def exclusions(self, split: str) -> Path:
        return self.root / EXCLUSION_FILES[split]

    def proposals(self, split: str) -> Path:
        return self.root / PROPOSAL_FILES[split]

    @property
    def action_list(self) -> Path:
        return self.root / ACTION_LIST_FILE


def _person(person_id: int, motion: Motion, rng: np.random.Generator, duration_s: int) -> SyntheticPerson:
    size = (float(rng.uniform(0.08, 0.12)), float(rng.uniform(0.22, 0.3)))
    start = []
    for travel, extent in zip(motion.travel, size):
        # The whole path stays inside the frame, so a box never needs clipping and its motion never reverses.
        start.append(float(rng.uniform(max(0.0, -travel), 1.0 - extent - max(0.0, travel))))
    velocity = (motion.travel[0] / duration_s, motion.travel[1] / duration_s)
    colour = tuple(int(c) for c in rng.integers(140, 256, size=3))
    # Every channel differs from the body's by >= 50 and stays in 140..255 (farther from the background).
    head = tuple(int(c - 60 if c >= 200 else c + 55) for c in colour)
    return SyntheticPerson(person_id, motion.actions, (start[0], start[1]), size, velocity, colour, head)


def _render(video: SyntheticVideo, rng: np.random.Generator, spec: SyntheticAvaSpec) -> np.ndarray:
    frames = spec.duration_s * spec.fps
    background = rng.integers(0, 60, size=3).astype(np.float32)
    video_frames = np.empty((frames, spec.height, spec.width, 3), dtype=np.uint8)
    for index in range(frames):
        frame = np.broadcast_to(background, (spec.height, spec.width, 3)).copy()
        for person in video.persons:
            x1, y1, x2, y2 = person.pixel_box(index / spec.fps, spec.width, spec.height)
            frame[y1:y2, x1:x2] = person.colour
            frame[y1:y1 + max(1, (y2 - y1) // 4), x1:x2] = person.head_colour
        frame += rng.normal(0, 4, size=frame.shape).astype(np.float32)
        video_frames[index] = np.clip(frame, 0, 255).astype(np.uint8)
    return video_frames


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def _proposal_rows(video: SyntheticVideo, rng: np.random.Generator, spec: SyntheticAvaSpec) -> list[list[str]]:
    rows = []
    for t in sorted((*video.keyframes, video.excluded)):
        boxes = []
        for person in video.persons:
            w, h = person.size
            # Each edge moves by 5% of the box's size (sd): a detector's box, IoU with the truth mostly > 0.8.
            jitter = rng.normal(0, 0.05, size=4) * np.array([w, h, w, h])
            boxes.append((np.array(person.box(t, spec.width, spec.height)) + jitter, rng.uniform(0.8, 1.0)))
        if rng.random() < spec.false_proposal_rate:
            w, h = rng.uniform(0.05, 0.15), rng.uniform(0.1, 0.3)
            x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            boxes.append(((x, y, x + w, y + h), rng.uniform(0.05, 0.5)))
        for box, score in boxes:
            x1, y1, x2, y2 = np.clip(box, 0.0, 1.0)
            x1, x2 = sorted((x1, x2))  # jitter never flips a box in practice; a proposal must still be valid
            y1, y2 = sorted((y1, y2))
            rows.append([video.video_id, f"{t:04d}", *map(_fmt, (x1, y1, x2, y2)), f"{score:.4f}"])
    return rows


def _csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _action_list_text() -> str:
    return "".join(f'label {{\n  name: "{name}"\n  label_id: {action}\n  label_type: PERSON_MOVEMENT\n}}\n'
                   for action, name in ACTIONS.items())


def generate(out_dir: str | Path, spec: SyntheticAvaSpec | None = None) -> SyntheticAvaSet:
    """Write the set under `out_dir` (see the module docstring) and describe what was drawn."""
    spec = spec or SyntheticAvaSpec()
    out = Path(out_dir)
    (out / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng([spec.seed, 1_000_003]).permutation(len(MOTIONS))
    dealt = 0  # motions are dealt round-robin over the whole set: every motion appears before any repeats
    videos: list[SyntheticVideo] = []
    rows = {split: {"gt": [], "excluded": [], "proposals": []} for split in CSV_FILES}
    counts = {"train": spec.train_videos, "val": spec.val_videos}
    for split_index, split in enumerate(CSV_FILES):
        for i in range(counts[split]):
            rng = np.random.default_rng([spec.seed, split_index, i])
            persons = []
            for person_id in range(int(rng.integers(spec.min_persons, spec.max_persons + 1))):
                persons.append(_person(person_id, MOTIONS[order[dealt % len(MOTIONS)]], rng, spec.duration_s))
                dealt += 1
            seconds = list(range(1, spec.duration_s))
            excluded = int(rng.choice(seconds))
            video = SyntheticVideo(f"synava_{split}_{i:02d}", split, tuple(persons),
                                   tuple(t for t in seconds if t != excluded), excluded)
            videos.append(video)
            (out / VIDEO_DIR / f"{video.video_id}.mp4").write_bytes(
                encode_mp4(_render(video, rng, spec), spec.fps, crf=18, gop=spec.fps))
            for t in video.keyframes:
                for person in video.persons:
                    box = list(map(_fmt, person.box(t, spec.width, spec.height)))
                    for action in person.actions:
                        rows[split]["gt"].append([video.video_id, f"{t:04d}", *box, str(action),
                                                  str(person.person_id)])
            rows[split]["excluded"].append([video.video_id, f"{excluded:04d}"])
            rows[split]["proposals"] += _proposal_rows(video, rng, spec)

    (out / ACTION_LIST_FILE).write_text(_action_list_text())
    for split in CSV_FILES:
        (out / CSV_FILES[split]).write_text(_csv_text(rows[split]["gt"]))
        (out / EXCLUSION_FILES[split]).write_text(_csv_text(rows[split]["excluded"]))
        (out / PROPOSAL_FILES[split]).write_text(_csv_text(rows[split]["proposals"]))
    return SyntheticAvaSet(out, (0, spec.duration_s), tuple(videos))
