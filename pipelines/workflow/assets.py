"""Dagster assets over the stages: raw_videos -> dataset -> checkpoint -> evaluation -> registered_model.

Every asset declares
  * a code version = the hash of its stage's config (pipelines/workflow/config.py `stage_hash`: the
    config without the keys wired from upstream and without where it runs), and
  * a data version of what it produced: the manifest digest of the dataset, the checkpoint URI, a hash of
    the evaluation report, the registered model version.
Dagster records both with each materialization, with the data versions of the inputs it read; an asset
is stale when its code version or an input's data version differs from the recorded ones (see
pipelines/workflow/runner.py, which also checks that the recorded output still exists).

The raw videos are an observable source asset when `workflow.source` names an existing set (its data
version is a fingerprint of the annotation file or of the folder listing, taken at each run), or an
asset that generates the synthetic set when it does not.
"""

# no `from __future__ import annotations`: Dagster reads the asset functions' type hints at definition time
import dataclasses
import hashlib
import json
import tempfile
import warnings
from pathlib import Path

import dagster as dg

from pipelines.data import storage
from pipelines.workflow.config import (
    WorkflowConfig,
    WorkflowSettings,
    source_hash,
    stage_hash,
)
from pipelines.workflow.stages import run_stage

GROUP = "mvit"
ASSET_ORDER = ("raw_videos", "dataset", "checkpoint", "evaluation", "registered_model")
STAGE_OF = {"dataset": "preprocess", "checkpoint": "train", "evaluation": "evaluate", "registered_model": "register"}


def _output(value: dict, data_version: str, metadata: dict | None = None) -> dg.Output:
    """An asset's value with the data version Dagster records for it."""
    with warnings.catch_warnings():
        # `Output(data_version=...)` is marked beta in Dagster 1.x; data-version staleness is built on it
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(value, data_version=dg.DataVersion(data_version), metadata=metadata or {})


def _digest(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_fingerprint(uri: str) -> str:
    """Identity of a raw video set: the annotation file's bytes, or (relative path, size) of every file
    under a folder/prefix. (Replacing a video in place under an unchanged annotation file is not seen:
    run the workflow with `--force --only preprocess` then.)"""
    is_file = storage.exists(uri) if storage.is_s3(uri) else storage.local_path(uri).is_file()
    if is_file:
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]
    prefix = uri.rstrip("/")
    listing = [(path[len(prefix):], size) for path, size in storage.list_files(prefix)]
    if not listing:
        raise FileNotFoundError(f"workflow.source {uri} is neither a file nor a folder holding videos")
    return _digest(listing)


def generate_synthetic(settings: WorkflowSettings) -> tuple[str, int]:
    """Write the synthetic set to raw_dir (through a temp dir and an upload when raw_dir is s3://)."""
    from pipelines.data.synthetic import generate

    spec = settings.synthetic
    raw_dir = settings.resolved_raw_dir()
    if not storage.is_s3(raw_dir):
        generate(raw_dir, spec)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = generate(tmp, spec)
            # labels.csv goes last: a prefix without it is an unfinished upload
            for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file() and p != csv_path):
                storage.upload_file(path, storage.join(raw_dir, str(path.relative_to(tmp))))
            storage.upload_file(csv_path, storage.join(raw_dir, "labels.csv"))
    return storage.join(raw_dir, "labels.csv"), spec.classes * spec.videos_per_class


def _raw_videos_asset(settings: WorkflowSettings):
    if settings.source:
        @dg.observable_source_asset(
            key="raw_videos", group_name=GROUP,
            description=f"raw videos at {settings.source} (observed: fingerprint of the annotations/listing)",
        )
        def raw_videos():
            return dg.DataVersion(source_fingerprint(settings.source))

        return raw_videos

    @dg.asset(key="raw_videos", group_name=GROUP, code_version=f"synthetic-{source_hash(settings)}",
              description="the synthetic motion set (pipelines/data/synthetic.py), written to workflow.raw_dir")
    def raw_videos() -> dg.Output[dict]:
        labels_csv, videos = generate_synthetic(settings)
        fingerprint = source_fingerprint(settings.resolved_raw_dir())
        return _output({"source": labels_csv}, fingerprint, {"labels_csv": labels_csv, "videos": videos})

    return raw_videos


def build_assets(cfg: WorkflowConfig) -> list:
    settings = cfg.settings
    raw_videos = _raw_videos_asset(settings)

    @dg.asset(deps=[raw_videos], group_name=GROUP, kinds={"ray"},
              code_version=f"preprocess-{stage_hash('preprocess', cfg.preprocess)}",
              description="WebDataset shards + manifest.json (mvit preprocess)")
    def dataset() -> dg.Output[dict]:
        from pipelines.data.shards import read_manifest

        run_stage("preprocess", cfg.preprocess, settings)
        manifest = read_manifest(cfg.preprocess.output)
        value = {"prefix": cfg.preprocess.output, "digest": manifest.digest(), "num_samples": manifest.num_samples,
                 "quarantined": manifest.quarantined, "splits": manifest.splits, "labels": manifest.labels}
        return _output(value, manifest.digest(), {
            "manifest": storage.join(cfg.preprocess.output, "manifest.json"), "digest": manifest.digest(),
            "num_samples": manifest.num_samples, "quarantined": manifest.quarantined, "shards": len(manifest.shards)})

    @dg.asset(group_name=GROUP, kinds={"ray", "pytorch"},
              code_version=f"train-{stage_hash('train', cfg.train)}",
              description="the trained checkpoint (mvit train: Ray Train DDP, tracked in MLflow)")
    def checkpoint(dataset: dict) -> dg.Output[dict]:
        from pipelines.train.job import checkpoint_file

        result = run_stage("train", cfg.train, settings)
        value = {k: result[k] for k in ("checkpoint", "mlflow_run_id", "tracking_uri", "run_name", "run_dir")}
        value["dataset_digest"] = dataset["digest"]
        return _output(value, _digest(result["checkpoint"]), {
            "checkpoint_file": checkpoint_file(result["checkpoint"]), "mlflow_run_id": result["mlflow_run_id"],
            "tracking_uri": result["tracking_uri"], "run_name": result["run_name"]})

    def _downstream_config(stage_cfg, ckpt: dict):
        # Log into the training run on the server training used: the train section's tracking_uri when the
        # stage has none ("" on both = $MLFLOW_TRACKING_URI, resolved where the stage runs; the resolved URI is
        # not copied in, so no credentials of the environment end up in a job's command line).
        mlflow = stage_cfg.mlflow
        if not mlflow.tracking_uri:
            mlflow = dataclasses.replace(mlflow, tracking_uri=cfg.train.mlflow.tracking_uri)
        return dataclasses.replace(stage_cfg, checkpoint=ckpt["checkpoint"], mlflow_run_id=ckpt["mlflow_run_id"],
                                   mlflow=mlflow)

    @dg.asset(group_name=GROUP, kinds={"pytorch"},
              code_version=f"evaluate-{stage_hash('evaluate', cfg.evaluate)}",
              description="multi-view top-1/top-5 of the checkpoint (mvit evaluate), logged to its MLflow run")
    def evaluation(checkpoint: dict) -> dg.Output[dict]:
        eval_cfg = _downstream_config(cfg.evaluate, checkpoint)
        report = run_stage("evaluate", eval_cfg, settings)
        return _output(report, _digest(report), {
            "top1": float(report["top1"]), "top5": float(report["top5"]), "videos": int(report["videos"]),
            "mlflow_run_id": checkpoint["mlflow_run_id"], "tracking_uri": checkpoint["tracking_uri"],
            "metric_key": f"eval/{eval_cfg.split}/top1"})

    @dg.asset(group_name=GROUP, kinds={"mlflow"},
              code_version=f"register-{stage_hash('register', cfg.register)}",
              description="the model version in the MLflow registry (mvit register; alias moves when better)")
    def registered_model(checkpoint: dict, evaluation: dict) -> dg.Output[dict]:
        reg_cfg = _downstream_config(cfg.register, checkpoint)
        registered = run_stage("register", reg_cfg, settings)
        return _output(registered, registered["model_uri"], {
            "model_uri": registered["model_uri"], "model_name": reg_cfg.model_name,
            "version": int(registered["version"]), "promoted": bool(registered["promoted"]),
            "tracking_uri": checkpoint["tracking_uri"]})

    return [raw_videos, dataset, checkpoint, evaluation, registered_model]


def io_manager(settings: WorkflowSettings) -> dg.FilesystemIOManager:
    """Asset values (small dicts of URIs and ids) pickled under the Dagster home, where `dagster dev` with
    the same DAGSTER_HOME finds them too."""
    return dg.FilesystemIOManager(base_dir=str(settings.resolved_dagster_home() / "storage"))


def build_definitions(cfg: WorkflowConfig) -> dg.Definitions:
    return dg.Definitions(
        assets=build_assets(cfg),
        resources={"io_manager": io_manager(cfg.settings)},
        jobs=[dg.define_asset_job("mvit_workflow", selection=dg.AssetSelection.all())],
    )
