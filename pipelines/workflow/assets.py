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
from typing import Any

import dagster as dg

from pipelines.data import storage
from pipelines.stages import STAGES, Stage
from pipelines.workflow.config import (
    WorkflowConfig,
    WorkflowSettings,
    source_hash,
    stage_hash,
)
from pipelines.workflow.launch import run_stage

GROUP = "mvit"
ASSET_ORDER = ("raw_videos", *(stage.asset for stage in STAGES.values()))
STAGE_OF = {stage.asset: stage.name for stage in STAGES.values()}


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


def generate_synthetic_ava(settings: WorkflowSettings) -> tuple[str, int]:
    """Write the synthetic AVA set to raw_dir (through a temp dir and an upload when raw_dir is s3://); its
    train groundtruth CSV goes last and marks the set as complete."""
    from pipelines.data.sources.ava import CSV_FILES
    from pipelines.data.synthetic_ava import generate

    raw_dir, marker = settings.resolved_raw_dir(), CSV_FILES["train"]
    if not storage.is_s3(raw_dir):
        made = generate(raw_dir, settings.synthetic_ava)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            made = generate(tmp, settings.synthetic_ava)
            files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
            for path in sorted(files, key=lambda p: p.name == marker):
                storage.upload_file(path, storage.join(raw_dir, str(path.relative_to(tmp))))
    return storage.join(raw_dir, marker), len(made.videos)


def generate_synthetic(settings: WorkflowSettings) -> tuple[str, int]:
    """Write the synthetic set to raw_dir (through a temp dir and an upload when raw_dir is s3://)."""
    from pipelines.data.synthetic import generate

    if settings.synthetic_format == "ava":
        return generate_synthetic_ava(settings)
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
              description=f"the synthetic {settings.synthetic_format} set (pipelines/data/synthetic.py or "
                          "synthetic_ava.py), written to workflow.raw_dir")
    def raw_videos() -> dg.Output[dict]:
        labels_csv, videos = generate_synthetic(settings)
        fingerprint = source_fingerprint(settings.resolved_raw_dir())
        return _output({"source": labels_csv}, fingerprint, {"labels_csv": labels_csv, "videos": videos})

    return raw_videos


def _wired_config(stage: Stage, cfg: WorkflowConfig, upstream: dict[str, dict]) -> Any:
    """The stage's config with the keys that come from upstream assets filled in."""
    stage_cfg = getattr(cfg, stage.name)
    if "checkpoint" not in upstream:
        return stage_cfg
    trained = upstream["checkpoint"]
    # Log into the training run on the server training used: the train section's tracking_uri when the
    # stage has none ("" on both = $MLFLOW_TRACKING_URI, resolved where the stage runs; the resolved URI is
    # not copied in, so no credentials of the environment end up in a job's command line).
    mlflow = stage_cfg.mlflow
    if not mlflow.tracking_uri:
        mlflow = dataclasses.replace(mlflow, tracking_uri=cfg.train.mlflow.tracking_uri)
    return dataclasses.replace(stage_cfg, checkpoint=trained["checkpoint"], mlflow_run_id=trained["mlflow_run_id"],
                               mlflow=mlflow)


def _stage_asset(stage: Stage, cfg: WorkflowConfig, inputs: tuple[str, ...], deps: list, description: str,
                 kinds: set[str]):
    """The asset that runs `stage`: its value is the stage's result (a dict), its data version the stage
    table's, its metadata the whole result (what `runner.missing_output` checks) plus headline numbers."""

    @dg.asset(name=stage.asset, group_name=GROUP, deps=deps, kinds=kinds, description=description,
              code_version=f"{stage.name}-{stage_hash(stage.name, getattr(cfg, stage.name))}",
              ins={name: dg.AssetIn(name) for name in inputs})
    def materialize(**upstream: dict) -> dg.Output[dict]:
        result = run_stage(stage.name, _wired_config(stage, cfg, upstream), cfg.settings)
        value = result.to_dict()
        headline = {k: v for k, v in value.items() if isinstance(v, (int, float, str)) and k in HEADLINE}
        return _output(value, stage.data_version(result), {RESULT_KEY: dg.MetadataValue.json(value), **headline})

    return materialize


# Result fields also shown as separate metadata entries in Dagster's UI.
HEADLINE = ("digest", "num_samples", "quarantined", "shards", "checkpoint", "mlflow_run_id", "run_name",
            "top1", "top5", "frame_map", "videos", "model_uri", "version", "promoted")
RESULT_KEY = "result"


def build_assets(cfg: WorkflowConfig) -> list:
    raw_videos = _raw_videos_asset(cfg.settings)
    return [
        raw_videos,
        _stage_asset(STAGES["preprocess"], cfg, (), [raw_videos], "WebDataset shards + manifest.json (mvit preprocess)",
                     {"ray"}),
        _stage_asset(STAGES["train"], cfg, ("dataset",), [], "the trained checkpoint (mvit train: Ray Train DDP, "
                     "tracked in MLflow)", {"ray", "pytorch"}),
        _stage_asset(STAGES["evaluate"], cfg, ("checkpoint",), [], "multi-view top-1/top-5 of the checkpoint "
                     "(mvit evaluate), logged to its MLflow run", {"pytorch"}),
        _stage_asset(STAGES["register"], cfg, ("checkpoint", "evaluation"), [], "the model version in the MLflow "
                     "registry (mvit register; alias moves when better)", {"mlflow"}),
    ]


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
