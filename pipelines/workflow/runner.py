"""`mvit workflow run`: bring the assets up to date against a persistent local Dagster instance.

Assets are decided one at a time in dependency order; each one that needs it is materialized in its own
in-process Dagster run (so a failure leaves the upstream materializations recorded, and a re-run or
`--only <stage>` retries just what failed). What decides that an asset is unchanged and is skipped:
  1. Dagster's stale status (the one behind "Materialize stale" in its UI) is FRESH: it was materialized
     before with the code version it has now (= the config hash of its stage) and with the data versions
     its inputs have now (the upstream assets' manifest digest / checkpoint URI / report hash, or the
     observed fingerprint of the raw videos); and
  2. the output recorded with that materialization still exists: manifest.json, the checkpoint file, the
     evaluation metric in its MLflow run, the model version in the registry.
Deciding after the upstream asset has run means an upstream re-run that produced the same data version
(e.g. a resumed preprocessing) leaves everything downstream alone.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import dagster as dg

from pipelines import tracking
from pipelines.stages import stage_of_asset
from pipelines.workflow.assets import ASSET_ORDER, RESULT_KEY, STAGE_OF, build_definitions
from pipelines.workflow.config import WorkflowConfig, WorkflowSettings

ALIASES = {"source": "raw_videos", "raw": "raw_videos", **{stage: key for key, stage in STAGE_OF.items()}}
# Dagster logs every event of a run at DEBUG to the console; the stages print their own progress.
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


class WorkflowError(RuntimeError):
    """A stage failed or the requested selection cannot run; the message says what to do."""


def asset_names(names: list[str] | None) -> list[str]:
    """Asset keys for `--only` values (asset names or stage names), in dependency order."""
    if not names:
        return list(ASSET_ORDER)
    wanted = set()
    for name in names:
        for part in name.split(","):
            key = ALIASES.get(part.strip(), part.strip())
            if key not in ASSET_ORDER:
                raise WorkflowError(f"--only {part!r}: unknown asset or stage; use one of "
                                    f"{', '.join(ASSET_ORDER)} or {', '.join(STAGE_OF.values())}")
            wanted.add(key)
    return [key for key in ASSET_ORDER if key in wanted]


def open_instance(settings: WorkflowSettings) -> dg.DagsterInstance:
    """The persistent local instance (SQLite event log, run and schedule storage) under the Dagster home;
    `DAGSTER_HOME=<that dir> dagster dev -m pipelines.workflow` shows the same history."""
    home = settings.resolved_dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("# written by `mvit workflow run`\ntelemetry:\n  enabled: false\n")
    return dg.DagsterInstance.from_config(str(home))


def stale_status(instance: dg.DagsterInstance, defs: dg.Definitions, key: str) -> tuple[str, list[str]]:
    """Dagster's own stale status of one asset and the reasons behind it."""
    # Internal API: the resolver Dagster's UI and `RunRequest(stale_assets_only=True)` use; there is no
    # public entry point for it outside sensors/schedules (Dagster 1.x, pinned in constraints.txt).
    from dagster._core.asset_graph_view.asset_graph_view import (
        AssetGraphView,
        TemporalContext,
    )
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    graph = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)
    resolver = CachingStaleStatusResolver(instance, graph, view)
    asset_key = dg.AssetKey(key)
    status = resolver.get_status(asset_key)
    reasons = []
    for cause in resolver.get_stale_causes(asset_key):
        dependency = f" ({cause.dependency.asset_key.to_user_string()})" if cause.dependency else ""
        reasons.append(f"{cause.reason}{dependency}")
    return status.value, reasons


def _metadata(instance: dg.DagsterInstance, key: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    if event is None or event.asset_materialization is None:
        return {}
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}


def missing_output(instance: dg.DagsterInstance, key: str) -> str | None:
    """Why the output recorded with the latest materialization is gone, or None when it is still there."""
    from pipelines.data import storage

    meta = _metadata(instance, key)
    if key == "raw_videos":
        uri = meta.get("labels_csv")
        return None if uri is None or storage.exists(uri) else f"{uri} is gone"
    stage = stage_of_asset(key)
    if RESULT_KEY not in meta:
        return "no result recorded with its last materialization"
    return stage.output_missing(stage.result.from_dict(meta[RESULT_KEY]))


def observe_source(instance: dg.DagsterInstance, defs: dg.Definitions) -> None:
    """Record the raw videos' current fingerprint (observable source asset) before deciding on `dataset`."""
    job = dg.define_asset_job("observe_raw_videos", selection=dg.AssetSelection.keys("raw_videos"))
    observe_defs = dg.Definitions(assets=list(defs.assets or []), jobs=[job], resources=defs.resources)
    result = observe_defs.resolve_job_def("observe_raw_videos").execute_in_process(
        instance=instance, run_config=QUIET_RUN_CONFIG, raise_on_error=False)
    if not result.success:
        raise WorkflowError(f"observing the raw videos failed: {_failure(result)}")


def _failure(result) -> str:
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        if error is not None:
            # the stage's own exception, not Dagster's wrapper around it
            while error.cause is not None and error.cls_name in ("DagsterExecutionStepExecutionError",):
                error = error.cause
            return error.message.strip()
    return "see the Dagster run's event log"


def reason_to_materialize(instance: dg.DagsterInstance, defs: dg.Definitions, key: str, force: bool) -> str | None:
    """Why `run` materializes `key` now (None: it is skipped). Decided after its upstream assets ran."""
    if force:
        return "--force"
    status, reasons = stale_status(instance, defs, key)
    if status == "MISSING":
        return "never materialized"
    if status == "STALE":
        return "; ".join(reasons) or "stale"
    return missing_output(instance, key)


def predict_run(cfg: WorkflowConfig, only: list[str] | None = None, force: bool = False) -> dict[str, str | None]:
    """What `mvit workflow run` with the same arguments would do, without running anything: asset -> the
    reason it would be materialized, or None if it would be skipped (`mvit workflow status`).

    `run` decides each asset after its upstream assets ran; here an asset whose upstream would be
    rematerialized is predicted to run too, because its input's data version changes (a new manifest
    digest, a new checkpoint). (A rematerialization that reproduces the same data version, e.g. a resumed
    preprocessing, leaves `run` skipping what this predicts: the prediction errs on the side of work.)"""
    defs = build_definitions(cfg)
    graph = defs.resolve_asset_graph()
    selected = asset_names(only)
    observable = bool(cfg.settings.source)
    plan: dict[str, str | None] = {}
    with open_instance(cfg.settings) as instance:
        if observable:
            observe_source(instance, defs)
        for key in ASSET_ORDER:
            if key not in selected or (key == "raw_videos" and observable):
                continue
            rerun_upstream = sorted(k.to_user_string() for k in graph.get(dg.AssetKey(key)).parent_keys
                                    if plan.get(k.to_user_string()))
            if rerun_upstream:
                plan[key] = f"upstream {', '.join(rerun_upstream)} will be rematerialized"
            else:
                plan[key] = reason_to_materialize(instance, defs, key, force)
    return plan


def run_workflow(cfg: WorkflowConfig, only: list[str] | None = None, force: bool = False,
                 config_path: str | None = None) -> dict:
    # Recorded results name the tracking server without credentials; checking that their outputs still
    # exist uses those of the config (or the environment), as the stages themselves do.
    for section in ("train", "evaluate", "register"):
        tracking.adopt_credentials(getattr(cfg, section).mlflow.tracking_uri)
    with open_instance(cfg.settings) as instance:
        return _run(instance, cfg, only, force, config_path)


def _run(instance: dg.DagsterInstance, cfg: WorkflowConfig, only: list[str] | None, force: bool,
         config_path: str | None) -> dict:
    defs = build_definitions(cfg)
    assets = list(defs.assets or [])
    graph = defs.resolve_asset_graph()
    selected = asset_names(only)
    observable = bool(cfg.settings.source)
    summary: dict = {"dagster_home": str(cfg.settings.resolved_dagster_home()), "materialized": [], "skipped": {},
                     "runs": {}, "seconds": {}}
    retry_hint = f"mvit workflow run {config_path or 'CONFIG'} --only"
    if observable and "dataset" in selected:
        observe_source(instance, defs)
    for key in ASSET_ORDER:
        if key not in selected or (key == "raw_videos" and observable):
            continue
        for upstream in sorted(k.to_user_string() for k in graph.get(dg.AssetKey(key)).parent_keys):
            produced_here = upstream in selected or (upstream == "raw_videos" and observable)
            if not produced_here and instance.get_latest_materialization_event(dg.AssetKey(upstream)) is None:
                raise WorkflowError(f"{key} needs {upstream}, which has never been materialized in "
                                    f"{summary['dagster_home']}: run the workflow without --only first")
        why = reason_to_materialize(instance, defs, key, force)
        if why is None:
            summary["skipped"][key] = "up to date: same config hash and input data versions, output present"
            print(f"[workflow] {key}: up to date, skipped", flush=True)
            continue
        print(f"[workflow] {key}: {why} -> materializing", flush=True)
        started = time.monotonic()
        result = dg.materialize(assets, instance=instance, selection=[key], resources=defs.resources,
                                run_config=QUIET_RUN_CONFIG, raise_on_error=False,
                                tags={"mvit/workflow": "run", "mvit/reason": why[:200]})
        summary["runs"][key] = result.run_id
        summary["seconds"][key] = round(time.monotonic() - started, 1)
        if not result.success:
            stage = STAGE_OF.get(key, key)
            raise WorkflowError(f"{key} ({stage}) failed in Dagster run {result.run_id}: {_failure(result)}\n"
                                f"Fix the cause, then retry it alone: {retry_hint} {stage} (plus the same overrides)")
        summary["materialized"].append(key)
        print(f"[workflow] {key}: materialized in {summary['seconds'][key]:.1f}s (run {result.run_id})", flush=True)
    summary.update(latest_outputs(instance))
    return summary


def latest_results(settings: WorkflowSettings) -> dict[str, dict]:
    """The stage results recorded with each asset's latest materialization (asset -> result dict)."""
    with open_instance(settings) as instance:
        found = {key: _metadata(instance, key).get(RESULT_KEY) for key in ASSET_ORDER}
    return {key: result for key, result in found.items() if result is not None}


def latest_outputs(instance: dg.DagsterInstance) -> dict:
    """The headline numbers of the latest materializations (for the command's JSON line)."""
    out = {}
    evaluation = _metadata(instance, "evaluation")
    if evaluation:
        out["val_top1"] = round(evaluation["top1"], 4) if evaluation.get("top1") is not None else None
        if evaluation.get("frame_map") is not None:  # AVA: frame-mAP@0.5 (val_top1 is then None)
            out["val_frame_map"] = evaluation["frame_map"]
        out["mlflow_run_id"] = evaluation.get("mlflow_run_id")
    registered = _metadata(instance, "registered_model")
    if registered:
        out["model_uri"] = registered.get("model_uri")
    dataset = _metadata(instance, "dataset")
    if dataset:
        out["dataset_digest"] = dataset.get("digest")
    return out


def dagster_dev_hint(settings: WorkflowSettings, config_path: str | None, overrides: list[str] | None = None) -> str:
    """The `dagster dev` command that shows this workflow (same home, config and overrides)."""
    env = f"DAGSTER_HOME={shlex.quote(str(settings.resolved_dagster_home()))}"
    if config_path:
        env += f" MVIT_WORKFLOW_CONFIG={shlex.quote(str(Path(config_path).absolute()))}"
    if overrides:
        env += f" MVIT_WORKFLOW_OVERRIDES={shlex.quote(shlex.join(overrides))}"
    return f"{env} dagster dev -m pipelines.workflow"

