"""The synthetic AVA set: readable by the AVA adapter, labels that follow the motion, videos that show the
boxes, groundtruth that the evaluator scores 1.0 against itself, proposals near the truth."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.sources import SourceError, load_records
from pipelines.data.synthetic_ava import ACTIONS, SyntheticAvaSpec, generate
from pipelines.data.video import decode
from pipelines.detection import ava_eval

SPEC = SyntheticAvaSpec(train_videos=2, val_videos=2, seed=3)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic_ava"), SPEC)


def rows(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text().splitlines()))


def test_listed_by_the_ava_adapter_with_the_window_it_was_written_for(synthetic):
    records, rejected = load_records(str(synthetic.root), "ava", window_s=synthetic.window_s)
    assert rejected == []
    assert len(records) == SPEC.train_videos + SPEC.val_videos  # one 60 s chunk covers a whole 6 s video
    by_video = {r.extra["video_id"]: r for r in records}
    for video in synthetic.videos:
        record = by_video[video.video_id]
        assert record.split == video.split
        assert record.source == str(synthetic.root / "videos" / f"{video.video_id}.mp4")
        assert record.labels == tuple(sorted({ACTIONS[a] for p in video.persons for a in p.actions}))
        keyframes = record.extra["keyframes"]
        assert [k["t"] for k in keyframes] == list(video.keyframes)  # the excluded one has no rows
        assert video.excluded not in video.keyframes
        for keyframe in keyframes:
            assert keyframe["person_ids"] == [p.person_id for p in video.persons]
            assert keyframe["actions"] == [sorted(p.actions) for p in video.persons]
    # Several actions for one person (e.g. moving up and left, or running right) happen in the set.
    assert any(len(p.actions) > 1 for video in synthetic.videos for p in video.persons)

    # With AVA's own window (movie seconds 900..1800) every row of these 6 s videos is outside it.
    records, rejected = load_records(str(synthetic.root), "ava")
    assert records == [] and rejected
    assert {r.reason for r in rejected} == {"timestamp outside the annotated window", "keyframe without a usable row"}
    with pytest.raises(SourceError, match=r"window_s must be whole seconds 0 <= start < end, got \(6, 0\)"):
        load_records(str(synthetic.root), "ava", window_s=(6, 0))


def test_boxes_move_as_their_action_labels_say(synthetic):
    walk = 0.36 / SPEC.duration_s  # WALK_TRAVEL per second
    records, _ = load_records(str(synthetic.root), "ava", window_s=synthetic.window_s)
    checked = 0
    for record in records:
        keyframes = record.extra["keyframes"]
        for first, second in zip(keyframes, keyframes[1:]):
            seconds = second["t"] - first["t"]
            for person, actions, box, later in zip(first["person_ids"], first["actions"], first["boxes"],
                                                   second["boxes"]):
                names = {ACTIONS[a] for a in actions}
                dx = ((later[0] + later[2]) - (box[0] + box[2])) / 2 / seconds  # centre, per second
                dy = ((later[1] + later[3]) - (box[1] + box[3])) / 2 / seconds
                what = f"{record.extra['video_id']} person {person} {sorted(names)}: dx {dx:.4f} dy {dy:.4f}"
                # Pixel rounding moves a centre by at most one pixel (1/128 of the width, 1/96 of the height).
                assert (dx < -walk / 2) == ("move left" in names), what
                assert (dx > walk / 2) == ("move right" in names), what
                assert (dy < -walk / 2) == ("move up" in names), what
                assert (dy > walk / 2) == ("move down" in names), what
                assert (abs(dx) > 1.5 * walk) == ("run" in names), what
                if "stand still" in names:
                    assert dx == dy == 0 and len(names) == 1, what
                if not {"move left", "move right"} & names:
                    assert dx == 0, what  # no horizontal motion at all, not just a slow one
                checked += 1
    assert checked > 20


def test_videos_show_the_persons_where_the_boxes_are(synthetic):
    video = synthetic.videos[0]
    decoded = decode((synthetic.root / "videos" / f"{video.video_id}.mp4").read_bytes())
    assert decoded.frames.shape == (SPEC.duration_s * SPEC.fps, SPEC.height, SPEC.width, 3)
    records, _ = load_records(str(synthetic.root), "ava", window_s=synthetic.window_s)
    keyframes = next(r for r in records if r.extra["video_id"] == video.video_id).extra["keyframes"]
    for keyframe in keyframes:
        frame = decoded.frames[keyframe["t"] * SPEC.fps].astype(float).mean(axis=2)
        outside = np.ones(frame.shape, dtype=bool)
        for x1, y1, x2, y2 in keyframe["boxes"]:
            c1, r1, c2, r2 = (round(x1 * SPEC.width), round(y1 * SPEC.height), round(x2 * SPEC.width),
                              round(y2 * SPEC.height))
            outside[r1:r2, c1:c2] = False
            core = frame[r1 + 2:r2 - 2, c1 + 2:c2 - 2]  # away from the edges that compression blurs
            assert core.mean() > 130, keyframe  # persons are drawn with every channel >= 140
        assert frame[outside].mean() < 75  # background channels < 60 plus noise


def test_groundtruth_scores_map_one_against_itself(synthetic):
    """The written groundtruth read as detections (its person ids as scores) finds every box once."""
    for split in ("train", "val"):
        gt = str(synthetic.groundtruth(split))
        result = ava_eval.evaluate_files(gt, gt, str(synthetic.action_list), str(synthetic.exclusions(split)))
        assert result.mean_ap == 1.0
        present = {a for v in synthetic.videos if v.split == split for p in v.persons for a in p.actions}
        assert {c.id for c in result.classes if c.groundtruth} == present


def test_proposals_cover_every_person_and_add_low_scored_false_boxes(synthetic):
    for split in ("train", "val"):
        proposals = rows(synthetic.proposals(split))
        assert all(len(row) == 7 for row in proposals)
        by_frame: dict[str, list[tuple[np.ndarray, float]]] = {}
        for video_id, t, *box, score in proposals:
            by_frame.setdefault(ava_eval.image_key(video_id, int(t)), []).append(
                (np.array([float(v) for v in box]), float(score)))
        excluded = {f"{video_id},{int(t):04d}" for video_id, t in rows(synthetic.exclusions(split))}
        assert excluded <= set(by_frame)  # a detector sees the excluded keyframes too
        truth = ava_eval.read_groundtruth(str(synthetic.groundtruth(split)), None)
        assert set(truth) == set(by_frame) - excluded
        false_boxes = 0
        for key, frame in truth.items():
            boxes = np.unique(frame.boxes, axis=0)  # one box per person (a row per action)
            found = by_frame[key]
            overlaps = ava_eval.box_iou(np.stack([b for b, _ in found]), boxes)
            scores = np.array([s for _, s in found])
            for person in range(len(boxes)):
                assert overlaps[:, person].max() > 0.5 and scores[overlaps[:, person].argmax()] >= 0.8
            false_boxes += int((overlaps.max(axis=1) < 0.5).sum())
            assert np.all(scores[overlaps.max(axis=1) < 0.5] < 0.5)
        assert false_boxes > 0


def test_same_seed_same_bytes(tmp_path, synthetic):
    again = generate(tmp_path / "again", SPEC)
    other = generate(tmp_path / "other", SyntheticAvaSpec(train_videos=2, val_videos=2, seed=4))
    for name in ("ava_train_v2.2.csv", "ava_val_v2.2.csv", "person_proposals_val.csv",
                 "videos/synava_val_01.mp4"):
        assert (again.root / name).read_bytes() == (synthetic.root / name).read_bytes(), name
    assert (other.root / "ava_val_v2.2.csv").read_bytes() != (synthetic.root / "ava_val_v2.2.csv").read_bytes()
