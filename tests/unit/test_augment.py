"""The recipes' training augmentations and clip/view sampling (pipelines/data/augment.py, sampling.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from pipelines.data import sampling as S


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _frames(shape, seed=0, dtype=torch.uint8) -> torch.Tensor:
    g = _gen(1000 + seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if dtype == torch.uint8 else torch.randn(shape, generator=g)


# ------------------------------------------------------------------------------------------- Temporal sampling

def test_segment_sampling_takes_one_frame_per_segment_random_in_training_centre_in_test():
    n, T = 32, 4  # segments of 8 frames: [0, 8), [8, 16), ...
    g = _gen(15)
    seen = [set() for _ in range(T)]
    for _ in range(200):
        idx = S.train_segment_indices(n, T, g)
        assert idx.shape == (T,) and idx.dtype == np.int64
        for i, f in enumerate(idx):
            assert 8 * i <= f < 8 * (i + 1)
            seen[i].add(int(f))
    assert all(s == set(range(8 * i, 8 * (i + 1))) for i, s in enumerate(seen)), "some frames of a segment never drawn"
    assert S.eval_segment_indices(30, 3).tolist() == [[5, 15, 25]]  # the centres of [0, 10), [10, 20), [20, 30)
    assert S.eval_segment_indices(32, 4).tolist() == [[4, 12, 20, 28]]
    two = S.eval_segment_indices(40, 4, views=2)  # a quarter and three quarters of the way through each segment
    assert two.tolist() == [[2, 12, 22, 32], [7, 17, 27, 37]]


def test_segment_sampling_with_more_segments_than_frames_repeats_frames_in_range():
    n, T = 5, 16
    g = _gen(16)
    for idx in [S.train_segment_indices(n, T, g) for _ in range(50)] + list(S.eval_segment_indices(n, T, views=3)):
        assert idx.shape == (T,) and idx.min() >= 0 and idx.max() <= n - 1
        assert (np.diff(idx) >= 0).all() and set(idx.tolist()) == set(range(n))
        for i, f in enumerate(idx):  # frame f covers [f, f+1); segment i covers [i n / T, (i+1) n / T)
            assert f < (i + 1) * n / T and f + 1 > i * n / T
    assert S.train_segment_indices(1, 8, g).tolist() == [0] * 8


def test_kinetics_window_and_test_clips():
    g = _gen(17)
    starts = []
    for _ in range(100):
        idx = S.random_clip_indices(100, 8, 4, g)
        assert (np.diff(idx) == 4).all() and 0 <= idx[0] and idx[-1] <= 99
        starts.append(int(idx[0]))
    assert min(starts) < 20 and max(starts) > 50  # starts spread over [0, 71]
    short = S.random_clip_indices(10, 8, 4, g)
    assert short.max() == 9 and short.min() >= 0
    views = S.eval_clip_indices(100, 8, 4, 5)
    assert views.shape == (5, 8) and views[0, 0] == 0 and views[-1, -1] == 99 and (np.diff(views[:, 0]) > 0).all()


# ---------------------------------------------------------------------------------------------- Test views

def test_three_spatial_crops_cover_the_long_side_in_the_documented_order():
    temporal, T, H, W, crop = 2, 3, 32, 80, 32
    cols = torch.arange(W, dtype=torch.uint8)
    # pixel = 100 * temporal clip + column: the crop's content tells which clip and which columns it holds
    clips = (cols + 100 * torch.arange(temporal, dtype=torch.uint8).view(-1, 1, 1, 1, 1)).expand(temporal, T, 3, H, W)
    views = S.eval_view_crops(clips.contiguous(), crop, 3, test_short_side=256)  # short side already = crop: no resize
    assert views.shape == (temporal * 3, T, 3, crop, crop)
    for t in range(temporal):
        spans = []
        for s in range(3):
            v = views[t * 3 + s]
            assert (v // 100 == t).all(), f"view {t * 3 + s} is not from temporal clip {t}"
            left = int(v[0, 0, 0, 0]) - 100 * t
            assert torch.equal(v[0, 0, 0] - 100 * t, cols[left:left + crop])
            spans.append((left, left + crop))
        assert spans[0][0] == 0 and spans[-1][1] == W, spans
        assert spans[0][0] < spans[1][0] < spans[2][0] and abs(spans[1][0] - (W - crop) / 2) <= 0.5
        assert set().union(*(range(a, b) for a, b in spans)) == set(range(W))


@pytest.mark.parametrize("height, width", [(48, 120), (96, 48), (40, 40)])
def test_three_crops_after_resizing_the_short_side_to_the_crop(height, width):
    crop = 32
    clip = _frames((2, 3, height, width), seed=7)
    resized = F.resize(clip, [crop], antialias=True)
    rh, rw = resized.shape[-2:]
    assert min(rh, rw) == crop
    offsets = S.spatial_crop_offsets(rh, rw, crop, 3)
    along = 1 if rw >= rh else 0  # crops move along the long side, the other coordinate stays 0
    lengths = (rh, rw)
    assert all(o[1 - along] == 0 for o in offsets)
    starts = [o[along] for o in offsets]
    assert starts[0] == 0 and starts[-1] + crop == lengths[along]
    assert set().union(*(range(a, a + crop) for a in starts)) == set(range(lengths[along]))
    out = S.spatial_crops(clip, crop, 3, test_short_side=256)
    assert out.shape == (3, 2, 3, crop, crop)
    for s, (top, left) in enumerate(offsets):
        assert torch.equal(out[s], resized[..., top:top + crop, left:left + crop])


def test_one_spatial_crop_is_the_centre_after_the_test_short_side():
    clip = _frames((2, 3, 48, 64), seed=8)
    out = S.eval_view_crops(clip[None], 32, 1, test_short_side=40)
    resized = F.resize(clip, [40], antialias=True)
    rh, rw = resized.shape[-2:]
    assert rh == 40
    [(top, left)] = S.spatial_crop_offsets(rh, rw, 32, 1)
    assert abs(top - (rh - 32) / 2) <= 0.5 and abs(left - (rw - 32) / 2) <= 0.5
    assert out.shape == (1, 2, 3, 32, 32) and torch.equal(out[0], resized[..., top:top + 32, left:left + 32])
    image = S.spatial_crops(clip[0], 32, 1, test_short_side=40)  # the image MViT's test crop
    assert image.shape == (1, 3, 32, 32) and torch.equal(image[0], out[0, 0])
    with pytest.raises(ValueError):
        S.spatial_crop_offsets(20, 40, 32, 3)
