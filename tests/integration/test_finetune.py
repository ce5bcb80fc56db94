"""Fine-tuning from a registered model: `init_checkpoint=models:/NAME@champion` starts a run on another
class set with the registered backbone and a new head, and gets to the accuracy goal sooner than from
scratch."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines import artifact
from pipelines.config import load_config
from pipelines.data.synthetic import SyntheticSpec, generate
from pipelines.evaluate.job import EvaluateConfig
from pipelines.evaluate.job import run as evaluate
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.job import run as preprocess
from pipelines.register.job import RegisterConfig
from pipelines.register.job import run as register
from pipelines.train import init
from pipelines.train.config import TrainConfig
from pipelines.train.job import run as train
from pipelines.train.loop import build_model

pytestmark = pytest.mark.integration

# The demo recipe (configs/demo.yaml), with a 10x head LR for both fine-tuning and its from-scratch control.
TRAIN = ["model=mvitv2_debug", "batch_size=8", "num_workers=2", "log_every_steps=5", "clip.num_frames=8",
         "clip.sampling_rate=2", "clip.crop_size=32", "clip.test_short_side=40", "clip.train_crop=random",
         "clip.horizontal_flip=false", "optim.lr=1e-3", "optim.lr_batch=32", "optim.warmup_epochs=1",
         "optim.label_smoothing=0.0"]
PRETRAIN_EPOCHS = 10
EPOCHS = 6
GOAL = 0.75  # val top-1 on 4 classes (chance 0.25)


def _subset(csv_path: Path, keep, out: Path) -> str:
    with csv_path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if keep(row["label"])]
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return str(out)


def _val_history(client, run_id: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, "val/top1"), key=lambda m: m.step)]


def _first_epoch_at_goal(history: list[float]) -> int:
    return next((epoch for epoch, top1 in enumerate(history) if top1 >= GOAL), len(history))


@pytest.mark.timeout(2400)  # three training runs: over pytest's 600 s on this shared 2-core machine under load
def test_registered_model_initialises_a_run_on_other_classes(services, ray_session, tmp_path):
    # Set A (pre-training): the demo's 8 directions at speed 1, 100 videos each. Set B: the 4 axis-aligned
    # directions at speed 2, 30 videos each, under their own names: another class set and class count, and
    # too few videos for a model from scratch to find the motion within EPOCHS.
    set_a = str(generate(tmp_path / "a", SyntheticSpec(classes=8, videos_per_class=100, frames=16, size=48, seed=5)))
    all_b = generate(tmp_path / "b", SyntheticSpec(classes=16, videos_per_class=30, frames=16, size=48, seed=6))
    set_b = _subset(all_b, lambda label: label in {"right_speed2", "down_speed2", "left_speed2", "up_speed2"},
                    tmp_path / "b" / "b.csv")
    datasets = {}
    for name, source in (("a", set_a), ("b", set_b)):
        datasets[name] = str(tmp_path / f"shards-{name}")
        preprocess(load_config(PreprocessConfig, None, [f"source={source}", f"output={datasets[name]}", "short_side=40",
                                                        "fps=0", "val_fraction=0.2", "max_samples_per_shard=24"]))

    pretrained = train(load_config(TrainConfig, None, [
        f"dataset={datasets['a']}", f"storage_path={tmp_path / 'runs'}", f"epochs={PRETRAIN_EPOCHS}",
        "mlflow.experiment=ft-it", *TRAIN]))
    evaluate(load_config(EvaluateConfig, None, [f"dataset={datasets['a']}", f"checkpoint={pretrained.checkpoint}",
                                                f"mlflow_run_id={pretrained.mlflow_run_id}"]))
    print(f"pre-training on set A: val top-1 per epoch {_val_history(mlflow.MlflowClient(services.mlflow_uri), pretrained.mlflow_run_id)}")
    registered = register(load_config(RegisterConfig, None, [
        f"checkpoint={pretrained.checkpoint}", f"mlflow_run_id={pretrained.mlflow_run_id}",
        f"dataset={datasets['a']}", "model_name=ft-it"]))
    assert registered.promoted

    uri = "models:/ft-it@champion"
    finetune_args = [f"dataset={datasets['b']}", f"storage_path={tmp_path / 'runs'}", f"epochs={EPOCHS}",
                     "mlflow.experiment=ft-it", "optim.head_lr_mult=10", *TRAIN]
    finetune_cfg = load_config(TrainConfig, None, [*finetune_args, f"init_checkpoint={uri}"])

    # What the workers start from is what the driver read: the registered backbone, a new head.
    weights = init.read_init_weights(uri, services.mlflow_uri)
    b_labels = {name: i for i, name in enumerate(sorted(["right_speed2", "down_speed2", "left_speed2", "up_speed2"]))}
    model = build_model(finetune_cfg, b_labels, weights.state)
    registered_state = artifact.load_state(pretrained.checkpoint)["model"]
    for name, value in model.state_dict().items():
        if name.startswith("head."):
            assert value.shape[0] == 4 and registered_state[name].shape[0] == 8
        else:
            assert torch.equal(value, registered_state[name]), name

    finetuned = train(finetune_cfg)
    scratch = train(load_config(TrainConfig, None, finetune_args))
    client = mlflow.MlflowClient(services.mlflow_uri)
    tags = client.get_run(finetuned.mlflow_run_id).data.tags
    assert tags["mvit.init.checkpoint"] == uri and tags["mvit.init.model_version"] == f"models:/ft-it/{registered.version}"
    assert tags["mvit.init.source_run"] == pretrained.mlflow_run_id
    assert tags["mvit.init.new_keys"] == "head.projection.weight,head.projection.bias"
    assert int(tags["mvit.init.loaded_keys"]) == len(registered_state) - 2
    assert "mvit.init.checkpoint" not in client.get_run(scratch.mlflow_run_id).data.tags

    tuned, fresh = _val_history(client, finetuned.mlflow_run_id), _val_history(client, scratch.mlflow_run_id)
    print(f"val top-1 per epoch: fine-tuned {tuned}, from scratch {fresh}")
    assert len(tuned) == len(fresh) == EPOCHS
    assert _first_epoch_at_goal(tuned) < EPOCHS, f"fine-tuning did not reach {GOAL}: {tuned}"
    assert _first_epoch_at_goal(tuned) < _first_epoch_at_goal(fresh), (tuned, fresh)
