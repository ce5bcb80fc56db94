"""Heads: the classification head (class token) and an AVA-style RoI head for detection features."""

from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """Class token -> dropout -> ``projection`` (keys ``head.projection.*`` as in SlowFast).

    ``num_classes=0`` gives an identity projection (features out), as in timm.
    """

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.dim = dim
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection: nn.Module = nn.Identity()
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        if num_classes > 0:
            proj = nn.Linear(self.dim, num_classes)
            nn.init.trunc_normal_(proj.weight, std=0.02)
            nn.init.constant_(proj.bias, 0.02)
            device = next((p.device for p in self.parameters()), None)
            self.projection = proj if device is None else proj.to(device)
        else:
            self.projection = nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]  # class token
        if pre_logits:
            return x
        return self.projection(self.dropout(x))


class RoIHead(nn.Module):
    """AVA head: RoIAlign on the last stage's feature map, max over space, mean over time, linear.

    Follows SlowFast's ``ResNetRoIHead`` for MViT: the class token is dropped, the tokens are reshaped to
    ``(B, C, T, H, W)`` (tokens are ordered t, then h, then w), averaged over T, RoIAligned at
    ``resolution`` and max-pooled. ``boxes`` is a float tensor ``(K, 5)`` of ``(batch_index, x1, y1, x2,
    y2)`` in input pixels; ``spatial_scale`` is 1 / the last stage's spatial stride. Returns logits
    ``(K, num_classes)`` (use a sigmoid/BCE loss: AVA actions are multi-label). Zero boxes give ``(0,
    num_classes)`` logits that are still part of the graph (every parameter gets a zero gradient).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        spatial_scale: float = 1.0 / 32,
        resolution: int = 7,
        dropout: float = 0.5,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        from torchvision.ops import RoIAlign

        self.dim = dim
        self.roi_align = RoIAlign((resolution, resolution), spatial_scale=spatial_scale, sampling_ratio=0, aligned=aligned)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = nn.Linear(dim, num_classes)
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        """A new projection for ``num_classes`` (initialised as the classification head's)."""
        proj = nn.Linear(self.dim, num_classes)
        nn.init.trunc_normal_(proj.weight, std=0.02)
        nn.init.constant_(proj.bias, 0.02)
        self.projection = proj.to(self.projection.weight.device)

    def feature_map(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Tokens ``(B, 1 + L, C)`` (class token first) -> the time-averaged map ``(B, C, H, W)``."""
        b, _, c = tokens.shape
        return tokens[:, 1:].transpose(1, 2).reshape(b, c, *grid).mean(dim=2)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int], boxes: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(tokens, grid)
        # RoIAlign in at least float32: box corners in bf16 would be off by up to a pixel at 224.
        dtype = torch.promote_types(fmap.dtype, torch.float32)
        x = self.pool(self.roi_align(fmap.to(dtype), boxes.to(dtype))).flatten(1).to(fmap.dtype)
        return self.projection(self.dropout(x))
