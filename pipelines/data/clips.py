"""Stored sample bytes -> normalised model input: shared by training, evaluation and serving.

`ClipConfig` says how a clip (or an image) is cut from a stored sample and augmented; every checkpoint
carries it, so evaluation and the registered model decode the way training did. Pure functions over
bytes (no WebDataset, no Ray), so the MLflow pyfunc model can use them too.

Layouts: frames are decoded as (T, H, W, 3) uint8, augmented as torchvision's (T, C, H, W), and handed
to the model as (C, T, H, W); an image sample is (C, H, W) throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.data import augment, sampling
from pipelines.data.video import VideoInput, decode, decode_at, decode_frames, frame_times, resample_stream

SAMPLINGS = ("window", "segments")
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass
class RandAugmentConfig:
    """RandAugment as the recipes use it: rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}."""

    enabled: bool = False
    magnitude: float = 7.0
    num_ops: int = 4
    magnitude_std: float = 0.5
    ops: list[str] = field(default_factory=list)  # a subset of torchvision's ops ([] = all; see augment.RAND_AUGMENT_OPS)
    # Videos: false = on the decoded frames before the crop (SlowFast's order, the recipes'); true = on the
    # crop (timm's image order): ~3x more clips per loader core at 224 from 320p (README, loader benchmark).
    after_crop: bool = False


@dataclass
class ClipConfig:
    """How a clip is cut from a stored video (or an image from a stored picture) and augmented."""

    num_frames: int = 16  # T
    sampling_rate: int = 4  # window sampling: source frames between two sampled frames (tau)
    sampling: str = "window"  # window: T frames tau apart at a random start (Kinetics) | segments: one frame
    # from each of T equal segments of the whole video (SSv2)
    crop_size: int = 224
    train_crop: str = "random_resized"  # random_resized (Kinetics, ImageNet) | short_side_jitter (SSv2) | random
    min_crop_scale: float = 0.08  # random_resized: area share in [min_crop_scale, 1]
    crop_aspect: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # random_resized: aspect range
    jitter_short_side: list[int] = field(default_factory=lambda: [256, 320])  # short_side_jitter: [min, max]
    horizontal_flip: bool = True  # off for direction-sensitive data (SSv2, the synthetic set)
    rand_augment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    erase_prob: float = 0.0  # random erasing (one box of noise, the same on every frame)
    repeated_augment: int = 1  # clips augmented independently from one decode (Kinetics recipe: 2)
    test_short_side: int = 256  # one test crop: resize the short side to this, then the centre crop
    test_temporal_views: int = 1  # evenly spaced clips per video (Kinetics: 5)
    test_spatial_views: int = 1  # crops along the long side (SSv2: 3; then the short side is resized to crop_size)
    channel_order: str = "rgb"  # bgr: channels reversed before the model (the official SSv2 v2 weights expect it)
    mean: list[float] = field(default_factory=lambda: [0.45])  # per channel (RGB order), or one for all
    std: list[float] = field(default_factory=lambda: [0.225])

    def validate(self, where: str = "clip") -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"config key '{where}.{key}' {why}")

        if self.sampling not in SAMPLINGS:
            raise bad("sampling", f"must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.train_crop not in augment.CROPS:
            raise bad("train_crop", f"must be one of {augment.CROPS}, got {self.train_crop!r}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise bad("channel_order", f"must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        if len(self.jitter_short_side) != 2 or self.jitter_short_side[0] > self.jitter_short_side[1]:
            raise bad("jitter_short_side", f"must be [min, max], got {self.jitter_short_side}")
        if self.train_crop == "short_side_jitter" and self.jitter_short_side[0] < self.crop_size:
            raise bad("jitter_short_side", f"{self.jitter_short_side} must not go below crop_size {self.crop_size}")
        if len(self.crop_aspect) != 2:
            raise bad("crop_aspect", f"must be [min, max], got {self.crop_aspect}")
        for key in ("num_frames", "sampling_rate", "crop_size", "repeated_augment", "test_temporal_views",
                    "test_spatial_views"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if len(self.mean) not in (1, 3) or len(self.std) not in (1, 3):
            raise bad("mean", f"and std need 1 or 3 values, got {self.mean} / {self.std}")
        if not 0 <= self.erase_prob <= 1:
            raise bad("erase_prob", f"must be in [0, 1], got {self.erase_prob}")
        unknown = sorted(set(self.rand_augment.ops) - set(augment.RAND_AUGMENT_OPS))
        if unknown:
            raise bad("rand_augment.ops", f"has unknown op(s) {unknown}; use some of {list(augment.RAND_AUGMENT_OPS)}")


def clip_config_from_stored(data: dict[str, Any], origin: str = "checkpoint train_config.clip") -> ClipConfig:
    """A ClipConfig from a checkpoint's stored dict; checkpoints written before mean/std became per-channel
    lists stored single numbers."""
    from pipelines.config import from_dict

    data = dict(data)
    for key in ("mean", "std"):
        if isinstance(data.get(key), (int, float)):
            data[key] = [float(data[key])]
    return from_dict(ClipConfig, data, origin=origin)


# One decoder thread per clip: loaders parallelise across clips (DataLoader workers, DDP ranks), and
# FFmpeg's per-open thread start-up costs more than it saves on short clips.
LOADER_DECODE_THREADS = 1


def train_augment(clip: ClipConfig, image: bool = False) -> augment.TrainAugment:
    """The training augmentation of `clip`. Videos: RandAugment before the crop (SlowFast's video path) unless
    `rand_augment.after_crop`; images: after crop and flip (timm's image path, which the image MViT was
    trained with)."""
    ra = clip.rand_augment
    return augment.TrainAugment(
        crop_size=clip.crop_size, crop=clip.train_crop, min_scale=clip.min_crop_scale,
        aspect=tuple(clip.crop_aspect), short_side=tuple(clip.jitter_short_side), horizontal_flip=clip.horizontal_flip,
        rand_augment=ra.enabled, magnitude=ra.magnitude, num_ops=ra.num_ops, magnitude_std=ra.magnitude_std,
        rand_augment_ops=tuple(ra.ops), rand_augment_first=not (image or ra.after_crop), erase_prob=clip.erase_prob,
        mean=tuple(clip.mean), std=tuple(clip.std),
    )


def to_model_layout(x: torch.Tensor, clip: ClipConfig, image: bool = False) -> torch.Tensor:
    """Augmented (..., T, C, H, W) clips or (..., C, H, W) images -> the model's (..., C, T, H, W) /
    (..., C, H, W), channels reversed for `channel_order: bgr` (mean/std are given in RGB order and were
    applied before)."""
    if clip.channel_order == "bgr":
        x = x.flip(-3)
    return x if image else x.transpose(-4, -3).contiguous()


def train_frame_indices(frames_in_video: int, clip: ClipConfig, generator: torch.Generator) -> np.ndarray:
    """The frames of one training clip: a random window (Kinetics) or a random frame per segment (SSv2)."""
    if clip.sampling == "segments":
        return sampling.train_segment_indices(frames_in_video, clip.num_frames, generator)
    return sampling.random_clip_indices(frames_in_video, clip.num_frames, clip.sampling_rate, generator)


def decode_clip_frames(data: bytes, index: np.ndarray) -> torch.Tensor:
    """Frames `index` of a stored video as uint8 (T, C, H, W); only those frames are decoded."""
    return torch.from_numpy(decode_frames(data, index, threads=LOADER_DECODE_THREADS)).permute(0, 3, 1, 2)


def decode_image_tensor(data: bytes) -> torch.Tensor:
    from pipelines.data.images import decode_image

    return torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)  # (C, H, W) uint8, a writable copy


def train_clips(data: bytes, frames_in_video: int, clip: ClipConfig, transform: augment.TrainAugment,
                generator: torch.Generator, *, image: bool = False) -> torch.Tensor:
    """`clip.repeated_augment` augmented copies of one training sample, decoded once: (k, C, T, H, W)
    for a video, (k, C, H, W) for an image. Every draw comes from `generator`."""
    if image:
        def load() -> torch.Tensor:
            return decode_image_tensor(data)
    else:
        index = train_frame_indices(frames_in_video, clip, generator)

        def load() -> torch.Tensor:
            return decode_clip_frames(data, index)
    return to_model_layout(augment.repeated_augment(load, transform, clip.repeated_augment, generator), clip, image)


def eval_frame_indices(frames_in_video: int, clip: ClipConfig, temporal: int) -> np.ndarray:
    """(temporal, T) frame indices of the test clips, earliest first."""
    if clip.sampling == "segments":
        return sampling.eval_segment_indices(frames_in_video, clip.num_frames, temporal)
    return sampling.eval_clip_indices(frames_in_video, clip.num_frames, clip.sampling_rate, temporal)


def eval_views(data: bytes, clip: ClipConfig, temporal: int | None = None, frames_in_video: int | None = None, *,
               spatial: int | None = None, image: bool = False) -> torch.Tensor:
    """The test views of one sample, temporal-major (view t * spatial + s; see sampling.py):
    (temporal * spatial, C, T, H, W), or (spatial, C, H, W) for an image. Views default to the recipe's
    (`clip.test_temporal_views` x `clip.test_spatial_views`).

    With `frames_in_video` (a stored sample), only the views' frames are decoded; without it (any video
    a user hands to the registered model), the whole video is decoded once.
    """
    temporal = temporal or clip.test_temporal_views
    spatial = spatial or clip.test_spatial_views
    if image:
        frames = decode_image_tensor(data)[None, None]  # one "temporal clip" of one frame
    else:
        if frames_in_video:
            index = eval_frame_indices(frames_in_video, clip, temporal)
            decoded = decode_clip_frames(data, index.reshape(-1))
        else:
            everything = decode(data).frames
            index = eval_frame_indices(len(everything), clip, temporal)
            decoded = torch.from_numpy(everything[index.reshape(-1)]).permute(0, 3, 1, 2)
        frames = decoded.reshape(temporal, clip.num_frames, *decoded.shape[1:])  # (temporal, T, C, H, W)
    views = sampling.eval_view_crops(frames, clip.crop_size, spatial, clip.test_short_side)
    views = augment.normalize(views, tuple(clip.mean), tuple(clip.std))
    if image:
        views = views[:, 0]  # (spatial, C, H, W)
    return to_model_layout(views, clip, image)


def video_views(source: VideoInput, clip: ClipConfig, views: int | None = None, fps: float = 0.0,
                stored_short_side: int = 0, *, spatial: int | None = None) -> torch.Tensor:
    """The test views of any video (a user's, at any resolution, frame rate or length), cut as
    `eval_views` cuts a stored sample of the same motion: (views * spatial, C, T, H, W); `views` temporal
    clips and `spatial` crops (None: the recipe's).

    The video is seen at `fps`, the frame rate of the clips the model trained on (0: the video's own):
    its frames' timestamps (`frame_times`, no decoding) are put on that time grid by preprocessing's rule
    (`resample_stream`: each grid point takes the frame on screen), the views' frames are chosen on the
    grid, and only those are decoded, resized while decoding (`decode_at`) to the test short side, or to
    `stored_short_side` (the training data's, when smaller) so that the test crops then scale them as they
    scale stored samples. Memory is that of the views' frames, whatever the video's length and resolution."""
    temporal = views or clip.test_temporal_views
    spatial = spatial or clip.test_spatial_views
    times = frame_times(source)
    grid = np.fromiter(resample_stream(((t, i) for i, t in enumerate(times.tolist())), fps), dtype=np.int64)
    picks = grid[eval_frame_indices(len(grid), clip, temporal)]  # (temporal, T) frames of the video
    short_side = max(clip.test_short_side, clip.crop_size)
    if stored_short_side:
        short_side = min(short_side, stored_short_side)
    frames = decode_at(source, times, picks.reshape(-1), short_side=short_side)
    decoded = torch.from_numpy(np.stack([frames[int(i)] for i in picks.reshape(-1)])).permute(0, 3, 1, 2)
    clips = decoded.reshape(temporal, clip.num_frames, *decoded.shape[1:])  # (temporal, T, C, H, W)
    views = sampling.eval_view_crops(clips, clip.crop_size, spatial, clip.test_short_side)
    return to_model_layout(augment.normalize(views, tuple(clip.mean), tuple(clip.std)), clip, image=False)
