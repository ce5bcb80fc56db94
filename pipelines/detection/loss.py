"""The AVA training loss: sigmoid binary cross-entropy over every (box, action), averaged (SlowFast's BCE
on the sigmoid of the RoI head), computed from the logits for numerical stability."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def action_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE of `logits (K, C)` against multi-hot `targets (K, C)` of the real boxes. With no box at all
    the loss is 0 and still part of the graph, so every parameter gets a (zero) gradient and DDP's
    all-reduce sees the same parameters on every rank."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
