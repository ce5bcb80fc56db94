"""The AVA frame-mAP evaluator against answers worked out by hand from the official evaluator's rules.

Each test names the rule it pins down (R1..R14, listed in pipelines/detection/ava_eval.py's docstring)
and derives its expected numbers in comments. Boxes are x1,y1,x2,y2 in [0, 1]; coordinates are chosen
exactly representable in binary where an IoU is compared with 0.5.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from pipelines.commands import evaluate_ava
from pipelines.detection import ava_eval
from pipelines.detection.ava_eval import AvaFormatError, DetectionRow


def make_labelmap(*names: str) -> str:
    """An ActivityNet-style label map: `item { name: ".." id: N }` blocks, ids 1, 2, ... in order."""
    return "".join(f'item {{\n  name: "{name}"\n  id: {i}\n}}\n' for i, name in enumerate(names, start=1))


LABELMAP = make_labelmap("stand", "sit", "talk")
STAND_ONLY = make_labelmap("stand")

A = (0.0, 0.0, 0.5, 0.5)  # a person box
B = (0.5, 0.5, 1.0, 1.0)  # another, not overlapping A
ELSEWHERE = (0.75, 0.0, 1.0, 0.25)  # overlaps neither A nor B


def line(video: str, t: str | int, box, action: int, last=None) -> str:
    fields = [video, str(t), *(repr(float(v)) for v in box), str(action)]
    return ",".join(fields + ([] if last is None else [str(last)]))


def write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(f"{text}\n" for text in lines))
    return str(path)


def evaluate(tmp_path: Path, groundtruth: list[str], detections: list[str], exclusions: list[str] | None = None,
             labelmap: str = LABELMAP, capacity: int = ava_eval.OFFICIAL_CAPACITY) -> ava_eval.AvaResult:
    (tmp_path / "labels.pbtxt").write_text(labelmap)
    return ava_eval.evaluate_files(
        write(tmp_path / "gt.csv", groundtruth),
        write(tmp_path / "det.csv", detections),
        str(tmp_path / "labels.pbtxt"),
        None if exclusions is None else write(tmp_path / "excluded.csv", exclusions),
        capacity=capacity,
    )


def ap(result: ava_eval.AvaResult, name: str) -> float:
    return result.per_class[name]


def test_perfect_detections_score_one(tmp_path):
    """Every groundtruth box detected once with its class, nothing else: AP 1 for each class with
    groundtruth and mAP 1. Also R1: the detections spell timestamp 0902 as 902, the same frame."""
    groundtruth = [
        line("vidA", "0902", A, 1, 0), line("vidA", "0902", A, 3, 0),  # one person, two actions
        line("vidA", "0902", B, 2, 1),
        line("vidA", "0903", B, 2, 1),
        line("vidB", "0902", A, 1, 0),
    ]
    detections = [
        line("vidA", 902, A, 1, 0.3), line("vidA", 902, A, 3, 0.2), line("vidA", 902, B, 2, 0.9),
        line("vidA", 903, B, 2, 0.1), line("vidB", 902, A, 1, 0.6),
    ]
    result = evaluate(tmp_path, groundtruth, detections)
    # Each class: all detections true positives, recall reaches 1 with precision 1 -> AP = 1 * 1 = 1.
    assert result.per_class == {"stand": 1.0, "sit": 1.0, "talk": 1.0}
    assert result.mean_ap == 1.0
    assert [(c.groundtruth, c.detections) for c in result.classes] == [(2, 2), (2, 2), (1, 1)]


def test_false_positive_ranked_first(tmp_path):
    """R9/R11/R12: a false positive with the highest score costs precision at every later recall step."""
    groundtruth = [line("v", 902, A, 1, 0), line("v", 903, A, 1, 0)]
    detections = [
        line("v", 902, ELSEWHERE, 1, 0.9),  # misses -> false positive
        line("v", 902, A, 1, 0.8),
        line("v", 903, A, 1, 0.7),
    ]
    result = evaluate(tmp_path, groundtruth, detections, labelmap=STAND_ONLY)
    # ranked FP, TP, TP; 2 groundtruth boxes: precision 0, 1/2, 2/3; recall 0, 1/2, 1.
    # Made non-increasing from the right: 2/3, 2/3, 2/3. Recall changes at ranks 2 and 3:
    # AP = (1/2 - 0) * 2/3 + (1 - 1/2) * 2/3 = 2/3.
    assert ap(result, "stand") == pytest.approx(2 / 3, abs=1e-12)
    assert result.mean_ap == pytest.approx(2 / 3, abs=1e-12)


def test_precision_is_made_monotone_before_summing(tmp_path):
    """R12: VOC interpolation: each recall step is weighted by the best precision at that recall or
    beyond, not by the precision at the step itself; recall that is never reached adds nothing."""
    frames = [902, 903, 904, 905]  # one groundtruth box per frame: 4 in all, one never detected
    groundtruth = [line("v", t, A, 1, 0) for t in frames]
    detections = [
        line("v", 902, A, 1, 0.9),  # TP
        line("v", 903, ELSEWHERE, 1, 0.8),  # FP
        line("v", 904, ELSEWHERE, 1, 0.7),  # FP
        line("v", 903, A, 1, 0.6),  # TP
        line("v", 904, A, 1, 0.5),  # TP
    ]
    result = evaluate(tmp_path, groundtruth, detections, labelmap=STAND_ONLY)
    # precision 1, 1/2, 1/3, 2/4, 3/5; recall 1/4, 1/4, 1/4, 2/4, 3/4.
    # Non-increasing from the right: 1, 3/5, 3/5, 3/5, 3/5 (then the padded 0 at recall 1).
    # Steps at ranks 1, 4, 5: AP = 1/4 * 1 + 1/4 * 3/5 + 1/4 * 3/5 = 0.25 + 0.15 + 0.15 = 0.55
    # (the precision at the steps themselves would give 0.25 + 0.125 + 0.15 = 0.525).
    assert ap(result, "stand") == pytest.approx(0.55, abs=1e-12)


@pytest.mark.parametrize("order", ["higher score first", "lower score first"])
def test_two_detections_of_one_box_in_either_order(tmp_path, order):
    """R5/R9: a frame's detections are matched in descending score order whatever the file order, so the
    higher-scoring one takes the box even with the lower IoU; the other is a duplicate: false positive."""
    loose = (0.0, 0.0, 0.5, 0.375)  # inside A: IoU = 0.1875 / 0.25 = 0.75
    pair = [line("v", 902, loose, 1, 0.9), line("v", 902, A, 1, 0.8)]  # IoU 0.75 and 1.0 with A
    if order == "lower score first":
        pair.reverse()
    groundtruth = [line("v", 902, A, 1, 0), line("v", 903, A, 1, 0)]
    detections = [*pair, line("v", 903, A, 1, 0.7)]
    result = evaluate(tmp_path, groundtruth, detections, labelmap=STAND_ONLY)
    # ranked 0.9 TP, 0.8 FP (duplicate), 0.7 TP; 2 boxes: precision 1, 1/2, 2/3; recall 1/2, 1/2, 1.
    # Non-increasing: 1, 2/3, 2/3. Steps at ranks 1 and 3: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # (Matching in file order would, for "lower score first", make 0.9 the false positive: 2/3.)
    assert ap(result, "stand") == pytest.approx(5 / 6, abs=1e-12)


def test_only_the_best_overlapping_groundtruth_is_tried(tmp_path):
    """R9: a detection whose best-overlapping box is already taken is a false positive, even though a
    second, untaken box of its class overlaps it by more than 0.5."""
    first = (0.0, 0.0, 0.5, 0.5)
    second = (0.0, 0.125, 0.5, 0.625)  # the same person size, shifted down by 1/8
    between = (0.0, 0.03125, 0.5, 0.53125)
    # between vs first: intersection 0.5 * (0.5 - 0.03125) = 0.234375, union 0.5 - 0.234375 = 0.265625,
    # IoU = 0.882; vs second: 0.5 * (0.53125 - 0.125) = 0.203125, union 0.296875, IoU = 0.684 >= 0.5.
    groundtruth = [line("v", 902, first, 1, 0), line("v", 902, second, 1, 1)]
    detections = [line("v", 902, first, 1, 0.9), line("v", 902, between, 1, 0.8)]
    result = evaluate(tmp_path, groundtruth, detections, labelmap=STAND_ONLY)
    # 0.9 takes `first`; 0.8's best is `first` (taken) -> FP; `second` is never found.
    # precision 1, 1/2; recall 1/2, 1/2 -> AP = 1/2 * 1 = 0.5.
    assert ap(result, "stand") == pytest.approx(0.5, abs=1e-12)


def test_iou_of_exactly_one_half_matches(tmp_path):
    """R8/R9: the threshold is IoU >= 0.5, so exactly 0.5 is a match and anything below is not."""
    labelmap = STAND_ONLY
    half = (0.0, 0.0, 0.5, 0.25)  # the top half of A
    # intersection 0.5 * 0.25 = 0.125, union 0.25 + 0.125 - 0.125 = 0.25: IoU = 0.5, all exact in binary.
    result = evaluate(tmp_path, [line("v", 902, A, 1, 0)], [line("v", 902, half, 1, 0.9)], labelmap=labelmap)
    assert ap(result, "stand") == 1.0  # one TP, recall 1 at precision 1
    less = (0.0, 0.0, 0.5, 0.25 - 2**-10)  # IoU = 0.5 * 0.2490234375 / 0.25 = 0.498046875
    result = evaluate(tmp_path, [line("v", 902, A, 1, 0)], [line("v", 902, less, 1, 0.9)], labelmap=labelmap)
    assert ap(result, "stand") == 0.0  # one FP: recall never rises


def test_class_without_groundtruth_is_nan_and_left_out_of_the_mean(tmp_path):
    """R13/R14: a label-map class nobody does has AP NaN, even with detections, and the mean is taken
    over the classes that have groundtruth only."""
    groundtruth = [line("v", 902, A, 1, 0), line("v", 902, B, 2, 1)]
    detections = [
        line("v", 902, A, 1, 0.9),  # stand: TP -> AP 1
        line("v", 902, ELSEWHERE, 2, 0.8), line("v", 902, B, 2, 0.7),  # sit: FP, TP
        line("v", 902, A, 3, 0.95),  # talk: no groundtruth at all
    ]
    result = evaluate(tmp_path, groundtruth, detections)
    # sit: precision 0, 1/2; recall 0, 1 -> non-increasing 1/2, 1/2 -> AP = 1 * 1/2 = 0.5.
    assert ap(result, "stand") == 1.0
    assert ap(result, "sit") == pytest.approx(0.5, abs=1e-12)
    assert math.isnan(ap(result, "talk"))
    # mAP = (1 + 0.5) / 2 = 0.75 (not (1 + 0.5 + 0) / 3).
    assert result.mean_ap == pytest.approx(0.75, abs=1e-12)


def test_class_with_groundtruth_but_no_detections_scores_zero(tmp_path):
    """R13: a class that has groundtruth and no detections has AP 0, and that 0 counts in the mean."""
    groundtruth = [line("v", 902, A, 1, 0), line("v", 902, B, 2, 1)]
    result = evaluate(tmp_path, groundtruth, [line("v", 902, A, 1, 0.9)])
    assert ap(result, "stand") == 1.0
    assert ap(result, "sit") == 0.0
    assert result.mean_ap == pytest.approx(0.5, abs=1e-12)  # (1 + 0) / 2


def test_detections_on_a_frame_without_groundtruth_are_false_positives(tmp_path):
    """R10: a frame that has no groundtruth at all still counts its detections, as false positives."""
    groundtruth = [line("v", 902, A, 1, 0)]
    detections = [line("v", 950, A, 1, 0.9), line("w", 902, A, 1, 0.85), line("v", 902, A, 1, 0.8)]
    result = evaluate(tmp_path, groundtruth, detections, labelmap=STAND_ONLY)
    # ranked FP (v@950), FP (w@902), TP: precision 0, 0, 1/3; recall 0, 0, 1 -> AP = 1 * 1/3.
    assert ap(result, "stand") == pytest.approx(1 / 3, abs=1e-12)


def test_excluded_frames_lose_groundtruth_and_detections(tmp_path):
    """R6 (with R1: the exclusion row says 903 for the frame the CSVs call 0903): an excluded frame's
    groundtruth no longer needs finding and its detections no longer count."""
    labelmap = STAND_ONLY
    groundtruth = [line("v", "0902", A, 1, 0), line("v", "0903", A, 1, 0)]
    detections = [line("v", "0903", ELSEWHERE, 1, 0.95), line("v", "0902", A, 1, 0.9)]
    result = evaluate(tmp_path, groundtruth, detections, exclusions=["v,903"], labelmap=labelmap)
    # Left: one box, one TP -> AP 1.
    assert ap(result, "stand") == 1.0
    assert result.classes[0].groundtruth == 1 and result.classes[0].detections == 1
    result = evaluate(tmp_path, groundtruth, detections, labelmap=labelmap)
    # Without the exclusion: FP, TP over 2 boxes: precision 0, 1/2; recall 0, 1/2 -> AP = 1/2 * 1/2 = 0.25.
    assert ap(result, "stand") == pytest.approx(0.25, abs=1e-12)


def test_zero_area_detections_are_dropped_not_false_positives(tmp_path):
    """R7: a detection with x2 == x1 is removed before matching: it costs no precision."""
    flat = (0.25, 0.0, 0.25, 0.5)
    groundtruth = [line("v", 902, A, 1, 0)]
    detections = [line("v", 902, flat, 1, 0.9), line("v", 902, A, 1, 0.8)]
    result = evaluate(tmp_path, groundtruth, detections, labelmap=STAND_ONLY)
    assert ap(result, "stand") == 1.0  # as a false positive it would have made it 1/2
    assert result.classes[0].detections == 1


def test_rows_of_classes_outside_the_label_map_are_skipped_before_the_cap(tmp_path):
    """R2 (with R4): rows whose action id is not in the label map are skipped as they are read, so they
    neither get an AP nor take one of a frame's capped places."""
    labelmap = STAND_ONLY
    groundtruth = [line("v", 902, A, 1, 0), line("v", 902, A, 9, 0)]
    detections = [line("v", 902, A, 9, 0.99), line("v", 902, A, 1, 0.5)]
    result = evaluate(tmp_path, groundtruth, detections, labelmap=labelmap, capacity=1)
    # With one place per frame, the 0.99 row of class 9 would have pushed out the class-1 TP (AP 0).
    assert result.per_class == {"stand": 1.0}
    assert result.mean_ap == 1.0


def test_capacity_keeps_the_highest_scores_per_frame(tmp_path):
    """R4: only the 50 highest-scoring detections of a frame (all classes together) count."""
    groundtruth = [line("v", 902, A, 1, 0), line("v", 902, B, 2, 1)]
    misses = [line("v", 902, ELSEWHERE, 2, round(0.51 + 0.01 * i, 2)) for i in range(50)]  # 0.51 .. 1.00
    detections = [line("v", 902, A, 1, 0.5), *misses]
    capped = evaluate(tmp_path, groundtruth, detections)
    # The class-1 TP has the 51st score: dropped, so class 1 has groundtruth and no detections -> AP 0.
    assert ap(capped, "stand") == 0.0
    uncapped = evaluate(tmp_path, groundtruth, detections, capacity=0)
    assert ap(uncapped, "stand") == 1.0


@pytest.mark.parametrize("tp_first, expected", [(True, 1.0), (False, 0.0)])
def test_capacity_ties_keep_the_earlier_row(tmp_path, tp_first, expected):
    """R4: a row replaces the lowest kept one only with a strictly higher score, so at a tie the row
    read first stays."""
    groundtruth = [line("v", 902, A, 1, 0), line("v", 902, B, 2, 1)]
    rows = [line("v", 902, A, 1, 0.5), line("v", 902, ELSEWHERE, 2, 0.5)]
    detections = rows if tp_first else rows[::-1]
    result = evaluate(tmp_path, groundtruth, detections, capacity=1)
    # Kept: the first row. TP first -> class 1 AP 1; miss first -> class 1 has no detections -> AP 0.
    assert ap(result, "stand") == expected


@pytest.mark.parametrize("tp_frame_first, expected", [(True, 0.5), (False, 1.0)])
def test_equal_scores_rank_the_later_frame_first(tmp_path, tp_frame_first, expected):
    """R11: pooled detections are ranked by numpy's argsort reversed; for two equal scores the sort
    leaves them in pooled order, so reversed, the detection of the frame that came later in the
    detections file ranks first."""
    groundtruth = [line("v", 902, A, 1, 0)]
    tp, fp = line("v", 902, A, 1, 0.5), line("v", 903, A, 1, 0.5)  # frame 903 has no groundtruth
    detections = [tp, fp] if tp_frame_first else [fp, tp]
    result = evaluate(tmp_path, groundtruth, detections, labelmap=STAND_ONLY)
    # TP frame first -> ranked FP, TP: precision 0, 1/2; recall 0, 1 -> AP 1/2.
    # FP frame first -> ranked TP, FP: precision 1, 1/2; recall 1, 1 -> AP 1.
    assert ap(result, "stand") == expected


# --- files, CLI and the prediction writer --------------------------------------------------------------

def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mvit")
    evaluate_ava.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate-ava", *argv])
    return args.func(args)


def cli_files(tmp_path: Path, detections: list[str]) -> list[str]:
    (tmp_path / "labels.pbtxt").write_text(LABELMAP)
    groundtruth = [line("v", "0902", A, 1, 0), line("v", "0902", B, 2, 1)]
    return ["--groundtruth", write(tmp_path / "gt.csv", groundtruth), "--detections",
            write(tmp_path / "det.csv", detections), "--labelmap", str(tmp_path / "labels.pbtxt")]


def test_cli_prints_each_class_then_the_map_as_its_last_line(tmp_path, capsys):
    """The `mvit evaluate-ava` contract: `<id> <name>: <AP>` per class, the bare frame-mAP last."""
    detections = [line("v", 902, A, 1, 0.9), line("v", 902, ELSEWHERE, 2, 0.8), line("v", 902, B, 2, 0.7),
                  line("v", 902, A, 3, 0.95)]
    assert cli(cli_files(tmp_path, detections)) == 0
    lines = capsys.readouterr().out.splitlines()
    # stand 1; sit FP then TP -> 1/2; talk no groundtruth -> nan; mean (1 + 0.5) / 2.
    assert lines == ["1 stand: 1.0", "2 sit: 0.5", "3 talk: nan", "0.75"]
    assert float(lines[-1]) == 0.75


def test_cli_bad_input_names_file_line_and_field(tmp_path, capsys):
    """Unusable input: exit status 2 and one message naming the file, the line and the field."""
    detections = [line("v", 902, A, 1, 0.9), "v,0902,0.1,0.2,1.5,0.9,1,0.8"]
    args = cli_files(tmp_path, detections)
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'det.csv'}:2: field x2 1.5 is outside [0, 1]" in err

    write(tmp_path / "det.csv", ["v,0902,0.1,0.2,0.5,0.9,1,high"])
    assert cli(args) == 2
    assert f"{tmp_path / 'det.csv'}:1: field score 'high' is not a number" in capsys.readouterr().err

    write(tmp_path / "det.csv", ["video_id,timestamp,x1,y1,x2,y2,action_id,score"])
    assert cli(args) == 2
    assert "det.csv:1: field timestamp 'timestamp' is not a whole number" in capsys.readouterr().err

    write(tmp_path / "det.csv", ["v,0902,0.1,0.2,0.5,0.9"])
    assert cli(args) == 2
    assert "det.csv:1: expected video_id,timestamp,x1,y1,x2,y2,action_id[,score] (7 or 8 columns), found 6" \
        in capsys.readouterr().err

    args[args.index("--detections") + 1] = str(tmp_path / "missing.csv")
    assert cli(args) == 2
    assert f"detections CSV {tmp_path / 'missing.csv'} does not exist" in capsys.readouterr().err

    write(tmp_path / "excluded.csv", ["v,0902,extra"])
    write(tmp_path / "det.csv", [line("v", 902, A, 1, 0.9)])
    args[args.index("--detections") + 1] = str(tmp_path / "det.csv")
    assert cli([*args, "--exclusions", str(tmp_path / "excluded.csv")]) == 2
    assert "excluded.csv:1: expected video_id,timestamp (2 columns), found 3" in capsys.readouterr().err


def test_groundtruth_with_the_box_corners_swapped_is_an_error(tmp_path):
    (tmp_path / "gt.csv").write_text("v,0902,0.5,0.0,0.1,0.5,1,0\n")
    with pytest.raises(AvaFormatError, match=r"gt.csv:1: box x1=0.5 y1=0 x2=0.1 y2=0.5 has x1 > x2"):
        ava_eval.read_groundtruth(str(tmp_path / "gt.csv"), {1})


def test_write_detections_csv_writes_the_official_format(tmp_path):
    """The writer: `video_id,timestamp(%04d),x1,y1,x2,y2(3 decimals),action_id,score(6 digits)`, which the
    reader (and the official script) takes back."""
    rows = [
        DetectionRow("vidA", 902, (0.12345, 0.5, 0.75, 1.0), 12, 0.987654321),
        DetectionRow("vidA", 1798, (0.0, 0.0, 0.5, 0.5), 1, 3.25e-05),
    ]
    path = tmp_path / "out" / "detections.csv"
    assert ava_eval.write_detections_csv(str(path), rows) == 2
    assert path.read_text() == ("vidA,0902,0.123,0.500,0.750,1.000,12,0.987654\n"
                                "vidA,1798,0.000,0.000,0.500,0.500,1,3.25e-05\n")
    frames = ava_eval.read_detections(str(path), {1, 12})
    assert list(frames) == ["vidA,0902", "vidA,1798"]
    assert frames["vidA,0902"].boxes.tolist() == [[0.123, 0.5, 0.75, 1.0]]
    assert frames["vidA,1798"].scores.tolist() == [3.25e-05]
    with pytest.raises(AvaFormatError, match="box must be x1,y1,x2,y2 with 0 <= x1 <= x2 <= 1"):
        ava_eval.write_detections_csv(str(path), [DetectionRow("v", 902, (0.5, 0.0, 0.25, 1.0), 1, 0.5)])
