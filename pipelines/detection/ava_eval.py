"""AVA v2.2 frame-mAP@0.5, by the rules of the official ActivityNet evaluator.

(One module of ~410 lines on purpose: reading, matching and AP are one protocol whose rules, R1-R14
below, cite each other; the tests cite them by number.)

Where the rules were read: activitynet/ActivityNet `Evaluation/get_ava_performance.py` (reading the
files, the per-frame cap, exclusions) and `Evaluation/ava/object_detection_evaluation.py`,
`Evaluation/ava/per_image_evaluation.py`; facebookresearch/SlowFast vendors the same evaluator under
`slowfast/utils/ava_evaluation/` (`metrics.py`: precision/recall and AP, `np_box_ops.py`: IoU,
`np_box_list.py`) with `slowfast/utils/ava_eval_helper.py` as its reader. This is our own numpy code;
it reproduces these rules, numbered as the tests cite them:

Reading
 R1 A frame is keyed `"<video_id>,<timestamp as %04d>"`: timestamps `902` and `0902` are one frame.
 R2 Rows whose action id is not in the label map are skipped as they are read (before R4's cap).
 R3 A row's 8th column is read as its score; a 7-column row scores 1.0. For groundtruth the 8th column
    is the person id: it only decides the order of the frame's boxes (R5), which matters only when a
    detection overlaps two same-class groundtruth boxes equally (R9 then takes the first).
 R4 Detections: at most `capacity` (50) rows per frame, all classes together. The official reader keeps
    a min-heap of `(score, action_id, y1, x1, y2, x2)` per frame; a row replaces the heap's smallest
    entry only with a strictly higher score. We keep the same heap, so even ties at the cut agree.
 R5 A frame's rows are then ordered by descending score (a stable sort of that heap's list), for
    groundtruth (uncapped) as well; this is the order of the greedy matching (R9).
 R6 Excluded frames (`video_id,timestamp` rows) lose both their groundtruth and their detections.
Matching, per frame and class
 R7 Detections with x2 <= x1 or y2 <= y1 (no area) are dropped, not counted as false positives.
 R8 IoU = intersection / (area_a + area_b - intersection), computed in that order.
 R9 Greedy in R5's order: a detection looks only at the groundtruth box it overlaps most (the first of
    equals); IoU >= 0.5 (0.5 itself matches) with that box not yet taken makes it a true positive and
    takes the box. Anything else is a false positive, also when another, untaken box overlaps it by
    >= 0.5, and a second detection of a taken box (a duplicate).
R10 Detections on a frame without groundtruth of their class (or without groundtruth at all) are false
    positives.
Average precision, per class over all frames
R11 The class's detections are pooled frame after frame, frames in the order they first appear in the
    detections file, and ranked by `numpy.argsort(scores)` reversed. That default sort is not stable:
    equal scores end up wherever numpy leaves them, reversed (for two equal scores: the later one
    first). We make the same call on an identically ordered array, so ties rank as in the official
    script under the same numpy.
R12 precision_k = TP_k / k, recall_k = TP_k / N_groundtruth; recall is padded with 0 and 1, precision
    with 0 and 0; precision is made non-increasing (each value the max of itself and all later ones);
    AP = sum over k where recall changes of (recall_k - recall_k-1) * precision_k (PASCAL VOC).
R13 A class with groundtruth but no detections has AP 0. A class without groundtruth (after R6) has AP
    NaN and is left out of the mean.
R14 frame-mAP = nanmean of the APs, taken over an array indexed by class id (1..max id) as the official
    `ObjectDetectionEvaluation` does, so that even the summation order agrees.

Where we differ (input checking only): rows with a non-numeric or non-finite field, a header row, a box
outside [0, 1] or with x1 > x2 / y1 > y2, a video id with spaces around it, and exclusion rows without
exactly two columns are errors naming file, line and field. The official script crashes on some of these
without saying where (non-numeric fields, a header, flipped groundtruth boxes, exclusion rows of another
width) and silently takes the others (it drops flipped detections, keys a padded video id apart, and
does not look at the range). Blank lines are skipped (the official script fails on them). The label
map is read with the project's pbtxt parser (`parse_action_list`), which accepts the official files and
also one-line blocks the official line-based reader would miss. SlowFast's own in-training evaluation
differs from the official script in two ways we do not copy: no per-frame cap and no per-frame sort by
score (it matches in file order).
"""

from __future__ import annotations

import csv
import heapq
import io
import math
import warnings
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.data import storage
from pipelines.data.sources.ava import parse_action_list
from pipelines.data.sources.base import SourceError

IOU_THRESHOLD = 0.5
OFFICIAL_CAPACITY = 50  # detections per frame that get_ava_performance.py keeps (0: no cap)
COLUMNS = "video_id,timestamp,x1,y1,x2,y2,action_id"
BOX_FIELDS = ("x1", "y1", "x2", "y2")


class AvaFormatError(ValueError):
    """An evaluation input cannot be used; the message names the file, line and field and what to do."""


@dataclass(frozen=True)
class Category:
    id: int
    name: str


@dataclass(frozen=True, eq=False)
class FrameBoxes:
    """One frame's rows in the official per-frame order (R5: descending score)."""

    boxes: np.ndarray  # (N, 4) float64 x1, y1, x2, y2, normalised to [0, 1]
    labels: np.ndarray  # (N,) int64 action ids
    scores: np.ndarray  # (N,) float64 (groundtruth: its 8th column or 1.0, see R3)


# image key (R1) -> that frame's rows; frames in the order they first appear in their file (R11).
Frames = dict[str, FrameBoxes]


@dataclass(frozen=True)
class DetectionRow:
    """One line of a prediction CSV: one action score of one person box on one keyframe."""

    video_id: str
    timestamp: int  # keyframe, whole seconds of the movie
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 normalised to [0, 1]
    action_id: int
    score: float


@dataclass(frozen=True)
class ClassResult:
    id: int
    name: str
    average_precision: float  # NaN: no groundtruth of this class (R13)
    groundtruth: int  # boxes counted (after exclusions)
    detections: int  # detections ranked (after the cap, exclusions and R7)


@dataclass(frozen=True)
class AvaResult:
    classes: tuple[ClassResult, ...]  # in label-map order
    mean_ap: float  # frame-mAP@0.5 (R14); NaN when no class has groundtruth

    @property
    def per_class(self) -> dict[str, float]:
        return {c.name: c.average_precision for c in self.classes}


def image_key(video_id: str, timestamp: int) -> str:
    """R1: the official frame key, e.g. `"-5KQ66BBWC4,0902"`."""
    return "%s,%04d" % (video_id, timestamp)


# --- reading -----------------------------------------------------------------------------------------

def _read_text(path: str, what: str) -> str:
    if not storage.exists(path):
        raise AvaFormatError(f"{what} {path} does not exist; check the path")
    try:
        return storage.read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AvaFormatError(f"{what} {path} is not UTF-8 text ({exc})") from None


def _csv_rows(path: str, what: str) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank CSV row."""
    reader = csv.reader(io.StringIO(_read_text(path, what)))
    for row in reader:
        if row and "".join(row).strip():
            yield reader.line_num, row


def _video_id(value: str, where: str) -> str:
    if not value or value != value.strip():
        raise AvaFormatError(f"{where}: field video_id {value!r} is empty or has spaces around it")
    return value


def _timestamp(value: str, where: str) -> int:
    try:
        seconds = int(value)
    except ValueError:
        raise AvaFormatError(f"{where}: field timestamp {value!r} is not a whole number of seconds "
                             "(AVA CSVs have no header row)") from None
    if seconds < 0:
        raise AvaFormatError(f"{where}: field timestamp {value!r} is negative")
    return seconds


def _number(value: str, field: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise AvaFormatError(f"{where}: field {field} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise AvaFormatError(f"{where}: field {field} {value!r} is not a finite number")
    return number


def _box(fields: Sequence[str], where: str) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (_number(value, name, where) for value, name in zip(fields, BOX_FIELDS))
    for value, name in zip((x1, y1, x2, y2), BOX_FIELDS):
        if not 0.0 <= value <= 1.0:
            raise AvaFormatError(f"{where}: field {name} {value:g} is outside [0, 1]; boxes are x1,y1,x2,y2 "
                                 "normalised by the frame's width and height")
    if x1 > x2 or y1 > y2:
        raise AvaFormatError(f"{where}: box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g} has x1 > x2 or y1 > y2; "
                             "columns are x1,y1,x2,y2 (top-left, bottom-right)")
    return x1, y1, x2, y2


def _read_frames(path: str, what: str, last_column: str, class_ids: Collection[int] | None,
                 capacity: int) -> Frames:
    """R1-R5 for either file: rows -> per-frame heaps (capped when capacity > 0) -> frames sorted by score."""
    heaps: dict[str, list[tuple[float, int, float, float, float, float]]] = {}
    for line, row in _csv_rows(path, what):
        where = f"{path}:{line}"
        if len(row) not in (7, 8):
            raise AvaFormatError(f"{where}: expected {COLUMNS}[,{last_column}] (7 or 8 columns), "
                                 f"found {len(row)} columns")
        key = image_key(_video_id(row[0], where), _timestamp(row[1], where))
        x1, y1, x2, y2 = _box(row[2:6], where)
        try:
            action_id = int(row[6])
        except ValueError:
            raise AvaFormatError(f"{where}: field action_id {row[6]!r} is not an integer") from None
        score = _number(row[7], last_column, where) if len(row) == 8 else 1.0  # R3
        if class_ids and action_id not in class_ids:  # R2 (an empty label map filters nothing, as officially)
            continue
        # R4: the official heap entry, field for field: its tuple order decides ties at the cap and R5's order.
        entry = (score, action_id, y1, x1, y2, x2)
        heap = heaps.setdefault(key, [])
        if capacity < 1 or len(heap) < capacity:
            heapq.heappush(heap, entry)
        elif score > heap[0][0]:
            heapq.heapreplace(heap, entry)
    frames: Frames = {}
    for key, heap in heaps.items():
        ordered = sorted(heap, key=lambda entry: -entry[0])  # R5: stable, so ties keep the heap's order
        frames[key] = FrameBoxes(
            boxes=np.array([[x1, y1, x2, y2] for _, _, y1, x1, y2, x2 in ordered], dtype=np.float64),
            labels=np.array([entry[1] for entry in ordered], dtype=np.int64),
            scores=np.array([entry[0] for entry in ordered], dtype=np.float64),
        )
    return frames


def read_labelmap(path: str) -> tuple[list[Category], set[int]]:
    """The classes to evaluate, in file order, and their ids (the official `read_labelmap`'s pair). Both
    spellings of the pbtxt are read: `label { name: ".." label_id: N }` and `item { name: ".." id: N }`."""
    try:
        actions = parse_action_list(_read_text(path, "label map"), path)
    except SourceError as exc:
        raise AvaFormatError(str(exc)) from None
    for class_id, name in actions.items():
        if class_id < 1:
            raise AvaFormatError(f"{path}: class {name!r} has id {class_id}; the evaluator needs ids >= 1")
    categories = [Category(class_id, name) for class_id, name in actions.items()]
    return categories, {c.id for c in categories}


def read_groundtruth(path: str, class_ids: Collection[int] | None) -> Frames:
    """`video_id,timestamp,x1,y1,x2,y2,action_id[,person_id]` rows of the label map's classes (R1-R3, R5)."""
    return _read_frames(path, "groundtruth CSV", "person_id", class_ids, capacity=0)


def read_detections(path: str, class_ids: Collection[int] | None, capacity: int = OFFICIAL_CAPACITY) -> Frames:
    """`video_id,timestamp,x1,y1,x2,y2,action_id,score` rows of the label map's classes, at most `capacity`
    per frame (R1-R5; 0: no cap, as SlowFast's in-training evaluation)."""
    if capacity < 0:
        raise AvaFormatError(f"capacity must be >= 0 (0: no cap), got {capacity}")
    return _read_frames(path, "detections CSV", "score", class_ids, capacity=capacity)


def read_exclusions(path: str | None) -> set[str]:
    """R6: the frame keys of a `video_id,timestamp` CSV (an empty set for None)."""
    excluded: set[str] = set()
    if path is None:
        return excluded
    for line, row in _csv_rows(path, "exclusions CSV"):
        where = f"{path}:{line}"
        if len(row) != 2:
            raise AvaFormatError(f"{where}: expected video_id,timestamp (2 columns), found {len(row)} columns")
        excluded.add(image_key(_video_id(row[0], where), _timestamp(row[1], where)))
    return excluded


# --- matching and AP ---------------------------------------------------------------------------------

def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(N, M) IoU of x1,y1,x2,y2 boxes (R8: the official expression; products commute exactly, so
    keeping x before y changes no bit)."""
    x1, y1, x2, y2 = (boxes[:, k:k + 1] for k in range(4))
    ox1, oy1, ox2, oy2 = (others[:, k] for k in range(4))
    heights = np.maximum(0.0, np.minimum(y2, oy2) - np.maximum(y1, oy1))
    widths = np.maximum(0.0, np.minimum(x2, ox2) - np.maximum(x1, ox1))
    intersection = heights * widths
    area = (y2 - y1) * (x2 - x1)
    other_area = (oy2 - oy1) * (ox2 - ox1)
    return intersection / (area + other_area[None, :] - intersection)


def greedy_match(detections: np.ndarray, groundtruth: np.ndarray, threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """R9/R10: true-positive flags of one frame's detections of one class (rows in R5's order)."""
    is_tp = np.zeros(len(detections), dtype=bool)
    if len(detections) == 0 or len(groundtruth) == 0:
        return is_tp
    overlaps = box_iou(detections, groundtruth)
    best = overlaps.argmax(axis=1)  # first of equals
    taken = np.zeros(len(groundtruth), dtype=bool)
    for i, gt in enumerate(best):
        # Only the best-overlapping box is considered: if it is taken, the detection is a false positive.
        if overlaps[i, gt] >= threshold and not taken[gt]:
            is_tp[i] = taken[gt] = True
    return is_tp


def average_precision(scores: np.ndarray, is_tp: np.ndarray, num_groundtruth: int) -> float:
    """R11-R13: PASCAL VOC AP of one class's pooled detections."""
    if num_groundtruth == 0:
        return math.nan
    if scores.size == 0:
        return 0.0
    ranked = is_tp[np.argsort(scores)[::-1]].astype(int)  # R11: the official call, ties included
    true_pos = np.cumsum(ranked)
    false_pos = np.cumsum(1 - ranked)
    precision = np.concatenate([[0.0], true_pos.astype(float) / (true_pos + false_pos), [0.0]])
    recall = np.concatenate([[0.0], true_pos.astype(float) / num_groundtruth, [1.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def evaluate(
    groundtruth: Frames,
    detections: Frames,
    labelmap: Sequence[Category],
    exclusions: Collection[str] | None = None,
) -> AvaResult:
    """Per-class AP and frame-mAP@0.5 of `detections` against `groundtruth` (see R6-R14). Rows of classes
    outside `labelmap` are ignored here too, so frames built in memory behave like files read with it."""
    categories = list(labelmap)
    if not categories:
        raise AvaFormatError("the label map has no classes")
    class_ids = {c.id for c in categories}
    excluded = set(exclusions or ())

    num_groundtruth = dict.fromkeys(class_ids, 0)
    for key, frame in groundtruth.items():
        if key in excluded:  # R6
            continue
        for label in frame.labels.tolist():
            if label in num_groundtruth:
                num_groundtruth[label] += 1

    pooled: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {c: ([], []) for c in class_ids}
    known = np.array(sorted(class_ids), dtype=np.int64)
    for key, frame in detections.items():
        if key in excluded:  # R6
            continue
        boxes = frame.boxes
        keep = (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3]) & np.isin(frame.labels, known)  # R7
        boxes, labels, scores = boxes[keep], frame.labels[keep], frame.scores[keep]
        truth = groundtruth.get(key)
        for class_id in np.unique(labels).tolist():
            mine = labels == class_id
            truth_boxes = truth.boxes[truth.labels == class_id] if truth is not None else np.empty((0, 4))
            pooled[class_id][0].append(scores[mine])
            pooled[class_id][1].append(greedy_match(boxes[mine], truth_boxes))

    results, by_id = [], np.full(max(class_ids), np.nan)
    for category in categories:
        score_parts, tp_parts = pooled[category.id]
        scores = np.concatenate(score_parts) if score_parts else np.empty(0)
        is_tp = np.concatenate(tp_parts) if tp_parts else np.empty(0, dtype=bool)
        ap = average_precision(scores, is_tp, num_groundtruth[category.id])
        by_id[category.id - 1] = ap
        results.append(ClassResult(category.id, category.name, ap, num_groundtruth[category.id], len(scores)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: no class has groundtruth
        mean_ap = float(np.nanmean(by_id))
    return AvaResult(tuple(results), mean_ap)


def evaluate_files(
    groundtruth: str,
    detections: str,
    labelmap: str,
    exclusions: str | None = None,
    capacity: int = OFFICIAL_CAPACITY,
) -> AvaResult:
    """The official script's run on files (local paths or s3:// URIs)."""
    categories, class_ids = read_labelmap(labelmap)
    return evaluate(
        read_groundtruth(groundtruth, class_ids),
        read_detections(detections, class_ids, capacity),
        categories,
        read_exclusions(exclusions),
    )


# --- writing -----------------------------------------------------------------------------------------

def format_detection(row: DetectionRow, box_decimals: int = 3, score_digits: int = 6) -> str:
    """One line of the official prediction format `video_id,timestamp,x1,y1,x2,y2,action_id,score`:
    the timestamp as in the official files (`0902`), boxes to `box_decimals` places (the annotations'
    precision), scores to `score_digits` significant digits (fixed decimals would turn small sigmoid
    scores into ties)."""
    where = f"detection {row}"
    if not row.video_id or row.video_id != row.video_id.strip() or any(c in row.video_id for c in ',"\n\r'):
        raise AvaFormatError(f"{where}: video_id must be non-empty, without spaces around it, commas or quotes")
    if int(row.timestamp) != row.timestamp or row.timestamp < 0:
        raise AvaFormatError(f"{where}: timestamp must be a whole number of seconds >= 0")
    x1, y1, x2, y2 = (float(v) for v in row.box)
    if not (0.0 <= x1 <= x2 <= 1.0 and 0.0 <= y1 <= y2 <= 1.0):
        raise AvaFormatError(f"{where}: box must be x1,y1,x2,y2 with 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1")
    if not math.isfinite(row.score):
        raise AvaFormatError(f"{where}: score must be finite")
    box = ",".join(f"{v:.{box_decimals}f}" for v in (x1, y1, x2, y2))
    return f"{row.video_id},{int(row.timestamp):04d},{box},{int(row.action_id)},{row.score:.{score_digits}g}"


def write_detections_csv(path: str, rows: Iterable[DetectionRow], *, box_decimals: int = 3,
                         score_digits: int = 6) -> int:
    """Write `rows` as an official prediction CSV (no header) to a local path or s3:// URI, atomically.
    Returns the number of rows written."""
    lines = [format_detection(row, box_decimals, score_digits) for row in rows]
    storage.write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))
    return len(lines)
