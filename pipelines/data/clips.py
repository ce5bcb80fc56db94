"""Video bytes -> normalised model input (C, T, H, W): shared by training, evaluation and serving.

Pure functions over bytes (no WebDataset, no Ray), so the MLflow pyfunc model can use them too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2

from pipelines.data.video import clip_indices, clip_starts, decode, decode_frames


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


def eval_views(data: bytes, clip: ClipConfig, views: int, frames_in_video: int | None = None) -> torch.Tensor:
    """`views` evenly spaced temporal clips of one video: (views, C, T, H, W).

    With `frames_in_video` (a stored sample), only the views' frames are decoded; without it (any video
    a user hands to the registered model), the whole video is decoded once.
    """
    transform = eval_transform(clip)
    if frames_in_video:
        starts = clip_starts(frames_in_video, clip.num_frames, clip.sampling_rate, views)
        index = [clip_indices(frames_in_video, clip.num_frames, clip.sampling_rate, s) for s in starts]
        frames = decode_frames(data, np.concatenate(index), threads=LOADER_DECODE_THREADS)
        clips = np.split(frames, views)
    else:
        everything = decode(data).frames
        clips = [everything[clip_indices(len(everything), clip.num_frames, clip.sampling_rate, s)]
                 for s in clip_starts(len(everything), clip.num_frames, clip.sampling_rate, views)]
    return torch.stack([to_model_input(frames, transform, clip) for frames in clips])
