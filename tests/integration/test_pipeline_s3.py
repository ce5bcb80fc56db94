"""preprocess -> train (2 DDP workers) -> evaluate -> register against the local S3 + MLflow servers."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from pipelines.config import load_config
from pipelines.data import storage
from pipelines.evaluate.job import EvaluateConfig
from pipelines.evaluate.job import run as evaluate
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.job import run as preprocess
from pipelines.register.job import RegisterConfig, RegisterResult
from pipelines.register.job import run as register
from pipelines.train.config import TrainConfig
from pipelines.train.job import run as train

pytestmark = pytest.mark.integration

DATASET = "s3://mvit/it/dataset"
SMALL_TRAIN = [
    "model=mvit_debug", "epochs=2", "batch_size=8", "num_workers=2", "log_every_steps=2",
    "clip.num_frames=8", "clip.sampling_rate=2", "clip.crop_size=32", "clip.train_crop=random",
    "clip.horizontal_flip=false", "optim.lr=1e-3", "optim.lr_batch=16", "optim.warmup_epochs=1",
]


@pytest.fixture(scope="module")
def pipeline(services, ray_session, raw_videos_s3):
    pre_cfg = load_config(PreprocessConfig, None, [
        f"source={raw_videos_s3['csv']}", f"output={DATASET}", "short_side=36", "fps=0", "max_samples_per_shard=16",
    ])
    manifest = preprocess(pre_cfg)
    train_cfg = load_config(TrainConfig, None, [
        f"dataset={DATASET}", "storage_path=s3://mvit/it/runs", "run_name=it-run", "audit_sample_keys=true",
        "mlflow.experiment=it", *SMALL_TRAIN,
    ])
    trained = train(train_cfg)
    report = evaluate(load_config(EvaluateConfig, None, [
        f"dataset={DATASET}", f"checkpoint={trained.checkpoint}", f"mlflow_run_id={trained.mlflow_run_id}",
    ]))
    registered = register(load_config(RegisterConfig, None, [
        f"checkpoint={trained.checkpoint}", f"mlflow_run_id={trained.mlflow_run_id}", f"dataset={DATASET}",
        "model_name=it-model",
    ]))
    return {"manifest": manifest, "trained": trained, "report": report, "registered": registered,
            "train_cfg": train_cfg}


def test_shards_on_s3_match_the_plan(pipeline, raw_videos_s3, s3):
    manifest = pipeline["manifest"]
    # 64 train + 16 val samples at <= 16 per shard -> 4 + 1 shards; the CSV row without a file is quarantined.
    assert manifest.splits == {"train": raw_videos_s3["train"], "val": raw_videos_s3["val"]}
    assert [s.split for s in manifest.shards].count("train") == 4
    assert [s.split for s in manifest.shards].count("val") == 1
    assert manifest.num_samples + manifest.quarantined == manifest.inputs == 81
    listed = {uri for uri, _ in storage.list_files(f"{DATASET}/shards")}
    assert listed == {f"{DATASET}/{s.url}" for s in manifest.shards}
    quarantine = [json.loads(line) for line in storage.read_bytes(f"{DATASET}/quarantine.jsonl").decode().splitlines()]
    assert len(quarantine) == 1 and "missing file" in quarantine[0]["reason"]
    assert quarantine[0]["source"].endswith("does_not_exist.mp4")


def test_ranks_trained_on_disjoint_data(pipeline):
    run_dir = pipeline["trained"].run_dir
    audits = [json.loads(storage.read_bytes(f"{run_dir}/data_audit/rank-{r}.json")) for r in (0, 1)]
    keys = [set(a["keys"]) for a in audits]
    assert keys[0] and keys[1], "each rank must have trained on samples"
    assert not keys[0] & keys[1], "ranks shared samples"
    assert not set(audits[0]["shards"]) & set(audits[1]["shards"])


def test_one_mlflow_run_holds_params_metrics_artifacts_and_dataset(pipeline, services):
    trained = pipeline["trained"]
    client = mlflow.MlflowClient(services.mlflow_uri)
    experiment = client.get_experiment_by_name("it")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [trained.mlflow_run_id]
    run = runs[0]
    assert run.data.params["model"] == "mvit_debug" and run.data.params["clip.num_frames"] == "8"
    for key in ("train/loss", "train/lr", "train/clips_per_s", "val/top1", "val/top5", "eval/val/top1"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "val/top1")) == 2  # one per epoch
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 2  # per step
    artifacts = {a.path for d in ("config", "plots", "eval") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"config/train_config.yaml", "config/evaluate_config.yaml", "config/register_config.yaml",
            "plots/confusion_matrix_val.png", "plots/curves.png", "eval/eval_val.json"} <= artifacts
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [f"shards-{pipeline['manifest'].digest()}"]
    assert run.data.tags["mvit.dataset_digest"] == pipeline["manifest"].digest()


def test_checkpoints_live_in_object_storage(pipeline):
    checkpoint = pipeline["trained"].checkpoint
    assert checkpoint.startswith("s3://mvit/it/runs/it-run/")
    assert storage.exists(f"{checkpoint}/model.pt")


def test_alias_resolves_and_model_predicts(pipeline, raw_videos_s3, services):
    registered = pipeline["registered"]
    client = mlflow.MlflowClient(services.mlflow_uri)
    holder = client.get_model_version_by_alias("it-model", "champion")
    assert int(holder.version) == registered.version and registered.promoted
    model = mlflow.pyfunc.load_model("models:/it-model@champion")
    video = "s3://mvit/raw/left_speed1/left_speed1_0000.mp4"
    out = model.predict(pd.DataFrame({"video": [video]}))
    labels = pipeline["manifest"].labels
    assert len(out) == 1 and len(out["top5_labels"][0]) == 5
    assert set(out["top5_labels"][0]) <= set(labels)
    scores = list(out["top5_scores"][0])
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-5


def test_rerunning_preprocess_is_a_no_op(pipeline, raw_videos_s3):
    cfg = load_config(PreprocessConfig, None, [
        f"source={raw_videos_s3['csv']}", f"output={DATASET}", "short_side=36", "fps=0", "max_samples_per_shard=16",
    ])
    again = preprocess(cfg)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in pipeline["manifest"].shards]


# ---- The champion rule and lineage (issue 15, acceptance 3) ------------------------------------------------

def _evaluate_into_new_run(services, checkpoint: str, name: str, *overrides: str) -> str:
    """A fresh MLflow run holding an evaluation of `checkpoint` (what a second training run would have)."""
    client = mlflow.MlflowClient(services.mlflow_uri)
    run_id = client.create_run(client.get_experiment_by_name("it").experiment_id, run_name=name).info.run_id
    evaluate(load_config(EvaluateConfig, None, [f"checkpoint={checkpoint}", f"mlflow_run_id={run_id}", *overrides]))
    return run_id


def _raise_score(services, run_id: str, above: float) -> None:
    """Log a better latest eval/val/top1 (same tags): the candidate would win if the rule compared scores alone."""
    mlflow.MlflowClient(services.mlflow_uri).log_metric(run_id, "eval/val/top1", above + 0.5, step=10**6)


def _register(checkpoint: str, run_id: str) -> RegisterResult:
    return register(load_config(RegisterConfig, None, [
        f"checkpoint={checkpoint}", f"mlflow_run_id={run_id}", f"dataset={DATASET}", "model_name=it-model",
    ]))


def test_evaluations_record_their_dataset_split_and_views(pipeline, services):
    report = pipeline["report"]
    tags = mlflow.MlflowClient(services.mlflow_uri).get_run(report.mlflow_run_id).data.tags
    assert tags["mvit.eval.val.dataset_digest"] == pipeline["manifest"].digest() == report.dataset_digest
    assert tags["mvit.eval.val.views"] == "1x1"


def test_registered_version_carries_its_lineage(pipeline, services):
    registered, manifest = pipeline["registered"], pipeline["manifest"]
    version = mlflow.MlflowClient(services.mlflow_uri).get_model_version("it-model", str(registered.version))
    tags = version.tags
    assert tags["mvit.training_run_id"] == pipeline["trained"].mlflow_run_id == version.run_id
    assert tags["mvit.dataset_manifest"] == f"{DATASET}/manifest.json"
    assert tags["mvit.dataset_digest"] == manifest.digest()
    assert tags["mvit.input_fingerprint"] == manifest.input_fingerprint
    assert tags["mvit.init_checkpoint"] == "none"  # trained from scratch
    assert tags["mvit.code_version"].startswith(("git:", "mvit-system=="))
    assert float(tags["mvit.clip_fps"]) == 15.0  # fps=0 kept the synthetic videos' 15 fps


def test_register_refuses_to_promote_across_evaluation_datasets_or_views(pipeline, raw_videos_s3, services, capsys):
    checkpoint, champion = pipeline["trained"].checkpoint, pipeline["registered"]
    client = mlflow.MlflowClient(services.mlflow_uri)
    assert client.get_model_version_by_alias("it-model", "champion").version == str(champion.version)
    # Another dataset with the same labels (stored at another size: other shards, another digest).
    other = "s3://mvit/it/dataset-other"
    preprocess(load_config(PreprocessConfig, None, [
        f"source={raw_videos_s3['csv']}", f"output={other}", "short_side=32", "fps=0", "max_samples_per_shard=16",
    ]))
    for name, overrides in (("two-views", ["temporal_views=2", f"dataset={DATASET}"]),
                            ("other-dataset", [f"dataset={other}"])):
        run_id = _evaluate_into_new_run(services, checkpoint, name, *overrides)
        _raise_score(services, run_id, pipeline["report"].top1)
        capsys.readouterr()
        result = _register(checkpoint, run_id)
        printed = capsys.readouterr().out
        assert not result.promoted, name
        assert "not comparable" in result.reason and result.reason in printed
        assert client.get_model_version_by_alias("it-model", "champion").version == str(champion.version)


def test_register_promotes_a_better_model_on_the_same_evaluation(pipeline, services):
    checkpoint = pipeline["trained"].checkpoint
    run_id = _evaluate_into_new_run(services, checkpoint, "same-evaluation", f"dataset={DATASET}")
    _raise_score(services, run_id, pipeline["report"].top1)
    result = _register(checkpoint, run_id)
    assert result.promoted and " > " in result.reason
    client = mlflow.MlflowClient(services.mlflow_uri)
    assert client.get_model_version_by_alias("it-model", "champion").version == str(result.version)
