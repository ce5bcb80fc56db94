"""Boxes and pixels transformed together: the spatial views of a keyframe clip for training and testing.

Boxes arrive normalised to the stored frame (AVA's x1, y1, x2, y2 in [0, 1]) and leave in the view's
pixels, as RoIAlign takes them. The geometry is torchvision's (`transforms.v2.functional` on a `Video`
and its `BoundingBoxes`, which resize, crop and flip both alike); the random choices (short side,
crop offset, flip) are drawn here from the caller's `torch.Generator`, so a view is a function of its seed.

Training (SlowFast's AVA recipe): short side uniform in `jitter_scales`, a random `crop` x `crop` square,
a horizontal flip with probability 1/2; boxes are clipped to the crop and those left narrower or lower
than `MIN_BOX_PIXELS` are dropped (with their labels: the caller gets the kept rows' indices). Optionally
each box edge first moves by N(0, `box_jitter` x the box's size) (detector boxes are never exact).
Testing: the whole frame, short side `short_side`, both sides rounded to a multiple of the model's stride.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from pipelines.data import augment

MIN_BOX_PIXELS = 1.0


def _video(frames: np.ndarray) -> tv_tensors.Video:
    """(T, H, W, 3) uint8 frames -> a (T, 3, H, W) Video."""
    return tv_tensors.Video(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))


def _pixel_boxes(boxes: torch.Tensor, height: int, width: int) -> tv_tensors.BoundingBoxes:
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return tv_tensors.BoundingBoxes(boxes.float().reshape(-1, 4) * scale, format="XYXY", canvas_size=(height, width))


def jitter_boxes(boxes: torch.Tensor, sd: float, generator: torch.Generator) -> torch.Tensor:
    """Each edge of each normalised box moved by N(0, sd x the box's width or height), kept in [0, 1], x1 <= x2, y1 <= y2."""
    if sd <= 0 or len(boxes) == 0:
        return boxes
    size = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1)
    moved = (boxes + torch.randn(boxes.shape, generator=generator) * sd * size).clamp(0.0, 1.0)
    x = torch.sort(moved[:, 0::2], dim=1).values
    y = torch.sort(moved[:, 1::2], dim=1).values
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def train_view(frames: np.ndarray, boxes: torch.Tensor, *, crop: int, jitter_scales: tuple[int, int], flip: bool,
               generator: torch.Generator, box_jitter: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random training view: (video (T, 3, crop, crop) uint8, boxes (K', 4) in its pixels, indices (K',) of
    the input boxes kept)."""
    video = _video(frames)
    height, width = video.shape[-2:]
    boxes = jitter_boxes(boxes.float(), box_jitter, generator)
    pixel_boxes = _pixel_boxes(boxes, height, width)
    low, high = int(jitter_scales[0]), int(jitter_scales[1])
    short = int(torch.randint(low, high + 1, (1,), generator=generator))
    video, pixel_boxes = TF.resize(video, [short], antialias=True), TF.resize(pixel_boxes, [short])
    height, width = video.shape[-2:]
    if height < crop or width < crop:
        raise ValueError(f"a {crop}x{crop} crop does not fit a {width}x{height} view; jitter_scales {jitter_scales} "
                         f"must be >= the crop size {crop}")
    top = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
    video, pixel_boxes = TF.crop(video, top, left, crop, crop), TF.crop(pixel_boxes, top, left, crop, crop)
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        video, pixel_boxes = TF.horizontal_flip(video), TF.horizontal_flip(pixel_boxes)
    out = pixel_boxes.as_subclass(torch.Tensor)
    keep = ((out[:, 2] - out[:, 0]) >= MIN_BOX_PIXELS) & ((out[:, 3] - out[:, 1]) >= MIN_BOX_PIXELS)
    return video.as_subclass(torch.Tensor), out[keep], keep.nonzero().flatten()


def eval_size(height: int, width: int, short_side: int, stride: int) -> tuple[int, int]:
    """The test view's size: short side `short_side`, the long side in proportion, both rounded to a multiple of `stride`."""
    scale = short_side / min(height, width)
    return (max(stride, round(height * scale / stride) * stride), max(stride, round(width * scale / stride) * stride))


def eval_view(frames: np.ndarray, boxes: torch.Tensor, *, short_side: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole frame at test scale: (video (T, 3, H', W') uint8, boxes (K, 4) in its pixels)."""
    video = _video(frames)
    size = eval_size(*video.shape[-2:], short_side, stride)
    pixel_boxes = _pixel_boxes(boxes, *video.shape[-2:])
    video, pixel_boxes = TF.resize(video, list(size), antialias=True), TF.resize(pixel_boxes, list(size))
    return video.as_subclass(torch.Tensor), pixel_boxes.as_subclass(torch.Tensor)


def normalise(video: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float],
              channel_order: str = "rgb") -> torch.Tensor:
    """(T, 3, H, W) uint8 -> the model's (3, T, H, W) float input: mean/std one value or per RGB channel
    (clip.mean / clip.std), channels then reversed for `channel_order` "bgr", as the classification clips."""
    x = augment.normalize(video, mean, std)
    if channel_order == "bgr":
        x = x.flip(-3)
    return x.permute(1, 0, 2, 3).contiguous()
