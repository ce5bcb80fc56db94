"""Video bytes -> normalised model input (C, T, H, W): shared by training, evaluation and serving.

Pure functions over bytes (no WebDataset, no Ray), so the MLflow pyfunc model can use them too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2

from pipelines.data.video import (
    VideoInput,
    clip_indices,
    clip_starts,
    decode_at,
    decode_frames,
    frame_times,
    resample_stream,
)


@dataclass
class ClipConfig:
    """How a clip is cut from a stored video; checkpoints carry it so inference decodes the same way."""

    num_frames: int = 16
    sampling_rate: int = 4  # source frames between two sampled frames (tau)
    crop_size: int = 224
    test_short_side: int = 256  # evaluation/inference: resize the short side to this, then centre-crop
    train_crop: str = "random_resized"  # random_resized | random
    min_crop_scale: float = 0.08  # random_resized only
    horizontal_flip: bool = True  # off for direction-sensitive data (SSv2, the synthetic set)
    mean: float = 0.45
    std: float = 0.225


# One decoder thread per clip: loaders parallelise across clips (DataLoader workers, DDP ranks), and
# FFmpeg's per-open thread start-up costs more than it saves on short clips.
LOADER_DECODE_THREADS = 1


def to_model_input(frames: np.ndarray, transform, clip: ClipConfig) -> torch.Tensor:
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, C, H, W) uint8
    video = transform(video)
    video = video.float().div_(255).sub_(clip.mean).div_(clip.std)
    return video.permute(1, 0, 2, 3).contiguous()  # (C, T, H, W)


def train_transform(clip: ClipConfig):
    crop = (
        v2.RandomResizedCrop(clip.crop_size, scale=(clip.min_crop_scale, 1.0), antialias=True)
        if clip.train_crop == "random_resized"
        else v2.RandomCrop(clip.crop_size, pad_if_needed=True)
    )
    steps = [crop] + ([v2.RandomHorizontalFlip()] if clip.horizontal_flip else [])
    return v2.Compose(steps)


def eval_transform(clip: ClipConfig):
    """Test-time single crop: short side to `test_short_side`, then the centre crop (official: 256 -> 224)."""
    return v2.Compose([v2.Resize(max(clip.test_short_side, clip.crop_size), antialias=True), v2.CenterCrop(clip.crop_size)])


def train_clip(data: bytes, frames_in_video: int, clip: ClipConfig, transform, rng: random.Random) -> torch.Tensor:
    """One random temporal window of a stored video; only its frames are decoded (see decode_frames)."""
    span = (clip.num_frames - 1) * clip.sampling_rate + 1
    start = rng.randint(0, max(0, frames_in_video - span))
    index = clip_indices(frames_in_video, clip.num_frames, clip.sampling_rate, start)
    return to_model_input(decode_frames(data, index, threads=LOADER_DECODE_THREADS), transform, clip)


def eval_views(data: bytes, clip: ClipConfig, views: int, frames_in_video: int) -> torch.Tensor:
    """`views` evenly spaced temporal clips of a stored sample of `frames_in_video` frames:
    (views, C, T, H, W); only the views' frames are decoded."""
    transform = eval_transform(clip)
    starts = clip_starts(frames_in_video, clip.num_frames, clip.sampling_rate, views)
    index = [clip_indices(frames_in_video, clip.num_frames, clip.sampling_rate, s) for s in starts]
    frames = decode_frames(data, np.concatenate(index), threads=LOADER_DECODE_THREADS)
    return torch.stack([to_model_input(frames, transform, clip) for frames in np.split(frames, views)])


def video_views(source: VideoInput, clip: ClipConfig, views: int, fps: float, stored_short_side: int = 0) -> torch.Tensor:
    """`views` evenly spaced temporal clips of any video (a user's, at any resolution, frame rate or
    length), cut as `eval_views` cuts a stored sample of the same motion: (views, C, T, H, W).

    The video is seen at `fps`, the frame rate of the clips the model trained on (0: the video's own):
    its frames' timestamps (`frame_times`, no decoding) are put on that time grid by preprocessing's rule
    (`resample_stream`: each grid point takes the frame on screen), the views are chosen on the grid, and
    only their frames are decoded, resized while decoding (`decode_at`) to the test short side, or to
    `stored_short_side` (the training data's, when smaller) so that the eval transform then scales them
    as it scales stored samples. Memory is that of the views' frames, whatever the video's length and
    resolution."""
    times = frame_times(source)
    grid = np.fromiter(resample_stream(((t, i) for i, t in enumerate(times.tolist())), fps), dtype=np.int64)
    starts = clip_starts(len(grid), clip.num_frames, clip.sampling_rate, views)
    picks = [grid[clip_indices(len(grid), clip.num_frames, clip.sampling_rate, s)] for s in starts]
    short_side = max(clip.test_short_side, clip.crop_size)
    if stored_short_side:
        short_side = min(short_side, stored_short_side)
    frames = decode_at(source, times, np.concatenate(picks), short_side=short_side)
    transform = eval_transform(clip)
    return torch.stack([to_model_input(np.stack([frames[int(i)] for i in pick]), transform, clip) for pick in picks])
