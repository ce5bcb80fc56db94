"""Which frames and which pixels make a clip: the recipes' temporal sampling and test views.

Frame indices are numpy int64 arrays into a constant-frame-rate stored video (what `video.decode_frames`
takes); random choices draw only from the `generator` passed in (a CPU torch.Generator seeded by the
caller), so the same generator state gives the same indices.

Test views of one video come in a fixed order, temporal-major: view v = t * spatial + s for temporal clip
t (earliest first) and spatial crop s (0 = left / top, then centre, then right / bottom), so per-view
scores of shape (temporal * spatial, K) can be averaged, or reshaped to (temporal, spatial, K), per video.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from pipelines.data.video import clip_indices, clip_starts

# ------------------------------------------------------------------------------------------ Temporal sampling

def segment_indices(num_frames_in_video: int, num_segments: int, offsets) -> np.ndarray:
    """One frame per segment: [0, n) cut into `num_segments` equal segments (fractional bounds); segment i
    takes the frame at position (i + offsets[i]) * n / num_segments, offsets in [0, 1). With more segments
    than frames, neighbouring segments share frames (indices repeat); indices stay in [0, n)."""
    n = max(1, num_frames_in_video)
    position = (np.arange(num_segments) + np.asarray(offsets, dtype=np.float64)) * n / num_segments
    return np.minimum(np.floor(position).astype(np.int64), n - 1)


def train_segment_indices(num_frames_in_video: int, num_segments: int, generator: torch.Generator) -> np.ndarray:
    """SSv2 training: T segments over the whole video, a uniformly random frame within each."""
    offsets = torch.rand(num_segments, generator=generator, dtype=torch.float64).numpy()
    return segment_indices(num_frames_in_video, num_segments, offsets)


def eval_segment_indices(num_frames_in_video: int, num_segments: int, views: int = 1) -> np.ndarray:
    """SSv2 test: (views, T); one view takes each segment's centre frame, `views` views the frames at
    (j + 0.5) / views of the way through each segment."""
    return np.stack([segment_indices(num_frames_in_video, num_segments, np.full(num_segments, (j + 0.5) / views))
                     for j in range(views)])


def random_clip_indices(num_frames_in_video: int, num_frames: int, sampling_rate: int,
                        generator: torch.Generator) -> np.ndarray:
    """Kinetics training: a window of `num_frames` frames `sampling_rate` apart at a uniformly random
    start; short videos repeat their last frame (`video.clip_indices`)."""
    span = (num_frames - 1) * sampling_rate + 1
    start = int(torch.randint(0, max(0, num_frames_in_video - span) + 1, (), generator=generator))
    return clip_indices(num_frames_in_video, num_frames, sampling_rate, start)


def eval_clip_indices(num_frames_in_video: int, num_frames: int, sampling_rate: int, views: int) -> np.ndarray:
    """Kinetics test: (views, T) indices of `views` evenly spaced windows, earliest first (`video.clip_starts`)."""
    return np.stack([clip_indices(num_frames_in_video, num_frames, sampling_rate, start)
                     for start in clip_starts(num_frames_in_video, num_frames, sampling_rate, views)])


# ------------------------------------------------------------------------------------------ Spatial test views

def eval_short_side(crop_size: int, spatial: int, test_short_side: int) -> int:
    """The short side frames are resized to before the test crops: `test_short_side` (never below the crop)
    for one centre crop (official: 256 -> 224), the crop size itself for several crops along the long side."""
    return max(test_short_side, crop_size) if spatial == 1 else crop_size


def spatial_crop_offsets(height: int, width: int, crop_size: int, spatial: int) -> list[tuple[int, int]]:
    """(top, left) of `spatial` crop_size x crop_size crops of a (resized) height x width frame.

    One crop: the centre. Several: spaced evenly along the long side (width when width >= height), the
    first at 0 and the last flush with the far edge, centred on the short side; three crops are
    left / centre / right (top / centre / bottom), centre offsets rounded up as SlowFast's `uniform_crop`.
    """
    if spatial < 1 or min(height, width) < crop_size:
        raise ValueError(f"cannot take {spatial} crops of {crop_size} from a {height}x{width} frame")

    def spaced(length: int, i: int, count: int) -> int:  # ceil(i * (length - crop) / (count - 1))
        return -(-i * (length - crop_size) // (count - 1)) if count > 1 else math.ceil((length - crop_size) / 2)

    along_width = width >= height
    offsets = []
    for i in range(spatial):
        along = spaced(width if along_width else height, i, spatial)
        across = spaced(height if along_width else width, 0, 1)
        offsets.append((across, along) if along_width else (along, across))
    return offsets


def spatial_crops(clip: torch.Tensor, crop_size: int, spatial: int, test_short_side: int) -> torch.Tensor:
    """(..., C, H, W) -> (spatial, ..., C, crop, crop): resize the short side (`eval_short_side`, bilinear
    with antialias as `clips.eval_transform`), then the crops of `spatial_crop_offsets`, in that order."""
    resized = F.resize(clip, [eval_short_side(crop_size, spatial, test_short_side)], antialias=True)
    height, width = resized.shape[-2:]
    return torch.stack([resized[..., top:top + crop_size, left:left + crop_size]
                        for top, left in spatial_crop_offsets(height, width, crop_size, spatial)])


def eval_view_crops(clips: torch.Tensor, crop_size: int, spatial: int, test_short_side: int) -> torch.Tensor:
    """All test views of one video: clips (temporal, T, C, H, W) (the frames of each temporal clip, earliest
    first) -> (temporal * spatial, T, C, crop, crop), view t * spatial + s = temporal clip t, crop s."""
    crops = spatial_crops(clips, crop_size, spatial, test_short_side)  # (spatial, temporal, T, C, crop, crop)
    return crops.transpose(0, 1).flatten(0, 1)
