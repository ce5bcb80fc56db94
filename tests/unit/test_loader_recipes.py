"""The recipes' augmentations and sampling as the training loader and evaluation use them
(pipelines/data/clips.py, loader.py): repeated augmentation, segment sampling, test views, images, BGR."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipelines.config import ConfigError, load_config
from pipelines.data import clips as C
from pipelines.data.clips import ClipConfig, RandAugmentConfig
from pipelines.data.loader import eval_samples, train_loader
from pipelines.data.video import encode_mp4
from pipelines.train.config import TrainConfig

FRAMES = 40


def _numbered_video(frames: int = FRAMES, size: int = 32) -> bytes:
    """Frame i is flat grey 5 * i: a decoded pixel tells which frame it came from."""
    values = (np.arange(frames) * 5).astype(np.uint8)
    return encode_mp4(np.repeat(values[:, None, None, None], size * size * 3, 1).reshape(frames, size, size, 3), 10,
                      codec="mjpeg")


def _shard(path, samples) -> list[str]:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return [str(path)]


def _video_samples(count: int):
    return [{"__key__": f"v{i}", "mp4": _numbered_video(), "cls": str(i % 3).encode(),
             "json": json.dumps({"frames": FRAMES}).encode()} for i in range(count)]


def _frame_numbers(model_input: torch.Tensor, clip: ClipConfig) -> list[int]:
    """(C, T, H, W) normalised -> the frame number each of the T frames shows."""
    grey = model_input.mean(dim=(0, 2, 3)) * clip.std[0] + clip.mean[0]
    return [round(float(v) * 255 / 5) for v in grey]


def test_repeated_augmentation_decodes_once_per_sample_and_yields_k_clips_copy_major(tmp_path, monkeypatch):
    decoded = []
    real = C.decode_clip_frames
    monkeypatch.setattr(C, "decode_clip_frames", lambda data, index: decoded.append(1) or real(data, index))
    textured = encode_mp4(np.random.default_rng(0).integers(0, 255, (FRAMES, 32, 40, 3), dtype=np.uint8), 10)
    urls = _shard(tmp_path / "a.tar", [{**s, "mp4": textured} for s in _video_samples(6)])
    clip = ClipConfig(num_frames=4, sampling_rate=2, crop_size=24, train_crop="random_resized", repeated_augment=2,
                      horizontal_flip=True, rand_augment=RandAugmentConfig(enabled=True), erase_prob=0.25)
    from pipelines.data.loader import _decoded

    per_sample = list(_decoded(clip, seed=0)(_video_samples(6)))
    assert len(decoded) == 6 and [c.shape for c, _, _ in per_sample] == [(2, 3, 4, 24, 24)] * 6  # one decode, k clips
    batches = list(train_loader(urls, clip, batch_size=3, batches=2, shuffle_buffer=4, seed=0))
    assert len(batches) == 2
    for clips, labels, keys in batches:
        assert clips.shape == (6, 3, 4, 24, 24)
        assert keys[:3] == keys[3:] and torch.equal(labels[:3], labels[3:])  # copy-major: videos, then again
        for i in range(3):
            assert not torch.equal(clips[i], clips[i + 3])  # each copy its own augmentation draws


def test_segment_sampling_through_the_loader_takes_one_frame_from_each_segment(tmp_path):
    urls = _shard(tmp_path / "a.tar", _video_samples(4))
    clip = ClipConfig(num_frames=4, sampling="segments", crop_size=32, train_crop="random", horizontal_flip=False)
    seen = set()
    for clips, _, _ in train_loader(urls, clip, batch_size=2, batches=8, shuffle_buffer=4, seed=1):
        for one in clips:
            numbers = _frame_numbers(one, clip)
            segment = FRAMES // 4
            assert [n // segment for n in numbers] == [0, 1, 2, 3], numbers  # frame j lies in segment j
            seen.update(numbers)
    assert len(seen) > 8  # random within each segment, not a fixed frame
    # test: the centre frame of each segment
    ((views, _, _),) = list(eval_samples(urls[:1], clip, temporal=1))[:1]
    assert _frame_numbers(views[0], clip) == [5, 15, 25, 35]


@pytest.mark.parametrize("temporal, spatial", [(1, 5), (5, 1), (1, 3), (3, 1)])
def test_test_views_come_temporal_major_in_the_recipes_shapes(tmp_path, temporal, spatial):
    urls = _shard(tmp_path / "a.tar", [{**_video_samples(1)[0], "mp4": encode_mp4(
        np.random.default_rng(0).integers(0, 255, (FRAMES, 32, 48, 3), dtype=np.uint8), 10)}])
    clip = ClipConfig(num_frames=4, sampling_rate=2, crop_size=24, test_short_side=32,
                      test_temporal_views=temporal, test_spatial_views=spatial)
    ((views, label, key),) = list(eval_samples(urls, clip))
    assert views.shape == (temporal * spatial, 3, 4, 24, 24)
    if spatial > 1:  # crops along the long side differ; temporal clips of one crop position differ in time
        assert not torch.equal(views[0], views[spatial - 1])
    if temporal > 1:
        assert not torch.equal(views[0], views[spatial])


def test_bgr_reverses_the_channels_the_model_sees():
    data = encode_mp4(np.random.default_rng(1).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), 10)
    rgb = C.eval_views(data, ClipConfig(num_frames=4, sampling_rate=1, crop_size=24, test_short_side=32), 1, 8)
    bgr = C.eval_views(data, ClipConfig(num_frames=4, sampling_rate=1, crop_size=24, test_short_side=32,
                                        channel_order="bgr"), 1, 8)
    assert torch.equal(bgr, rgb.flip(1))


def _jpg(seed: int, size: int = 40) -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_image_samples_train_and_evaluate_as_images(tmp_path):
    samples = [{"__key__": f"i{i}", "jpg": _jpg(i), "cls": str(i % 2).encode(),
                "json": json.dumps({"frames": 1}).encode()} for i in range(4)]
    urls = _shard(tmp_path / "i.tar", samples)
    clip = ClipConfig(crop_size=32, test_short_side=36, rand_augment=RandAugmentConfig(enabled=True),
                      erase_prob=0.25, repeated_augment=2, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    clips, labels, keys = next(iter(train_loader(urls, clip, batch_size=2, batches=1, shuffle_buffer=4, seed=0)))
    assert clips.shape == (4, 3, 32, 32) and keys[:2] == keys[2:]
    views = [v for v, _, _ in eval_samples(urls, clip, spatial=3)]
    assert len(views) == 4 and views[0].shape == (3, 3, 32, 32)


def test_clip_keys_are_checked_by_name():
    for override, key in (("clip.sampling=dense", "clip.sampling"), ("clip.train_crop=centre", "clip.train_crop"),
                          ("clip.channel_order=rbg", "clip.channel_order"),
                          ("clip.rand_augment.ops=[Rotate,Spin]", "clip.rand_augment.ops"),
                          ("clip.jitter_short_side=[320,256]", "clip.jitter_short_side")):
        with pytest.raises((ValueError, ConfigError), match=key.replace(".", r"\.")):
            load_config(TrainConfig, None, ["dataset=x", override])


def test_checkpoints_with_scalar_mean_and_std_still_load():
    clip = C.clip_config_from_stored({"num_frames": 8, "mean": 0.45, "std": 0.225})
    assert clip.mean == [0.45] and clip.std == [0.225] and clip.num_frames == 8


def test_rand_augment_runs_before_the_crop_for_videos_unless_asked_and_after_it_for_images():
    clip = ClipConfig(rand_augment=RandAugmentConfig(enabled=True, ops=["Brightness"]))
    assert C.train_augment(clip).rand_augment_first and not C.train_augment(clip, image=True).rand_augment_first
    late = ClipConfig(rand_augment=RandAugmentConfig(enabled=True, after_crop=True))
    assert not C.train_augment(late).rand_augment_first
    assert C.train_augment(clip).rand_augment_ops == ("Brightness",)
