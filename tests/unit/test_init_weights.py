"""init_checkpoint read on the driver (pipelines/train/init.py): every local layout, what is kept, and which
keys a run loads or initialises afresh. (models:/ URIs: tests/integration/test_finetune.py.)"""

from __future__ import annotations

import pytest
import torch

import mvit
from mvit.checkpoint import to_torchvision
from pipelines import artifact
from pipelines.config import load_config
from pipelines.train import init
from pipelines.train.config import TrainConfig
from pipelines.train.loop import build_model

LABELS = {"a": 0, "b": 1, "c": 2}
CFG = load_config(TrainConfig, None, ["dataset=x", "model=mvit_debug", "clip.num_frames=8", "clip.crop_size=32"])


def _trained_checkpoint(directory, label_map=LABELS):
    torch.manual_seed(0)
    model = mvit.create_model("mvit_debug", num_classes=len(label_map))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    artifact.save_training_state(directory, model, optimizer, scheduler, epoch=3, step=30, model_name="mvit_debug",
                                 train_config={}, label_map=label_map)
    return model


def test_a_training_checkpoint_directory_keeps_weights_config_and_labels_only(tmp_path):
    model = _trained_checkpoint(tmp_path)
    weights = init.read_init_weights(str(tmp_path))
    assert set(weights.state) == {"model", "config", "format", "model_name", "label_map"}  # no optimizer state
    built = build_model(CFG, LABELS, weights.state)
    for name, value in built.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    report = init.describe(built, weights.state, LABELS)
    assert report.new == [] and len(report.loaded) == len(model.state_dict())


def test_another_class_set_gets_a_new_head_even_with_as_many_classes(tmp_path):
    model = _trained_checkpoint(tmp_path)
    other = {"x": 0, "y": 1, "z": 2}
    weights = init.read_init_weights(str(tmp_path / artifact.CHECKPOINT_FILE))
    built = build_model(CFG, other, weights.state)
    report = init.describe(built, weights.state, other)
    assert report.new == ["head.projection.weight", "head.projection.bias"]
    assert not torch.equal(built.head.projection.weight, model.head.projection.weight)
    assert torch.equal(built.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_official_and_torchvision_layouts_are_read(tmp_path):
    torch.manual_seed(1)
    model = mvit.create_model("mvit_debug", num_classes=3)
    slowfast = tmp_path / "MVIT.pyth"
    torch.save({"model_state": model.state_dict(), "optimizer_state": {"lr": 1.0}, "epoch": 200}, slowfast)
    weights = init.read_init_weights(str(slowfast))
    assert set(weights.state) == {"model_state"}
    tv = tmp_path / "tv.pth"
    torch.save(to_torchvision(model.state_dict()), tv)
    for state in (weights.state, init.read_init_weights(str(tv)).state):
        built = build_model(CFG, LABELS, state)  # no label map: a head of the right size is kept
        assert init.describe(built, state, LABELS).new == []
        assert torch.equal(built.head.projection.weight, model.head.projection.weight)


def test_missing_and_unreadable_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        init.read_init_weights(str(tmp_path / "gone.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        init.read_init_weights(str(tmp_path / "bad.pt"))
