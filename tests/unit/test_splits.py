"""Train/val assignment for sources without a split column: stratified per class, deterministic, and
the same wherever the raw files lie."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipelines.data.sources import VideoRecord, folder_per_class
from pipelines.data.splits import assign_splits


def records_of(sizes: dict[str, int], root: str = "/data/raw") -> list[VideoRecord]:
    """One record per video: `<root>/<class>/<class>_<i>.mp4`, keyed and pathed as the folder adapter does."""
    return [VideoRecord(f"{label}_{i:04d}-k", f"{root}/{label}/{label}_{i:04d}.mp4", label,
                        path=f"{label}/{label}_{i:04d}.mp4")
            for label, size in sizes.items() for i in range(size)]


def val_per_class(records: list[VideoRecord]) -> Counter:
    return Counter(r.label for r in records if r.split == "val")


def test_the_issue_case_gives_every_class_its_share():
    # 4 classes x 12 videos at 0.2: the per-record hash gave 5 of 48 and one class none.
    records = assign_splits(records_of({f"c{k}": 12 for k in range(4)}), 0.2)
    assert val_per_class(records) == {"c0": 2, "c1": 2, "c2": 2, "c3": 2}  # round(0.2 * 12)
    assert {r.split for r in records} == {"train", "val"}


@pytest.mark.parametrize("val_fraction", [0.05, 0.1, 0.2, 0.25, 0.5, 0.9])
def test_every_class_is_validated_and_trained_within_one_video_of_its_share(val_fraction):
    sizes = {"single": 1, "pair": 2, "three": 3, "five": 5, "seven": 7, "twelve": 12, "forty": 40, "odd": 101}
    records = assign_splits(records_of(sizes), val_fraction)
    val = val_per_class(records)
    for label, size in sizes.items():
        train = size - val[label]
        if size >= 2:
            assert val[label] >= 1 and train >= 1, label
        else:
            assert val[label] == 0, label  # a class with one video trains
        assert abs(val[label] - val_fraction * size) <= 1, (label, val[label])


def test_no_validation_when_val_fraction_is_zero_and_existing_splits_are_kept():
    records = records_of({"a": 10})
    given = [VideoRecord("t", "/x/t.mp4", "a", "test", path="t.mp4"), VideoRecord("v", "/x/v.mp4", "a", "val", path="v.mp4")]
    assert {r.split for r in assign_splits(records, 0.0)} == {"train"}
    assigned = assign_splits(given + records, 0.3)
    assert assigned[:2] == given  # a split from the annotations is never replaced
    assert val_per_class(assigned[2:]) == {"a": 3}  # counted over the records without a split


def test_assignment_ignores_input_order_and_location():
    records = records_of({"a": 9, "b": 14, "c": 3})
    reference = {r.key: r.split for r in assign_splits(records, 0.3)}
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert {r.key: r.split for r in assign_splits(shuffled, 0.3)} == reference
    elsewhere = records_of({"a": 9, "b": 14, "c": 3}, root="s3://bucket/other/prefix")
    assert {r.key: r.split for r in assign_splits(elsewhere, 0.3)} == reference


def test_a_folder_moved_elsewhere_keeps_its_split(tmp_path):
    for root in (tmp_path / "one", tmp_path / "deeper" / "two"):
        for label, count in (("cat", 7), ("dog", 4), ("owl", 2)):
            for i in range(count):
                (root / label).mkdir(parents=True, exist_ok=True)
                (root / label / f"clip {i}.mp4").write_bytes(b"x")
    splits = []
    for root in (tmp_path / "one", tmp_path / "deeper" / "two"):
        records, _ = folder_per_class(str(root))
        assigned = assign_splits(records, 0.25)
        splits.append(sorted((r.key, r.split) for r in assigned))
        assert val_per_class(assigned) == {"cat": 2, "dog": 1, "owl": 1}
    assert splits[0] == splits[1]


def test_adding_a_video_changes_only_its_class_and_at_most_one_other_choice():
    def splits(videos_in_a: int) -> dict[str, str]:
        return {r.key: r.split for r in assign_splits(records_of({"a": videos_in_a, "b": 11, "c": 6}), 0.2)}

    previous = splits(11)
    for videos_in_a in range(12, 26):  # whatever the new video's hash, and across steps of round(0.2 * n)
        current = splits(videos_in_a)
        changed = {key for key in previous if previous[key] != current[key]}
        assert len(changed) <= 1 and all(key.startswith("a_") for key in changed), (videos_in_a, changed)
        previous = current


def test_records_cut_from_one_file_share_a_split():
    # Three cuts of each of 10 movies: movies, not cuts, are drawn, so no movie is in train and val.
    records = [VideoRecord(f"m{m}_{t}", f"/raw/m{m}.mkv", "run", start_s=float(t), end_s=t + 1.0, path=f"m{m}.mkv")
               for m in range(10) for t in (0, 60, 120)]
    assigned = assign_splits(records, 0.2)
    by_movie = {}
    for record in assigned:
        by_movie.setdefault(record.path, set()).add(record.split)
    assert all(len(splits) == 1 for splits in by_movie.values())
    assert sum(splits == {"val"} for splits in by_movie.values()) == 2


def test_multi_label_files_are_stratified_by_their_rarest_label():
    # Every movie shows "stand"; 4 also show "bend" and 2 of those "kiss" (AVA-style labels lists).
    def movie(m: int, labels: tuple[str, ...]) -> VideoRecord:
        return VideoRecord(f"m{m:02d}", f"/raw/m{m:02d}.mkv", "", labels=labels, path=f"m{m:02d}.mkv")
    records = [movie(m, ("stand",)) for m in range(10)]
    records += [movie(m, ("bend", "stand")) for m in range(10, 12)]
    records += [movie(m, ("bend", "kiss", "stand")) for m in range(12, 14)]
    assigned = assign_splits(records, 0.2)
    val = [r for r in assigned if r.split == "val"]
    assert sum("kiss" in r.labels for r in val) == 1  # stratum "kiss": 2 movies -> at least 1
    assert sum(r.labels == ("bend", "stand") for r in val) == 1  # stratum "bend": the other 2 -> 1
    assert sum(r.labels == ("stand",) for r in val) == 2  # stratum "stand": 10 movies -> 2
    assert assign_splits(list(reversed(records)), 0.2) == list(reversed(assigned))


def test_a_bad_fraction_is_refused_with_its_name():
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        assign_splits(records_of({"a": 2}), 1.5)
