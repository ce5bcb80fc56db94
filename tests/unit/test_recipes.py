"""The shipped recipes (configs/*.yaml) against the official recipes.

The expected values are written here from the reference facts (docs/recipes.md: the papers' and the
official SlowFast configs' recipes, docs/reference.md), not read from the configs: a recipe that
drifts from the official one fails with the key that moved.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mvit
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.train import optim
from pipelines.train.config import BatchPlan, TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Shared by the Kinetics recipes of MViT v1 and v2 (docs/recipes.md, "Kinetics-400").
KINETICS = {
    "optim.name": "adamw", "optim.betas": [0.9, 0.999], "lr@512": 1.6e-3, "epochs": 200, "optim.warmup_epochs": 30,
    "warmup start lr": 1e-6, "optim.min_lr": 1e-6, "optim.weight_decay": 0.05, "optim.grad_clip": 1.0,
    "optim.label_smoothing": 0.1, "mixup.enabled": True, "mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0,
    "mixup.switch_prob": 0.5, "clip.rand_augment.enabled": True, "clip.rand_augment.magnitude": 7,
    "clip.rand_augment.num_ops": 4, "clip.rand_augment.magnitude_std": 0.5, "clip.rand_augment.ops": [],
    "clip.erase_prob": 0.25, "clip.train_crop": "random_resized", "clip.min_crop_scale": 0.08,
    "clip.crop_aspect": [3 / 4, 4 / 3], "clip.horizontal_flip": True, "clip.repeated_augment": 2,
    "head dropout": 0.5, "clip.sampling": "window", "clip.num_frames": 16, "clip.sampling_rate": 4,
    "clip.crop_size": 224, "clip.test_short_side": 256, "clip.test_spatial_views": 1, "clip.test_temporal_views": 5,
    "clip.channel_order": "rgb", "clip.mean": [0.45], "clip.std": [0.225], "preprocess fps": 30,
}

EXPECTED = {
    "kinetics400_mvit_b_16x4.yaml": {**KINETICS, "model": "mvit_b_16x4", "drop_path_rate": 0.2},
    "kinetics400_mvitv2_s_16x4.yaml": {**KINETICS, "model": "mvitv2_s_16x4", "drop_path_rate": 0.2},
    # docs/recipes.md, "Something-Something v2": SGD momentum 0.9, lr 0.02 at 512, 100 epochs, 3 warmup, wd 1e-4, drop
    # path 0.4, no flip, short-side jitter [256, 320], segment sampling, augmentations as Kinetics, no
    # repeated augmentation, BGR, 3 spatial x 1 temporal views; initialised from Kinetics weights.
    "ssv2_mvitv2_s_16x4.yaml": {
        "model": "mvitv2_s_16x4", "init_checkpoint": "models:/mvitv2-s-16x4-k400@champion",
        "optim.name": "sgd", "optim.momentum": 0.9, "lr@512": 0.02, "epochs": 100, "optim.warmup_epochs": 3,
        "optim.weight_decay": 1e-4, "drop_path_rate": 0.4, "clip.horizontal_flip": False,
        "clip.train_crop": "short_side_jitter", "clip.jitter_short_side": [256, 320], "clip.sampling": "segments",
        "clip.num_frames": 16, "clip.crop_size": 224, "optim.label_smoothing": 0.1, "mixup.enabled": True,
        "mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0, "mixup.switch_prob": 0.5,
        "clip.rand_augment.enabled": True, "clip.rand_augment.magnitude": 7, "clip.rand_augment.num_ops": 4,
        "clip.rand_augment.magnitude_std": 0.5, "clip.erase_prob": 0.25, "clip.repeated_augment": 1,
        "clip.channel_order": "bgr", "clip.test_spatial_views": 3, "clip.test_temporal_views": 1,
        "head dropout": 0.5,
    },
    # SlowFast configs/ImageNet/MVIT_B_16_CONV.yaml (docs/recipes.md, "ImageNet"): AdamW, lr 2.5e-4 per 256
    # images, 300 epochs, 70 warmup from 1e-8, cosine to 1e-6, wd 0.05 (none on 1-D), clip 1.0, rand-m9-n6-
    # mstd0.5, erasing 0.25, mixup 0.8 / cutmix 1.0 / switch 0.5, smoothing 0.1, drop path 0.1, no head
    # dropout, random resized crop + flip, ImageNet mean/std, test short side 256 -> centre 224.
    "imagenet_mvit_b16.yaml": {
        "model": "mvit_b16_in1k", "optim.name": "adamw", "optim.betas": [0.9, 0.999], "lr@256": 2.5e-4,
        "epochs": 300, "optim.warmup_epochs": 70, "warmup start lr": 1e-8, "optim.min_lr": 1e-6,
        "optim.weight_decay": 0.05, "optim.grad_clip": 1.0, "clip.rand_augment.enabled": True,
        "clip.rand_augment.magnitude": 9, "clip.rand_augment.num_ops": 6, "clip.rand_augment.magnitude_std": 0.5,
        "clip.erase_prob": 0.25, "mixup.enabled": True, "mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0,
        "mixup.switch_prob": 0.5, "optim.label_smoothing": 0.1, "drop_path_rate": 0.1, "head dropout": 0.0,
        "clip.train_crop": "random_resized", "clip.min_crop_scale": 0.08, "clip.horizontal_flip": True,
        "clip.repeated_augment": 1, "clip.mean": [0.485, 0.456, 0.406], "clip.std": [0.229, 0.224, 0.225],
        "clip.crop_size": 224, "clip.test_short_side": 256, "clip.test_spatial_views": 1,
        "clip.test_temporal_views": 1,
    },
}


def _value(cfg: TrainConfig, path: Path, key: str):
    if key.startswith("lr@"):  # the LR the run uses at that global batch (linear scaling from the recipe's)
        return optim.scaled_lr(cfg.optim.lr, cfg.optim.lr_batch, int(key[3:]))
    if key == "warmup start lr":  # at the run's own global batch: peak x start factor
        return cfg.optim.lr * cfg.optim.warmup_start_factor
    if key == "head dropout":
        return mvit.get_config(cfg.model).head_dropout
    if key == "preprocess fps":
        import yaml

        return yaml.safe_load(path.read_text())["preprocess"]["fps"]
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_matches_the_official_recipe_key_by_key(name):
    path = CONFIGS / name
    cfg = load_config(TrainConfig, path, ["dataset=unused"], section="train")
    wrong = {}
    for key, expected in EXPECTED[name].items():
        got = _value(cfg, path, key)
        same = got == pytest.approx(expected, rel=1e-6) if isinstance(expected, (float, list)) and expected else got == expected
        if not same:
            wrong[key] = (got, expected)
    assert not wrong, f"{name}: (ours, official) {wrong}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_keeps_its_global_batch_on_its_workers(name):
    cfg = load_config(TrainConfig, CONFIGS / name, ["dataset=unused"], section="train")
    # every world size the recipe may run with cuts the recipe's global batch into whole micro-batches
    plans = [BatchPlan.of(cfg.global_batch(), cfg.batch_size, world) for world in cfg.world_sizes()]
    assert {plan.global_batch for plan in plans} == {cfg.global_batch()}
    if name.startswith(("kinetics", "ssv2")):  # the official 512 videos per step on the recipe's 8 workers
        assert cfg.global_batch() == 512 and plans[-1].accumulation(0) * cfg.batch_size * cfg.num_workers == 512


def test_print_config_shows_a_recipe_without_its_required_keys(capsys):
    assert main(["train", str(CONFIGS / "ssv2_mvitv2_s_16x4.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "# required, not set: dataset" in out and "dataset: ???" in out
    assert "channel_order: bgr" in out and "name: sgd" in out
    # the same text as with the key set, but for that key
    assert main(["train", str(CONFIGS / "ssv2_mvitv2_s_16x4.yaml"), "dataset=s3://b/d", "--print-config"]) == 0
    with_dataset = capsys.readouterr().out
    strip = [line for line in out.splitlines() if not line.startswith(("# required", "dataset:"))]
    assert strip == [line for line in with_dataset.splitlines() if not line.startswith("dataset:")]
    # unknown keys are still errors
    assert main(["train", str(CONFIGS / "ssv2_mvitv2_s_16x4.yaml"), "epochz=1", "--print-config"]) == 2
    for stage in ("preprocess", "evaluate", "register"):
        assert main([stage, "--print-config"]) == 0
        assert "???" in capsys.readouterr().out
