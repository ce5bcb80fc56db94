"""MViT for AVA-style spatio-temporal action detection: the backbone plus the RoI head.

``MViTDetector`` is an :class:`~mvit.model.MViT` whose head is :class:`~mvit.heads.RoIHead` (config
``head="roi"``), following SlowFast's MViT detection path: the normalised tokens of the last stage, class
token dropped, reshaped to ``(B, C, T', H', W')``, averaged over T', RoIAligned (7x7, ``aligned=True``,
spatial scale 1 / the last stage's stride), max-pooled over space, dropout, a linear layer per action.
It returns logits in train and eval mode, as the classifier does; apply a sigmoid for scores (actions
are multi-label).

The state-dict keys are the classifier's (``patch_embed.*``, ``blocks.*``, ``norm.*``,
``head.projection.*``), so a Kinetics checkpoint loads into the backbone with the head re-initialised
(``mvit.create_model(name, head="roi", num_classes=80, checkpoint=k400)``), and SlowFast's own AVA
checkpoints (whose RoI head's linear layer is also ``head.projection``) load whole.

Boxes come padded per clip: ``boxes (B, N, 4)`` as ``x1, y1, x2, y2`` in input pixels and
``box_mask (B, N)`` marking the real ones; padded slots are never read (whatever they hold) and clips
without boxes are fine. The logits are those of the real boxes, clip by clip, slot by slot.
"""

from __future__ import annotations

import torch

from .config import MViTConfig
from .heads import RoIHead
from .model import MViT

ROI_RESOLUTION = 7


def rois_from_padded(boxes: torch.Tensor, box_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, N, 4)`` boxes and a ``(B, N)`` mask -> RoIAlign's ``(K, 5)`` rows ``(clip index, x1, y1, x2, y2)``
    of the masked-in boxes in row-major order. Padded slots are dropped before any arithmetic on them."""
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, N, 4) x1, y1, x2, y2 in input pixels, got shape {tuple(boxes.shape)}")
    if box_mask is None:
        box_mask = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    if box_mask.shape != boxes.shape[:2]:
        raise ValueError(f"box_mask {tuple(box_mask.shape)} must be (B, N) like boxes {tuple(boxes.shape)}")
    clip_index, slot = box_mask.nonzero(as_tuple=True)
    return torch.cat([clip_index[:, None].to(boxes.dtype), boxes[clip_index, slot]], dim=1)


class MViTDetector(MViT):
    """MViT backbone + AVA RoI head; see the module docstring."""

    def __init__(self, cfg: MViTConfig) -> None:
        if cfg.head != "roi":
            raise ValueError(f"MViTDetector needs a config with head='roi', got head={cfg.head!r}")
        super().__init__(cfg)
        stride_h, stride_w = cfg.input_multiple[-2:]
        if stride_h != stride_w:
            raise ValueError(f"RoIAlign takes one spatial scale; the last stage's strides differ ({stride_h}, {stride_w})")
        self.feature_stride = stride_w
        self.head = RoIHead(self.num_features, cfg.num_classes, spatial_scale=1.0 / stride_w,
                            resolution=ROI_RESOLUTION, dropout=cfg.head_dropout, aligned=True)

    def forward_rois(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Logits ``(K, num_classes)`` of RoIAlign's ``(K, 5)`` rows ``(clip index, x1, y1, x2, y2)`` (input pixels)."""
        tokens, grid = self.forward_tokens(x)
        return self.head(self.norm(tokens), grid, rois)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Video ``(B, 3, T, H, W)``, boxes ``(B, N, 4)`` in input pixels, mask ``(B, N)`` -> logits ``(K, num_classes)``
        of the ``K = box_mask.sum()`` real boxes."""
        return self.forward_rois(x, rois_from_padded(boxes, box_mask))
