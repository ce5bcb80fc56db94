"""The Dagster workflow: what `mvit workflow run` materializes, skips and retries, read from Dagster's event
log (the `synthetic_workflow` session fixture runs it first / unchanged / with one training key changed)."""

from __future__ import annotations

import json
import os
import shlex

import dagster as dg
import mlflow
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.data import storage
from pipelines.train.config import TrainConfig
from pipelines.workflow.config import load_workflow_config, stage_hash
from pipelines.workflow.launch import config_overrides
from pipelines.workflow.runner import stale_status

pytestmark = pytest.mark.integration

ALL = ["raw_videos", "dataset", "checkpoint", "evaluation", "registered_model"]
def last_summary(out: str) -> dict:
    return next(json.loads(line) for line in reversed(out.splitlines()) if line.startswith('{"dagster_home"'))


CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "workflow.yaml")


def test_first_run_materializes_every_asset(synthetic_workflow, services):
    first = synthetic_workflow["invocations"]["first"]
    assert first["summary"]["materialized"] == ALL
    assert [first["counts"][key] for key in ALL] == [1] * 5
    assert first["counts"]["runs"] == 5  # one Dagster run per asset
    assert 0.0 <= first["summary"]["val_top1"] <= 1.0
    assert first["summary"]["model_uri"] == "models:/workflow-it/1"
    # the outputs are where the assets say: the manifest on S3, the checkpoint, the registered version
    assert storage.exists(f"{synthetic_workflow['dataset']}/manifest.json")
    run = mlflow.MlflowClient(services.mlflow_uri).get_run(first["summary"]["mlflow_run_id"])
    assert "eval/val/top1" in run.data.metrics and run.data.tags["mvit.dataset_digest"] == first["summary"]["dataset_digest"]


def test_unchanged_rerun_recomputes_nothing(synthetic_workflow):
    first = synthetic_workflow["invocations"]["first"]
    second = synthetic_workflow["invocations"]["unchanged"]
    assert second["summary"]["materialized"] == []
    assert sorted(second["summary"]["skipped"]) == sorted(ALL)
    # Dagster's event log: not one new materialization, not one new run
    assert second["counts"] == first["counts"]
    print(f"workflow run: first {first['seconds']:.1f}s, unchanged re-run {second['seconds']:.1f}s")
    assert second["seconds"] < first["seconds"] / 3, (first["seconds"], second["seconds"])


def test_changing_a_training_key_reruns_train_evaluate_and_register_only(synthetic_workflow, services):
    first = synthetic_workflow["invocations"]["first"]
    changed = synthetic_workflow["invocations"]["train_key_changed"]
    assert changed["summary"]["materialized"] == ["checkpoint", "evaluation", "registered_model"]
    assert sorted(changed["summary"]["skipped"]) == ["dataset", "raw_videos"]
    assert {key: changed["counts"][key] for key in ALL} == {
        "raw_videos": 1, "dataset": 1, "checkpoint": 2, "evaluation": 2, "registered_model": 2}
    assert changed["summary"]["mlflow_run_id"] != first["summary"]["mlflow_run_id"]
    assert changed["summary"]["dataset_digest"] == first["summary"]["dataset_digest"]
    assert changed["summary"]["model_uri"] == "models:/workflow-it/2"
    client = mlflow.MlflowClient(services.mlflow_uri)
    assert client.get_run(changed["summary"]["mlflow_run_id"]).data.params["optim.lr"] == "0.002"


def test_a_failed_stage_keeps_its_upstream_and_is_retried_alone(synthetic_workflow, mvit_in_process,
                                                                  workflow_event_counts):
    # the config of the fixture's last run (its checkpoint is the latest materialization)
    base = [str(a) for a in synthetic_workflow["base"]] + ["train.optim.lr=2e-3"]
    home = synthetic_workflow["dagster_home"]
    before = workflow_event_counts(home)
    # a new evaluation setting with a typo in the split: evaluate fails after its upstream was found up to date
    code, out, err = mvit_in_process(["workflow", "run", *base, "evaluate.temporal_views=1", "evaluate.split=vall"])
    assert code == 1
    assert "evaluation (evaluate) failed" in err and f"{synthetic_workflow['dataset']} has no 'vall' shards" in err
    assert "--only evaluate" in err
    failed = workflow_event_counts(home)
    assert {k: failed[k] for k in ALL} == {k: before[k] for k in ALL}  # nothing new materialized, register not run
    with dg.DagsterInstance.from_config(str(home)) as instance:  # the failure is on record, as evaluate's
        (failure,) = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        failed_steps = [e.step_key for e in instance.all_logs(failure.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)]
        assert failed_steps == ["evaluation"]

    # fixed: retry that stage alone; its upstream is reused, the asset after it is left for a full run
    fixed = [*base, "evaluate.temporal_views=1"]
    code, out, err = mvit_in_process(["workflow", "run", *fixed, "--only", "evaluate"])
    assert code == 0, err[-2000:]
    assert last_summary(out)["materialized"] == ["evaluation"]
    retried = workflow_event_counts(home)
    assert {k: retried[k] - before[k] for k in ALL} == {
        "raw_videos": 0, "dataset": 0, "checkpoint": 0, "evaluation": 1, "registered_model": 0}
    from pipelines.workflow.assets import build_definitions

    with dg.DagsterInstance.from_config(str(home)) as instance:
        defs = build_definitions(load_workflow_config(base[0], [*base[1:], "evaluate.temporal_views=1"]))
        assert stale_status(instance, defs, "evaluation") == ("FRESH", [])
        status, reasons = stale_status(instance, defs, "registered_model")
        assert status == "STALE" and reasons == ["has a new dependency data version (evaluation)"]


def test_dagster_dev_loads_the_module_and_code_versions_follow_the_config(tmp_path, monkeypatch):
    # what `dagster dev -m pipelines.workflow` does to find the definitions
    from dagster._core.workspace.autodiscovery import (
        loadable_targets_from_python_module,
    )

    monkeypatch.setenv("MVIT_WORKFLOW_CONFIG", CONFIG)
    monkeypatch.setenv("MVIT_WORKFLOW_OVERRIDES", shlex.join([f"workflow.state_dir={tmp_path}", "train.epochs=3"]))
    (target,) = loadable_targets_from_python_module("pipelines.workflow", None)
    defs = target.target_definition()
    graph = defs.resolve_asset_graph()
    parents = {key.to_user_string(): sorted(p.to_user_string() for p in graph.get(key).parent_keys)
               for key in graph.get_all_asset_keys()}
    assert parents == {"raw_videos": [], "dataset": ["raw_videos"], "checkpoint": ["dataset"],
                       "evaluation": ["checkpoint"], "registered_model": ["checkpoint", "evaluation"]}
    cfg = load_workflow_config(CONFIG, [f"workflow.state_dir={tmp_path}", "train.epochs=3"])
    assert graph.get(dg.AssetKey("checkpoint")).code_version == f"train-{stage_hash('train', cfg.train)}"
    # the code version is the stage's config hash: a training key moves train's only
    other = load_workflow_config(CONFIG, [f"workflow.state_dir={tmp_path}", "train.epochs=4"])
    assert stage_hash("train", other.train) != stage_hash("train", cfg.train)
    assert stage_hash("preprocess", other.preprocess) == stage_hash("preprocess", cfg.preprocess)
    assert stage_hash("evaluate", other.evaluate) == stage_hash("evaluate", cfg.evaluate)
    # where a stage runs does not change what it produces
    elsewhere = load_workflow_config(CONFIG, [f"workflow.state_dir={tmp_path}", "train.epochs=3", "train.ray.address=auto"])
    assert stage_hash("train", elsewhere.train) == stage_hash("train", cfg.train)


def test_workflow_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.dataset is set by the workflow \(set workflow\.dataset instead\)"):
        load_workflow_config(CONFIG, ["train.dataset=s3://elsewhere"])
    with pytest.raises(ConfigError, match=r"evaluate\.checkpoint is set by the workflow \(it is the output of the upstream"):
        load_workflow_config(CONFIG, ["evaluate.checkpoint=/tmp/x"])
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_workflow_config(CONFIG, ["trian.epochs=2"])
    with pytest.raises(ConfigError, match="unknown config key 'epochz'"):
        load_workflow_config(CONFIG, ["train.epochz=2"])
    flat = tmp_path / "flat.yaml"
    flat.write_text("epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['epochs'\]"):
        load_workflow_config(flat)


def test_stage_config_survives_the_trip_through_job_overrides():
    cfg = load_workflow_config(CONFIG, ["train.mlflow.experiment=with space=and equals"]).train
    assert cfg.run_name == "" and cfg.mlflow.tracking_uri == ""  # empty strings must stay empty strings
    assert load_config(TrainConfig, None, config_overrides(cfg)) == cfg


def test_synthetic_set_can_be_written_to_object_storage_for_cluster_runs(services, tmp_path):
    from pipelines.workflow.assets import generate_synthetic, source_fingerprint

    settings = load_workflow_config(CONFIG, [f"workflow.state_dir={tmp_path}", "workflow.raw_dir=s3://mvit/wf-raw",
                                             "workflow.synthetic.classes=2", "workflow.synthetic.videos_per_class=2",
                                             "workflow.synthetic.size=32", "workflow.synthetic.frames=8"]).settings
    labels_csv, videos = generate_synthetic(settings)
    assert labels_csv == "s3://mvit/wf-raw/labels.csv" and videos == 4
    listed = sorted(uri.removeprefix("s3://mvit/wf-raw/") for uri, _ in storage.list_files("s3://mvit/wf-raw"))
    rows = storage.read_bytes(labels_csv).decode().splitlines()[1:]
    assert listed == sorted(["labels.csv", *(row.split(",")[0] for row in rows)]) and len(rows) == 4
    # the fingerprint is of what is stored: another file under the prefix changes it
    before = source_fingerprint("s3://mvit/wf-raw")
    storage.write_bytes("s3://mvit/wf-raw/extra/x.mp4", b"x")
    assert source_fingerprint("s3://mvit/wf-raw") != before
    assert source_fingerprint(labels_csv) == source_fingerprint(labels_csv)  # a file: its bytes
