"""The stage table: the one place that says what each stage of the pipeline is.

For every stage: its typed config, the `mvit` subcommand and config section (its name), the function that
runs it and its typed result, the keys the workflow wires from upstream (and the workflow key to set
instead), the keys that do not change its output, the data version Dagster records for its output, and
the check that the recorded output still exists. `mvit <stage>` (cli.py), the Dagster workflow
(workflow/) and `mvit demo` all read it; none of them lists the stages again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.config import StageResult
from pipelines.data import storage
from pipelines.data.shards import MANIFEST
from pipelines.evaluate.job import EvaluateConfig, EvaluateResult
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.job import PreprocessResult
from pipelines.register.job import RegisterConfig, RegisterResult
from pipelines.train.config import TrainConfig
from pipelines.train.job import TrainResult


@dataclass(frozen=True)
class Stage:
    name: str  # the `mvit <name>` subcommand and the config section
    asset: str  # the Dagster asset it materializes
    help: str
    config: type
    result: type[StageResult]
    run: Callable[[Any], StageResult]
    # Keys the workflow sets (from its settings or the upstream asset) -> the workflow key a user should
    # set instead (None: the value is the upstream asset's output).
    wired: Mapping[str, str | None]
    # Keys that change how the stage runs, not what it produces (left out of the workflow's config hash).
    not_affecting_output: tuple[str, ...]
    data_version: Callable[[Any], str]  # identity of the produced output, recorded by Dagster
    output_missing: Callable[[Any], str | None]  # why the recorded output is gone, or None


def _digest(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- runners: the functions behind `mvit <stage>` (imported when run: torch and Ray load only then) ----------
def _preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    from pipelines.preprocess.job import run

    return PreprocessResult.of(storage.absolute(cfg.output), run(cfg))


def _train(cfg: TrainConfig) -> TrainResult:
    from pipelines.train.job import run

    return run(cfg)


def _evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    from pipelines.evaluate.job import run

    return run(cfg)


def _register(cfg: RegisterConfig) -> RegisterResult:
    from pipelines.register.job import run

    return run(cfg)


# --- output checks ----------------------------------------------------------------------------------------
def _missing(uri: str) -> str | None:
    return None if storage.exists(uri) else f"{uri} is gone"


def _checkpoint_missing(result: TrainResult) -> str | None:
    from pipelines import artifact

    return _missing(artifact.checkpoint_file(result.checkpoint))


def _evaluation_missing(result: EvaluateResult) -> str | None:
    import mlflow

    from pipelines import tracking

    if not result.mlflow_run_id:
        return None  # not logged anywhere: the report is the output
    # A result names its server without credentials: those of this process's config/environment apply.
    uri = tracking.connect(result.tracking_uri)
    try:
        metrics = tracking.client(uri).get_run(result.mlflow_run_id).data.metrics
    except mlflow.exceptions.MlflowException:
        return f"MLflow run {result.mlflow_run_id} is gone"
    return None if result.metric_key in metrics else f"run {result.mlflow_run_id} has no {result.metric_key}"


def _model_version_missing(result: RegisterResult) -> str | None:
    import mlflow

    from pipelines import tracking

    uri = tracking.connect(result.tracking_uri)
    try:
        tracking.client(uri).get_model_version(result.model_name, str(result.version))
    except mlflow.exceptions.MlflowException:
        return f"model version {result.model_name} v{result.version} is gone from the registry"
    return None


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            name="preprocess", asset="dataset", help="raw videos -> WebDataset shards + manifest",
            config=PreprocessConfig, result=PreprocessResult, run=_preprocess,
            wired={"source": "workflow.source", "output": "workflow.dataset"},
            not_affecting_output=PreprocessConfig.NOT_AFFECTING_OUTPUT,
            data_version=lambda r: r.digest,
            output_missing=lambda r: _missing(storage.join(r.output, MANIFEST)),
        ),
        Stage(
            name="train", asset="checkpoint", help="distributed training with Ray Train, tracked in MLflow",
            config=TrainConfig, result=TrainResult, run=_train,
            wired={"dataset": "workflow.dataset", "storage_path": "workflow.storage_path"},
            not_affecting_output=TrainConfig.NOT_AFFECTING_OUTPUT,
            data_version=lambda r: _digest(r.checkpoint),
            output_missing=_checkpoint_missing,
        ),
        Stage(
            name="evaluate", asset="evaluation", help="multi-view top-1/top-5 of a checkpoint on a split",
            config=EvaluateConfig, result=EvaluateResult, run=_evaluate,
            wired={"dataset": "workflow.dataset", "checkpoint": None, "mlflow_run_id": None},
            not_affecting_output=EvaluateConfig.NOT_AFFECTING_OUTPUT,
            data_version=lambda r: _digest({k: v for k, v in r.to_dict().items() if k != "videos_per_s"}),
            output_missing=_evaluation_missing,
        ),
        Stage(
            name="register", asset="registered_model",
            help="log the model to MLflow, register it, move @champion if better",
            config=RegisterConfig, result=RegisterResult, run=_register,
            wired={"dataset": "workflow.dataset", "checkpoint": None, "mlflow_run_id": None},
            not_affecting_output=(),
            data_version=lambda r: r.model_uri,
            output_missing=_model_version_missing,
        ),
    )
}


def stage_of_asset(asset: str) -> Stage:
    return next(stage for stage in STAGES.values() if stage.asset == asset)
