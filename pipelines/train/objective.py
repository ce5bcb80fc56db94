"""What a training step minimises: soft-target cross entropy against targets that carry the label
smoothing, mixed by MixUp/CutMix when the recipe turns them on (augment.MixUpCutMix).

Without MixUp the targets are the smoothed one-hots, so the loss equals
F.cross_entropy(logits, labels, label_smoothing=eps); with it, the smoothing comes from MixUpCutMix (the
official recipes' soft_cross_entropy with MIXUP.LABEL_SMOOTH_VALUE), never from F.cross_entropy as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.data.augment import MixUpCutMix, smooth_one_hot
from pipelines.train.config import MixupConfig


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets_k log softmax(logits)_k."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class Targets:
    """(clips, labels) -> (model input, soft targets (B, K)); the mixing draws come from `generator`
    (the loop seeds one per rank, so ranks mix differently and a run repeats)."""

    def __init__(self, num_classes: int, mixup: MixupConfig, label_smoothing: float, generator: torch.Generator):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.generator = generator
        self.mix = (MixUpCutMix(num_classes, mixup_alpha=mixup.mixup_alpha, cutmix_alpha=mixup.cutmix_alpha,
                                switch_prob=mixup.switch_prob, label_smoothing=label_smoothing)
                    if mixup.enabled else None)

    def __call__(self, clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is None:
            return clips, smooth_one_hot(labels, self.num_classes, self.label_smoothing).to(clips.device)
        mixed, targets = self.mix(clips, labels.cpu(), self.generator)
        return mixed, targets.to(clips.device)
