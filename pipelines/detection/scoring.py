"""Frame-mAP of an AVA detector on stored keyframes: action scores for every test box, gathered over the
DDP ranks, written as the official prediction CSV and scored by the official evaluator's rules
(pipelines/detection/ava_eval.py).

Shared by the training loop (validation after each epoch, against the groundtruth the samples carry) and
`mvit evaluate` (against the official files next to the annotations: the groundtruth CSV with the rows
of every video, even those quarantined, the excluded timestamps, and the 60-class label map when
present), so both rank detections the same way.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipelines.data import storage
from pipelines.data.clips import ClipConfig
from pipelines.data.shards import DatasetError
from pipelines.data.sources.ava import CSV_FILES, EVALUATION_ACTION_LIST_FILE, EXCLUSION_FILES
from pipelines.data.sources.base import is_folder, parent
from pipelines.detection import ava_eval
from pipelines.detection.config import DetectionConfig
from pipelines.detection.data import Keyframe, eval_batches
from pipelines.scoring import precision_context


@dataclass
class FrameScores:
    """One keyframe's test boxes and the sigmoid score of every action for each (column = action id - 1)."""

    video_id: str
    timestamp: int
    boxes: np.ndarray  # (K, 4) normalised x1, y1, x2, y2
    scores: np.ndarray  # (K, num_classes)


@dataclass
class AvaFiles:
    """The official evaluation inputs of one split."""

    groundtruth: str
    exclusions: str | None
    labelmap: str


def gather(items: list) -> list:
    """Every rank's items, rank by rank (the list itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


@torch.no_grad()
def score_keyframes(model: torch.nn.Module, urls: list[str], clip: ClipConfig, det: DetectionConfig, *,
                    device: torch.device, batch_size: int, precision: str = "fp32") -> tuple[list[FrameScores], list[Keyframe]]:
    """Scores of this rank's keyframes (every keyframe of `urls`, once) and the groundtruth keyframes among them."""
    module = getattr(model, "module", model)  # DDP's forward would sync with ranks that have other batch counts
    was_training = module.training
    module.eval()
    scored: list[FrameScores] = []
    truth: list[Keyframe] = []
    for item in eval_batches(urls, clip, det, stride=module.feature_stride, batch_size=batch_size):
        batch = item.batch
        counts = batch.box_mask.sum(dim=1).tolist()
        scores = torch.zeros(0, module.num_classes)
        if sum(counts):
            with precision_context(precision, device):
                logits = module(batch.clips.to(device), batch.boxes.to(device), batch.box_mask.to(device))
            scores = logits.float().sigmoid().cpu()
        for (video_id, timestamp), boxes, part in zip(item.frames, item.normalised, scores.split(counts)):
            scored.append(FrameScores(video_id, timestamp, np.asarray(boxes, dtype=np.float64), part.numpy()))
        truth += [dataclasses.replace(k, media=b"") for k in item.groundtruth if len(k.boxes)]  # gathered: no video
    module.train(was_training)
    return scored, truth


def detection_rows(frames: Iterable[FrameScores], action_ids: list[int]) -> Iterator[ava_eval.DetectionRow]:
    """The official prediction rows: one per (keyframe, box, action)."""
    for frame in frames:
        for box, scores in zip(frame.boxes, frame.scores):
            corners = tuple(float(v) for v in box)
            for action_id in action_ids:
                yield ava_eval.DetectionRow(frame.video_id, frame.timestamp, corners, action_id,
                                            float(scores[action_id - 1]))


def _shortest(value: float) -> str:
    """The shortest decimal that reads back as the same float32 (the samples store boxes as float32:
    0.1 stays "0.1", not "0.10000000149011612")."""
    return np.format_float_positional(np.float32(value), trim="-")


def groundtruth_csv(keyframes: Iterable[Keyframe]) -> str:
    """The samples' groundtruth in the official CSV layout (one row per box and action)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for keyframe in keyframes:
        people = keyframe.person_ids or [-1] * len(keyframe.boxes)
        for box, actions, person in zip(keyframe.boxes, keyframe.actions, people):
            for action_id in actions:
                writer.writerow([keyframe.video_id, "%04d" % keyframe.t, *(_shortest(v) for v in box),
                                 action_id, person])
    return out.getvalue()


def categories_of(label_map: dict[str, int]) -> list[ava_eval.Category]:
    """Every class of a dataset's label map (index = action id - 1)."""
    return [ava_eval.Category(index + 1, name) for name, index in sorted(label_map.items(), key=lambda kv: kv[1])]


def annotation_folder(manifest) -> str:
    source = str(manifest.config.get("source", ""))
    if not source:
        raise DatasetError("the dataset's manifest does not name its source; cannot find the AVA annotation files")
    return source if is_folder(source) else parent(source)


def official_files(manifest, split: str) -> AvaFiles:
    """The official evaluation files next to the dataset's annotations: `ava_<split>_v2.2.csv`, its excluded
    timestamps (if present), and the 60-class ActivityNet label map if present (else the action list)."""
    folder = annotation_folder(manifest)
    if split not in CSV_FILES:
        raise DatasetError(f"AVA has no groundtruth CSV for split {split!r}; use one of {sorted(CSV_FILES)}")
    groundtruth = storage.join(folder, CSV_FILES[split])
    if not storage.exists(groundtruth):
        raise DatasetError(f"{groundtruth} does not exist: the AVA evaluation reads the official groundtruth next "
                           f"to the annotations the dataset was made from ({folder})")
    exclusions = storage.join(folder, EXCLUSION_FILES[split])
    labelmap = storage.join(folder, EVALUATION_ACTION_LIST_FILE)
    if not storage.exists(labelmap):
        labelmap = storage.join(folder, manifest.config.get("ava", {}).get("action_list", "ava_action_list_v2.2.pbtxt"))
    return AvaFiles(groundtruth, exclusions if storage.exists(exclusions) else None, labelmap)


def evaluation_categories(manifest) -> tuple[list[ava_eval.Category], str]:
    """The classes the official evaluation scores (the 60-class label map next to the annotations, when
    reachable), else every class of the label map; and where they came from."""
    try:
        labelmap = storage.join(annotation_folder(manifest), EVALUATION_ACTION_LIST_FILE)
        if storage.exists(labelmap):
            return ava_eval.read_labelmap(labelmap)[0], labelmap
    except (DatasetError, OSError):
        pass
    return categories_of(manifest.label_map), "the dataset's label map"


def frame_map(frames: list[FrameScores], groundtruth: str, categories: list[ava_eval.Category],
              action_ids: list[int], detections_csv: str, exclusions: str | None = None) -> ava_eval.AvaResult:
    """Write `frames` as the official prediction CSV at `detections_csv` and score it against the groundtruth
    CSV (official rules: the per-frame cap of 50, exclusions, VOC AP per class)."""
    rows = ava_eval.write_detections_csv(detections_csv, detection_rows(frames, action_ids))
    class_ids = {c.id for c in categories}
    print(f"[detection] {rows} prediction rows on {len(frames)} keyframes -> {detections_csv}", flush=True)
    return ava_eval.evaluate(ava_eval.read_groundtruth(groundtruth, class_ids),
                             ava_eval.read_detections(detections_csv, class_ids), categories,
                             ava_eval.read_exclusions(exclusions))


def validation_map(frames: list[FrameScores], truth: list[Keyframe], categories: list[ava_eval.Category],
                   action_ids: list[int]) -> ava_eval.AvaResult:
    """Frame-mAP against the groundtruth the samples carry (training's per-epoch validation)."""
    with tempfile.TemporaryDirectory() as tmp:
        gt_path = os.path.join(tmp, "groundtruth.csv")
        with open(gt_path, "w") as handle:
            handle.write(groundtruth_csv(truth))
        return frame_map(frames, gt_path, categories, action_ids, os.path.join(tmp, "detections.csv"))
