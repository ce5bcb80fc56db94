"""`mvit evaluate` on an AVA dataset: frame-mAP@0.5 of a detector checkpoint by the official rules.

Every keyframe of the split is scored once (the clip centred on it, the whole frame at test scale, the
person proposals scoring >= train.detection.test_score, or the groundtruth boxes when the checkpoint
says test_boxes=groundtruth). The predictions are written in the official CSV format and scored against
the official files next to the annotations the dataset was made from (pipelines/detection/scoring.py
`official_files`): the groundtruth CSV (rows of quarantined videos included: their persons count as
missed), the excluded timestamps, the ActivityNet 60-class label map when present. Logged into the
training run (with the tags saying what it was measured on, which `register`'s champion rule compares):
`eval/<split>/frame_map`, the per-class AP table, the predictions CSV and the report; the same files are
written under `output` (default <checkpoint dir>/eval-<split>), as for classification.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from pipelines import tracking
from pipelines.config import from_dict
from pipelines.data import storage
from pipelines.data.shards import DatasetError, Manifest
from pipelines.detection import ava_eval
from pipelines.detection.config import DetectionConfig
from pipelines.detection.scoring import frame_map, official_files, score_keyframes
from pipelines.evaluate.job import EvaluateConfig, EvaluateResult, _default_output, resolved_inputs


def ap_table(result: ava_eval.AvaResult) -> dict[str, list]:
    """The per-class table MLflow shows (columns of equal length; AP None where the class has no groundtruth)."""
    classes = result.classes
    return {"action_id": [c.id for c in classes], "action": [c.name for c in classes],
            "ap": [None if math.isnan(c.average_precision) else c.average_precision for c in classes],
            "groundtruth": [c.groundtruth for c in classes], "detections": [c.detections for c in classes]}


def run_detection(cfg: EvaluateConfig, manifest: Manifest) -> EvaluateResult:
    cfg, urls, _state, trained = resolved_inputs(cfg, manifest)
    if getattr(trained.model.cfg, "head", "cls") != "roi":
        raise DatasetError(f"{cfg.dataset} is an AVA (detection) dataset but checkpoint {cfg.checkpoint} is a classifier")
    det = from_dict(DetectionConfig, trained.train_config.get("detection", {}), origin="checkpoint train_config.detection")
    files = official_files(manifest, cfg.split)
    categories, _ = ava_eval.read_labelmap(files.labelmap)
    action_ids = sorted(index + 1 for index in manifest.label_map.values())
    precision = str(trained.train_config.get("precision", "fp32"))
    # In this process, on its CPU: the classification path's Ray Data scoring (evaluate/job.py) cuts
    # views per video and has no keyframe/box counterpart yet, so `num_workers` is not used here.
    started = time.perf_counter()
    scored, _ = score_keyframes(trained.model, urls, trained.clip, det, device=torch.device("cpu"),
                                batch_size=cfg.batch_size, precision=precision)
    seconds = time.perf_counter() - started
    uri = tracking.connect(cfg.mlflow.tracking_uri) if cfg.mlflow_run_id else ""
    out = storage.absolute(cfg.output) if cfg.output else _default_output(cfg.checkpoint, cfg.split)
    with tempfile.TemporaryDirectory() as tmp:
        detections = os.path.join(tmp, f"detections_{cfg.split}.csv")
        result = frame_map(scored, files.groundtruth, categories, action_ids, detections, files.exclusions)
        if math.isnan(result.mean_ap):
            raise DatasetError(f"no groundtruth box of the evaluated classes ({files.labelmap}) is left in "
                               f"{files.groundtruth} after the exclusions: nothing to score")
        report = EvaluateResult(split=cfg.split, videos=len(scored), temporal_views=1, spatial_views=1, top1=None,
                                top5=None, videos_per_s=len(scored) / seconds if seconds else 0.0,
                                checkpoint=cfg.checkpoint, dataset=cfg.dataset, dataset_digest=manifest.digest(),
                                output=out, mlflow_run_id=cfg.mlflow_run_id, tracking_uri=uri,
                                frame_map=result.mean_ap)
        table = ap_table(result)
        files_out = {
            f"eval_{cfg.split}.json": json.dumps({**report.to_dict(), "groundtruth": files.groundtruth,
                                                  "exclusions": files.exclusions, "labelmap": files.labelmap,
                                                  "per_class_ap": result.per_class}, indent=1).encode(),
            f"detections_{cfg.split}.csv": Path(detections).read_bytes(),
            f"ap_{cfg.split}.csv": _csv(table),
        }
        for name, data in files_out.items():
            storage.write_bytes(storage.join(out, name), data)
            Path(tmp, name).write_bytes(data)
        if cfg.mlflow_run_id:
            tracker = tracking.MlflowTracker(uri, cfg.mlflow_run_id)
            tracking.log_config(tracker.client, cfg.mlflow_run_id, "evaluate", cfg)
            # One batch: the metrics and the tags saying what they were measured on change together.
            tracker.log_metrics({report.metric_key: result.mean_ap,
                                 f"eval/{cfg.split}/videos_per_s": report.videos_per_s},
                                step=trained.step, tags=report.identity_tags())
            tracker.client.log_table(cfg.mlflow_run_id, data=table, artifact_file=f"eval/ap_{cfg.split}.json")
            for name in files_out:
                tracker.log_artifact(os.path.join(tmp, name), "eval")
    for c in result.classes:
        print(f"[evaluate] {c.id} {c.name}: AP {c.average_precision:.4f} ({c.groundtruth} groundtruth boxes)", flush=True)
    print(f"[evaluate] {cfg.split}: frame-mAP@0.5 {result.mean_ap:.4f} over {len(scored)} keyframes "
          f"({len(categories)} classes of {files.labelmap}, {report.videos_per_s:.2f} keyframes/s); outputs in {out}",
          flush=True)
    return report


def _csv(table: dict[str, list]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(list(table))
    writer.writerows(zip(*table.values()))
    return buffer.getvalue().encode()
