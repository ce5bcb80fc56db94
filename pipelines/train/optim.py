"""Optimisation of a training run: the optimizer over parameter groups and the LR schedule. The loop
(loop.py) only calls these; gradient accumulation over micro-batches is steps.py.

Parameter groups (as the official recipes): no weight decay on 1-D parameters (norms, biases), nor on
position embeddings / class token / rel-pos tables when `optim.zero_decay_pos_cls` (or the model's own
`zero_decay_pos_cls`) says so; layer-wise LR decay (`layer_decay` < 1: block i of D gets
lr x layer_decay^(D + 1 - (i + 1)), the stem 0, the final norm and head D + 1, as BEiT/MAE fine-tuning);
a head LR multiplier; and a frozen backbone (only `head.*` trains: linear probing).

The LR is given at a reference global batch (`lr` at `lr_batch` videos per optimizer step) and scaled
linearly to the run's global batch (`global_batch_size`, which gradient accumulation keeps on fewer GPUs,
so the recipe's LR holds there too).
"""

from __future__ import annotations

import math
import re

import torch

OPTIMIZERS = ("adamw", "sgd")
_STEM = re.compile(r"^(patch_embed|cls_token|pos_embed)")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_POS_CLS = ("pos_embed", "cls_token", "rel_pos")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP


def scaled_lr(lr: float, lr_batch: int, global_batch: int) -> float:
    """The linear scaling rule: `lr` holds at `lr_batch`; the run's LR at its effective global batch."""
    return lr * global_batch / lr_batch


def layer_id(name: str, depth: int) -> int:
    """0 for the stem (patch embedding, class token, position embeddings), i + 1 for block i, depth + 1
    for the rest (final norm, head)."""
    if _STEM.match(name):
        return 0
    block = _BLOCK.match(name)
    return int(block.group(1)) + 1 if block else depth + 1


def is_head(name: str) -> bool:
    return name.startswith("head.")


def freeze_backbone(model: torch.nn.Module) -> int:
    """requires_grad=False on everything but the head (before DDP wraps the model: DDP registers hooks for
    the parameters that need gradients when it is built). Returns the number of frozen tensors."""
    frozen = 0
    for name, param in unwrap(model).named_parameters():
        if not is_head(name):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def param_groups(model: torch.nn.Module, cfg, base_lr: float) -> list[dict]:
    """Groups by (weight decay, LR scale); each carries `lr_scale` and its own initial `lr`."""
    module = unwrap(model)
    depth = len(getattr(module, "blocks", ()))
    exempt = set(getattr(module, "no_weight_decay", lambda: set())())
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name in exempt or (cfg.zero_decay_pos_cls and any(k in name for k in _POS_CLS))
        scale = cfg.layer_decay ** (depth + 1 - layer_id(name, depth))
        if is_head(name):
            scale *= cfg.head_lr_mult
        key = (no_decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                           "lr_scale": scale, "lr": base_lr * scale}
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, cfg, base_lr: float) -> torch.optim.Optimizer:
    """`cfg` is the run's OptimConfig; `base_lr` the LR at the run's effective global batch."""
    groups = param_groups(model, cfg, base_lr)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=base_lr, betas=tuple(cfg.betas))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ValueError(f"config key 'optim.name' must be one of {OPTIMIZERS}, got {cfg.name!r}")


def lr_factor(step: int, *, total: int, warmup: int, start_factor: float, end_factor: float) -> float:
    """The LR at optimizer step `step` relative to the peak: linear warmup from `start_factor` to 1 over
    `warmup` steps, then half a cosine from 1 down to `end_factor` at `total` (SlowFast's
    COSINE_AFTER_WARMUP)."""
    if step < warmup:
        return start_factor + (1.0 - start_factor) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, cfg, *, epochs: int, steps_per_epoch: int, base_lr: float):
    """Per-optimizer-step schedule: every group follows `lr_factor` times its own initial LR, so layer
    decay and the head multiplier scale the whole curve (the end LR included), as in SlowFast."""
    total = epochs * steps_per_epoch
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    end = min(1.0, cfg.min_lr / base_lr) if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        return lr_factor(step, total=total, warmup=max(0, warmup), start_factor=cfg.warmup_start_factor, end_factor=end)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
