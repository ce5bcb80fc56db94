"""Evaluate a checkpoint: multi-view, video-level top-1/top-5 on one split, with per-video predictions,
per-class accuracy and the confusion matrix, written next to the report and logged to MLflow.

Where it runs: one process here by default (`num_workers=0`, a laptop), or on the Ray cluster
(`num_workers >= 1`): Ray Data reads the shards and cuts the test views in CPU tasks, and an actor pool
of `num_workers` actors, each holding the model (a GPU each with `use_gpu=true`), scores them. Each video
is scored on its own (its views are one model batch: `scoring.video_probabilities`), so a video's
prediction does not depend on which actor scored it or on what else was in its batch: 1 worker and N
workers give the same per-video predictions.

Views: temporal x spatial, the recipe's by default (the checkpoint's clip.test_temporal_views /
clip.test_spatial_views), in the temporal-major order of pipelines/data/sampling.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from omegaconf import MISSING

from pipelines import artifact, plots, tracking
from pipelines.config import StageResult
from pipelines.data import storage
from pipelines.data.shards import DatasetError, read_manifest
from pipelines.detection.task import is_detection_dataset
from pipelines.raycluster import RayConfig
from pipelines.tracking import MlflowConfig

TOP_K = 5
PREDICTIONS = "predictions.parquet"


@dataclass
class EvaluateConfig:
    dataset: str = MISSING
    # a checkpoint (directory or its model.pt), a finished run's directory, or best | latest of `run_dir`
    checkpoint: str = MISSING
    run_dir: str = ""  # the training run's directory (`run_dir` of its result), for checkpoint=best | latest
    split: str = "val"
    temporal_views: int = 0  # evenly spaced clips per video (0: the recipe's, stored in the checkpoint; Kinetics: 5)
    spatial_views: int = 0  # crops along the long side (0: the recipe's; SSv2: 3)
    batch_size: int = 16  # videos handed to a worker at a time (each video is one model batch of its views)
    num_workers: int = 0  # 0: one process, here; >= 1: Ray Data actors holding the model (on the Ray cluster)
    cpus_per_worker: int = 1
    use_gpu: bool = False  # a GPU per worker
    output: str = ""  # report, predictions, per-class table, confusion matrix ("" = <checkpoint dir>/eval-<split>)
    # log metrics and the report into this run; "" = the run of `checkpoint` when it names a run directory,
    # else do not log
    mlflow_run_id: str = ""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    # How the evaluation runs, not what it computes (left out of the workflow's config hash).
    NOT_AFFECTING_OUTPUT: ClassVar[tuple[str, ...]] = ("ray", "num_workers", "cpus_per_worker", "use_gpu", "batch_size")

    def validate(self) -> None:
        for key in ("temporal_views", "spatial_views", "num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        if self.batch_size < 1 or self.cpus_per_worker < 1:
            raise ValueError("config keys 'batch_size' and 'cpus_per_worker' must be >= 1")


@dataclass
class EvaluateResult(StageResult):
    split: str
    videos: int
    temporal_views: int
    spatial_views: int
    top1: float | None  # None for AVA (detection): frame_map instead
    top5: float | None
    videos_per_s: float  # scoring throughput (decode + model), after the model is loaded
    checkpoint: str
    dataset: str
    dataset_digest: str
    output: str  # where the report, predictions.parquet, per_class.csv and confusion.csv are
    mlflow_run_id: str  # the run it is logged into ("" = not logged)
    tracking_uri: str  # where that run lives ("" = not logged)
    # AVA datasets (pipelines/evaluate/detection.py): frame-mAP@0.5; top1/top5 are then None, `videos` counts keyframes
    frame_map: float | None = None

    @property
    def metric_key(self) -> str:
        """The MLflow metric this evaluation is logged as."""
        return f"eval/{self.split}/{'top1' if self.frame_map is None else 'frame_map'}"

    def identity_tags(self) -> dict[str, str]:
        """What the numbers were measured on, as run tags next to the metrics (`register` compares two
        models only on evaluations with the same tags)."""
        return tracking.evaluation_tags(self.split, self.dataset_digest, f"{self.temporal_views}x{self.spatial_views}")


# ------------------------------------------------------------------------------------------------ scoring

def _predict_rows(model, samples, *, device, precision: str) -> list[dict]:
    """samples: (views, label, key) -> one row per video: key, label, top-5 ids and scores."""
    from pipelines.scoring import video_probabilities

    rows = []
    for views, label, key in samples:
        probs = video_probabilities(model, views, 1, device=device, precision=precision)[0]
        scores, ids = probs.topk(min(TOP_K, probs.numel()))
        rows.append({"key": key, "label": int(label), "top5_ids": ids.tolist(), "top5_scores": scores.tolist()})
    return rows


def _predict_locally(trained, urls: list[str], temporal: int, spatial: int) -> list[dict]:
    import torch

    from pipelines.data.loader import eval_samples

    return _predict_rows(trained.model, eval_samples(urls, trained.clip, temporal, spatial), device=torch.device("cpu"),
                         precision=str(trained.train_config.get("precision", "fp32")))


class _ViewCutter:
    """Ray Data flat_map: one shard URL -> its samples' test views (CPU tasks)."""

    def __init__(self, clip_dict: dict, temporal: int, spatial: int):
        from pipelines.data.clips import clip_config_from_stored

        self.clip, self.temporal, self.spatial = clip_config_from_stored(clip_dict), temporal, spatial

    def __call__(self, row: dict) -> list[dict]:
        from pipelines.data.loader import eval_samples

        return [{"key": key, "label": label, "views": views.numpy()}
                for views, label, key in eval_samples([row["url"]], self.clip, self.temporal, self.spatial)]


class _Predictor:
    """Ray Data actor: holds the model (built once from the checkpoint in the object store)."""

    def __init__(self, state_ref: list, use_gpu: bool):
        import ray
        import torch

        from pipelines.artifact import TrainedModel

        trained = TrainedModel.from_state(ray.get(state_ref[0]))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = trained.model.to(self.device)
        self.precision = str(trained.train_config.get("precision", "fp32"))

    def __call__(self, batch: dict) -> dict:
        import torch

        samples = ((torch.from_numpy(np.asarray(v)), int(y), str(k))
                   for v, y, k in zip(batch["views"], batch["label"], batch["key"]))
        rows = _predict_rows(self.model, samples, device=self.device, precision=self.precision)
        return {"key": [r["key"] for r in rows], "label": [r["label"] for r in rows],
                "top5_ids": [r["top5_ids"] for r in rows], "top5_scores": [r["top5_scores"] for r in rows]}


def _predict_on_ray(cfg: EvaluateConfig, state: dict, clip_dict: dict, urls: list[str], temporal: int,
                    spatial: int) -> list[dict]:
    import ray

    from pipelines.raycluster import ensure_ray

    ensure_ray(cfg.ray)
    slim = artifact.slim(state)
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=len(urls))
    ds = ds.flat_map(_ViewCutter, fn_constructor_kwargs={"clip_dict": clip_dict, "temporal": temporal, "spatial": spatial},
                     concurrency=max(1, cfg.num_workers), num_cpus=1)
    ds = ds.map_batches(_Predictor, fn_constructor_kwargs={"state_ref": [ray.put(slim)], "use_gpu": cfg.use_gpu},
                        batch_size=cfg.batch_size, concurrency=cfg.num_workers, num_cpus=cfg.cpus_per_worker,
                        num_gpus=1 if cfg.use_gpu else 0)
    return [{"key": r["key"], "label": int(r["label"]), "top5_ids": [int(i) for i in r["top5_ids"]],
             "top5_scores": [float(s) for s in r["top5_scores"]]} for r in ds.take_all()]


# ------------------------------------------------------------------------------------------------ outputs

def _default_output(checkpoint: str, split: str) -> str:
    directory = checkpoint.rsplit("/", 1)[0] if checkpoint.endswith(".pt") else checkpoint
    return storage.join(directory, f"eval-{split}")


def _write_outputs(out: str, report: EvaluateResult, predictions, per_class, confusion: np.ndarray,
                   labels: list[str], tracker) -> None:
    """report JSON, predictions.parquet, per_class.csv, confusion.csv and its PNG: under `out`, and (with a
    tracker) as artifacts of the run, the per-class table also as an MLflow table."""
    import pandas as pd

    split = report.split
    confusion_df = pd.DataFrame(confusion, index=pd.Index(labels, name="true"), columns=labels)
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            f"eval_{split}.json": json.dumps(report.to_dict(), indent=1).encode(),
            PREDICTIONS: _parquet(predictions),
            f"per_class_{split}.csv": per_class.to_csv(index=False).encode(),
            f"confusion_{split}.csv": confusion_df.to_csv().encode(),
        }
        for name, data in files.items():
            storage.write_bytes(storage.join(out, name), data)
            Path(tmp, name).write_bytes(data)
        png = os.path.join(tmp, f"confusion_matrix_eval_{split}.png")
        plots.confusion_matrix(confusion, labels, png)
        storage.write_bytes(storage.join(out, os.path.basename(png)), Path(png).read_bytes())
        if tracker is not None:
            for name in [*files, os.path.basename(png)]:
                tracker.log_artifact(os.path.join(tmp, name), f"eval/{split}" if name == PREDICTIONS else "eval")
            tracker.client.log_table(tracker.run_id, data=per_class, artifact_file=f"eval/per_class_{split}_table.json")


def _parquet(frame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def resolved_inputs(cfg: EvaluateConfig, manifest) -> tuple[EvaluateConfig, list[str], dict, artifact.TrainedModel]:
    """What both evaluations (classification here, detection in detection.py) start from: the split's shards,
    the checkpoint as named (a run directory, best|latest) resolved, with its MLflow run when the config
    names none, its state and rebuilt model, checked against the dataset's labels."""

    urls = manifest.shard_urls(cfg.dataset, cfg.split)
    if not urls:
        raise DatasetError(f"{cfg.dataset} has no '{cfg.split}' shards (splits: {sorted(manifest.splits)})")
    ref = artifact.resolve(cfg.checkpoint, cfg.run_dir)
    if ref.checkpoint != cfg.checkpoint:
        print(f"[evaluate] checkpoint={cfg.checkpoint}: {ref.checkpoint}", flush=True)
    cfg = dataclasses.replace(cfg, checkpoint=ref.checkpoint, mlflow_run_id=cfg.mlflow_run_id or ref.mlflow_run_id)
    state = artifact.load_state(cfg.checkpoint)
    trained = artifact.TrainedModel.from_state(state)
    if trained.label_map != manifest.label_map:
        raise DatasetError(f"the labels of checkpoint {cfg.checkpoint} differ from those of {cfg.dataset}")
    return cfg, urls, state, trained


def run(cfg: EvaluateConfig) -> EvaluateResult:
    import pandas as pd

    from pipelines.scoring import Score

    manifest = read_manifest(cfg.dataset)
    if is_detection_dataset(manifest):
        from pipelines.evaluate.detection import run_detection

        return run_detection(cfg, manifest)
    cfg, urls, state, trained = resolved_inputs(cfg, manifest)
    temporal = cfg.temporal_views or trained.clip.test_temporal_views
    spatial = cfg.spatial_views or trained.clip.test_spatial_views
    clip_dict = dict(state.get("train_config", {}).get("clip", {}))
    started = time.perf_counter()
    if cfg.num_workers:
        rows = _predict_on_ray(cfg, state, clip_dict, urls, temporal, spatial)
    else:
        rows = _predict_locally(trained, urls, temporal, spatial)
    seconds = time.perf_counter() - started
    rows.sort(key=lambda r: r["key"])
    predictions = pd.DataFrame(rows, columns=["key", "label", "top5_ids", "top5_scores"])
    labels = trained.labels
    score = Score.of(predictions["label"].to_numpy(), np.array([r["top5_ids"] for r in rows]).reshape(len(rows), -1),
                     len(labels))
    uri = tracking.connect(cfg.mlflow.tracking_uri) if cfg.mlflow_run_id else ""
    out = storage.absolute(cfg.output) if cfg.output else _default_output(cfg.checkpoint, cfg.split)
    report = EvaluateResult(split=cfg.split, videos=score.total, temporal_views=temporal, spatial_views=spatial,
                            top1=score.top1, top5=score.top5, videos_per_s=score.total / seconds if seconds else 0.0,
                            checkpoint=cfg.checkpoint, dataset=cfg.dataset, dataset_digest=manifest.digest(),
                            output=out, mlflow_run_id=cfg.mlflow_run_id, tracking_uri=uri)
    tracker = None
    if cfg.mlflow_run_id:
        tracker = tracking.MlflowTracker(uri, cfg.mlflow_run_id)
        tracking.log_config(tracker.client, cfg.mlflow_run_id, "evaluate", cfg)
        # One batch: the metrics and the tags saying what they were measured on change together.
        tracker.log_metrics({report.metric_key: report.top1, f"eval/{cfg.split}/top5": report.top5,
                             f"eval/{cfg.split}/videos_per_s": report.videos_per_s}, step=trained.step,
                            tags=report.identity_tags())
    _write_outputs(out, report, predictions, score.per_class(labels), score.confusion, labels, tracker)
    print(f"[evaluate] {cfg.split}: top1 {report.top1:.4f} top5 {report.top5:.4f} over {score.total} videos "
          f"({temporal} temporal x {spatial} spatial views, {report.videos_per_s:.2f} videos/s, "
          f"{cfg.num_workers or 'no'} Ray workers); outputs in {out}", flush=True)
    return report
