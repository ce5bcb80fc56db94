"""Optimisation pieces of the training loop (pipelines/train/optim.py, objective.py), without Ray."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mvit
from pipelines.config import load_config
from pipelines.train import optim
from pipelines.train.config import MixupConfig, OptimConfig, TrainConfig
from pipelines.train.objective import Targets, soft_target_cross_entropy


def _model(**overrides):
    return mvit.create_model("mvitv2_debug", num_classes=5, **overrides)



def _named_groups(model, optimizer):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: (g["weight_decay"], g["lr"]) for g in optimizer.param_groups for p in g["params"]}


def test_no_decay_on_1d_params_and_on_pos_cls_only_when_asked():
    model = _model()
    by_name = _named_groups(model, optim.build_optimizer(model, OptimConfig(weight_decay=0.05), 1e-3))
    for name, param in model.named_parameters():
        expected = 0.0 if param.ndim <= 1 else 0.05
        assert by_name[name][0] == expected, name
    assert by_name["cls_token"][0] == 0.05 and by_name["blocks.0.attn.rel_pos_h"][0] == 0.05  # official default
    by_name = _named_groups(model, optim.build_optimizer(model, OptimConfig(zero_decay_pos_cls=True), 1e-3))
    assert by_name["cls_token"][0] == 0.0 and by_name["blocks.0.attn.rel_pos_h"][0] == 0.0
    assert by_name["blocks.0.attn.qkv.weight"][0] == 0.05


def test_layer_decay_and_head_multiplier_set_each_layers_lr():
    model = _model()
    depth = len(model.blocks)  # 4
    cfg = OptimConfig(layer_decay=0.5, head_lr_mult=10.0)
    by_name = _named_groups(model, optim.build_optimizer(model, cfg, 1.0))
    assert by_name["patch_embed.proj.weight"][1] == pytest.approx(0.5 ** (depth + 1))
    assert by_name["cls_token"][1] == pytest.approx(0.5 ** (depth + 1))
    for i in range(depth):
        assert by_name[f"blocks.{i}.mlp.fc1.weight"][1] == pytest.approx(0.5 ** (depth - i))
    assert by_name["norm.weight"][1] == pytest.approx(1.0)
    assert by_name["head.projection.weight"][1] == pytest.approx(10.0)


def test_frozen_backbone_leaves_only_the_head_to_the_optimizer():
    model = _model()
    optim.freeze_backbone(model)
    optimizer = optim.build_optimizer(model, OptimConfig(), 1e-3)
    names = set(_named_groups(model, optimizer))
    assert names == {"head.projection.weight", "head.projection.bias"}


def test_sgd_and_adamw_are_built_as_configured():
    model = _model()
    sgd = optim.build_optimizer(model, OptimConfig(name="sgd", momentum=0.9, nesterov=True), 0.02)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    adamw = optim.build_optimizer(model, OptimConfig(betas=[0.9, 0.95]), 1e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="optim.name"):
        load_config(TrainConfig, None, ["dataset=x", "optim.name=lamb"])


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr_in_every_group():
    model = _model()
    cfg = OptimConfig(warmup_epochs=2, warmup_start_factor=0.01, min_lr=1e-5, layer_decay=0.5)
    base = 1e-3
    optimizer = optim.build_optimizer(model, cfg, base)
    scheduler = optim.build_schedule(optimizer, cfg, epochs=10, steps_per_epoch=5, base_lr=base)
    scales = [g["lr_scale"] for g in optimizer.param_groups]
    lrs = []
    for _ in range(50):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    top = scales.index(max(scales))
    assert lrs[0][top] == pytest.approx(base * 0.01 * scales[top])  # warmup starts at lr x start factor
    assert lrs[5][top] == pytest.approx(base * (0.01 + 0.99 * 5 / 10) * scales[top])  # linear
    assert lrs[10][top] == pytest.approx(base * scales[top])  # the peak at the end of warmup
    mid = 10 + 40 // 2
    end_factor = 1e-5 / base
    assert lrs[mid][top] == pytest.approx(base * scales[top] * (end_factor + (1 - end_factor) * 0.5))
    assert lrs[49][top] == pytest.approx(base * scales[top] * (end_factor + (1 - end_factor) * 0.5 * (1 + math.cos(math.pi * 39 / 40))))
    for step in lrs:  # layer decay scales the whole curve
        for lr, scale in zip(step, scales):
            assert lr / scale == pytest.approx(step[top] / scales[top])


def test_the_lr_follows_the_global_batch_linearly():
    # 8 GPUs x 8 videos x 8 accumulated micro-batches = the recipe's 512: the recipe's LR
    assert optim.scaled_lr(1.6e-3, 512, 8 * 8 * 8) == pytest.approx(1.6e-3)
    assert optim.scaled_lr(1.6e-3, 512, 64) == pytest.approx(2e-4)


def test_soft_targets_without_mixup_give_label_smoothed_cross_entropy():
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    targets = Targets(5, MixupConfig(enabled=False), 0.1, torch.Generator().manual_seed(0))
    clips = torch.randn(6, 3, 2, 4, 4)
    same, soft = targets(clips, labels)
    assert same is clips
    torch.testing.assert_close(soft_target_cross_entropy(logits, soft),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_mixup_targets_are_mixed_and_carry_the_smoothing_once():
    labels = torch.tensor([0, 1, 2, 3])
    clips = torch.randn(4, 3, 2, 8, 8)
    targets = Targets(4, MixupConfig(enabled=True), 0.1, torch.Generator().manual_seed(0))
    mixed, soft = targets(clips, labels)
    assert mixed.shape == clips.shape and not torch.equal(mixed, clips)
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    # smoothing 0.1 over 4 classes: a class neither clip of a pair holds keeps exactly 0.1 / 4, not less
    assert soft.min().item() == pytest.approx(0.1 / 4)
