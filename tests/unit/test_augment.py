"""The recipes' training augmentations and clip/view sampling (pipelines/data/augment.py, sampling.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from pipelines.data import augment as A
from pipelines.data import sampling as S


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _frames(shape, seed=0, dtype=torch.uint8) -> torch.Tensor:
    g = _gen(1000 + seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if dtype == torch.uint8 else torch.randn(shape, generator=g)


# ------------------------------------------------------------------------------------------------ MixUp/CutMix

def test_soft_targets_sum_to_one_carry_the_smoothing_and_match_the_pixel_mix():
    K, B, eps = 10, 6, 0.1
    mix = A.MixUpCutMix(K, label_smoothing=eps)
    labels = torch.tensor([3, 7, 1, 0, 9, 4])  # neighbours (i, i-1 cyclic) are of different classes
    values = torch.arange(1.0, B + 1)  # clip i is constant values[i]: its mixed mean gives the pixel lam
    clips = values.view(B, 1, 1, 1, 1).expand(B, 3, 4, 16, 16).contiguous()
    g = _gen(0)
    for _ in range(40):
        mixed, targets = mix(clips, labels, g)
        assert targets.shape == (B, K)
        torch.testing.assert_close(targets.sum(1), torch.ones(B))
        # clips never mixed with a clip of the same class: every other class keeps exactly eps / K
        torch.testing.assert_close(targets.min(1).values, torch.full((B,), eps / K))
        for i in range(B):
            own, other = labels[i], labels[i - 1]
            lam = (mixed[i].mean() - values[i - 1]) / (values[i] - values[i - 1])  # share of clip i's pixels
            assert -1e-6 <= lam <= 1 + 1e-6
            torch.testing.assert_close(targets[i, own], (1 - eps) * lam + eps / K)
            torch.testing.assert_close(targets[i, other], (1 - eps) * (1 - lam) + eps / K)
    # a batch of one class: mixing changes nothing in the targets, which are the smoothed one-hots
    _, same = mix(clips, torch.full((B,), 2), g)
    expected = torch.full((B, K), eps / K)
    expected[:, 2] = 1 - eps + eps / K
    torch.testing.assert_close(same, expected)
    assert torch.equal(clips, values.view(B, 1, 1, 1, 1).expand(B, 3, 4, 16, 16))  # the input is left as it was


def test_mixup_and_cutmix_each_happen_about_half_the_time_and_the_cutmix_box_spans_all_frames():
    B, C, T, H, W = 4, 3, 5, 16, 16
    clips = torch.rand(B, C, T, H, W, generator=_gen(1))
    partner = clips.roll(1, 0)  # documented pairing: clip i with clip i-1
    mix = A.MixUpCutMix(5)
    labels = torch.tensor([0, 1, 2, 3])
    g = _gen(2)
    draws, cutmix, boxes = 400, 0, 0
    for _ in range(draws):
        out, _ = mix(clips, labels, g)
        from_partner = (out == partner) & (out != clips)
        if ((out == clips) | (out == partner)).all():  # every pixel from one of the two clips: CutMix
            cutmix += 1
            mask = from_partner[:, 0, 0]  # (B, H, W)
            assert (from_partner == mask[:, None, None]).all(), "the box differs between frames or channels"
            if mask.any():
                boxes += 1
                rows, cols = mask[0].any(1).nonzero().flatten(), mask[0].any(0).nonzero().flatten()
                box = torch.zeros(H, W, dtype=torch.bool)
                box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
                assert torch.equal(mask, box.expand(B, H, W)), "the pasted region is not one box shared by the batch"
        else:  # MixUp: one lam blends every pixel
            diff = clips - partner
            lam = float(((out - partner) * diff).sum() / (diff * diff).sum())  # least-squares fit of one lam
            assert 0 < lam < 1
            torch.testing.assert_close(out, lam * clips + (1 - lam) * partner)
    assert 0.42 * draws <= cutmix <= 0.58 * draws, f"CutMix in {cutmix} of {draws} batches, expected about half"
    assert boxes > 0.9 * cutmix  # an empty box happens only when lam is within ~1/64 of 1


def test_mixup_cutmix_on_images_and_rejects_bad_input():
    images = torch.rand(4, 3, 8, 8, generator=_gen(3))
    out, targets = A.MixUpCutMix(3)(images, torch.tensor([0, 1, 2, 0]), _gen(4))
    assert out.shape == images.shape and type(out) is torch.Tensor and targets.shape == (4, 3)
    with pytest.raises(ValueError):
        A.MixUpCutMix(3)(images[:1], torch.tensor([0]), _gen(4))
    with pytest.raises(ValueError):
        A.MixUpCutMix(3)((images * 255).to(torch.uint8), torch.tensor([0, 1, 2, 0]), _gen(4))


# ------------------------------------------------------------------------------------------------- RandAugment

def test_rand_augment_is_the_same_on_every_frame_and_differs_between_clips():
    frame = _frames((3, 24, 24))
    clip = frame.expand(6, 3, 24, 24).contiguous()  # six identical frames
    g = _gen(5)
    outputs = []
    for _ in range(12):
        out = A.rand_augment(clip, g)
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert (out == out[:1]).all(), "frames of one clip were augmented differently"
        outputs.append(out[0])
    distinct = {o.numpy().tobytes() for o in outputs}
    assert len(distinct) >= 8, f"12 clips got only {len(distinct)} different augmentations"
    assert sum(not torch.equal(o, frame) for o in outputs) >= 8
    # distinct frames: every frame gets what the same draws do to that frame alone (same ops, same magnitudes)
    clip = _frames((4, 3, 24, 24), seed=1)
    for seed in range(6):
        out = A.rand_augment(clip, _gen(seed), magnitude=9)
        for t in range(4):
            assert torch.equal(out[t], A.rand_augment(clip[t], _gen(seed), magnitude=9))
    with pytest.raises(TypeError):
        A.rand_augment(clip.float(), g)


def test_rand_augment_levels_map_onto_torchvision_bins_as_timm_scales_them():
    # timm: level m of 10 -> m / 10 of each op's range; the one-op v2.RandAugment at index round(m * 10) of 101 bins
    for level in (7.0, 7.3, 10.0, 0.0):
        op = A._one_rand_augment_op(round(level * 10), 128)
        space = op._AUGMENTATION_SPACE
        for name, top in (("Rotate", 30.0), ("ShearX", 0.3), ("Brightness", 0.9)):
            value = float(space[name][0](op.num_magnitude_bins, 224, 224)[op.magnitude])
            assert math.isclose(value, level / 10 * top, rel_tol=1e-5, abs_tol=1e-6), (name, level, value)


# ---------------------------------------------------------------------------------------------- Random erasing

def test_random_erasing_is_the_same_on_every_frame_differs_between_clips_and_happens_a_quarter_of_the_time():
    clip = torch.randn(3, 32, 32, generator=_gen(6)).expand(4, 3, 32, 32).contiguous()
    g = _gen(7)
    masks = []
    for _ in range(8):
        out = A.random_erase(clip, g, p=1.0)
        assert (out == out[:1]).all(), "frames of one clip were erased differently"
        changed = (out != clip).any(1)[0]  # (H, W)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        assert rows.numel() and cols.numel()
        box = torch.zeros_like(changed)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(changed | box, box) and changed.sum() > 0.9 * box.sum()  # one rectangle of noise
        masks.append(changed.numpy().tobytes())
    assert len(set(masks)) == 8
    erased = sum(not torch.equal(A.random_erase(clip, g), clip) for _ in range(400))
    assert 70 <= erased <= 130, f"erased {erased} of 400 clips at p=0.25"
    with pytest.raises(TypeError):
        A.random_erase(clip.to(torch.uint8), g)


# ----------------------------------------------------------------------------------------------- Spatial crops

def test_random_resized_crop_is_shared_by_frames_and_treats_a_clip_and_an_image_alike():
    frame = _frames((3, 40, 56), seed=2)
    clip = frame.expand(5, 3, 40, 56).contiguous()
    outputs = set()
    for seed in range(10):
        out = A.random_resized_crop(clip, 24, _gen(seed))
        assert out.shape == (5, 3, 24, 24) and (out == out[:1]).all()
        assert torch.equal(A.random_resized_crop(frame, 24, _gen(seed)), out[0])  # the image path draws the same box
        outputs.add(out[0].numpy().tobytes())
    assert len(outputs) == 10


def test_short_side_jitter_resizes_the_short_side_within_the_range_then_crops():
    clip = _frames((2, 3, 20, 30), seed=3)
    lo, hi, crop = 20, 24, 20
    resized = {s: F.resize(clip, [s], antialias=True) for s in range(lo, hi + 1)}
    seen = set()
    g = _gen(8)
    for _ in range(60):
        out = A.short_side_jitter_crop(clip, crop, g, short_side=(lo, hi))
        assert out.shape == (2, 3, crop, crop)
        found = {s for s, r in resized.items()
                 for top in range(r.shape[-2] - crop + 1) for left in range(r.shape[-1] - crop + 1)
                 if torch.equal(r[..., top:top + crop, left:left + crop], out)}
        assert found, "output is not a crop of the clip resized to a short side in the range"
        seen |= found
    assert seen == set(range(lo, hi + 1)), f"short sides seen: {sorted(seen)}"
    image = A.short_side_jitter_crop(clip[0], crop, _gen(9), short_side=(lo, hi))
    assert image.shape == (3, crop, crop)
    with pytest.raises(ValueError):
        A.short_side_jitter_crop(clip, 32, g, short_side=(lo, hi))


def test_flip_mirrors_all_frames_together():
    clip = _frames((3, 3, 8, 10), seed=4)
    g = _gen(10)
    kinds = []
    for _ in range(40):
        out = A.random_horizontal_flip(clip, g)
        assert torch.equal(out, clip) or torch.equal(out, clip.flip(-1))
        kinds.append(torch.equal(out, clip))
    assert 10 <= sum(kinds) <= 30


def test_train_augment_recipes_output_normalised_crops():
    clip = _frames((4, 3, 40, 50), seed=5)
    kinetics = A.TrainAugment(crop_size=32)
    ssv2 = A.TrainAugment(crop_size=32, crop="short_side_jitter", short_side=(40, 48), horizontal_flip=False)
    image = A.TrainAugment(crop_size=32, rand_augment_first=False, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for recipe, x in ((kinetics, clip), (ssv2, clip), (image, clip[0])):
        out = recipe(x, _gen(11))
        assert out.shape == x.shape[:-2] + (32, 32) and out.dtype == torch.float32
        assert out.min() < -1 and out.max() > 1  # normalised, not in [0, 1]
    no_aug = A.TrainAugment(crop_size=32, crop="short_side_jitter", short_side=(40, 40), horizontal_flip=False,
                            rand_augment=False, erase_prob=0.0)
    x = no_aug(clip, _gen(12))  # resize to exactly 40 on the short side, crop, normalise: nothing else
    resized = F.resize(clip, [40], antialias=True).float().div(255).sub(0.45).div(0.225)
    assert any(torch.allclose(resized[..., t:t + 32, left:left + 32], x)
               for t in range(resized.shape[-2] - 31) for left in range(resized.shape[-1] - 31))
    with pytest.raises(ValueError):
        A.TrainAugment(crop="center")


# -------------------------------------------------------------------------------------- Repeated augmentation

def test_repeated_augmentation_decodes_once_and_augments_each_copy_independently():
    calls = []

    def decode():
        calls.append(1)
        return _frames((4, 3, 40, 48), seed=6)

    recipe = A.TrainAugment(crop_size=32)
    out = A.repeated_augment(decode, recipe, 2, _gen(13))
    assert len(calls) == 1
    assert out.shape == (2, 4, 3, 32, 32) and not torch.equal(out[0], out[1])
    again = A.repeated_augment(decode, recipe, 2, _gen(13))
    assert torch.equal(out, again)
    many = A.repeated_augment(decode, recipe, 4, _gen(14))
    assert len({c.numpy().tobytes() for c in many}) == 4


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


# ------------------------------------------------------------------------------------------------- Determinism

def _everything(seed: int):
    g = _gen(seed)
    clip = _frames((4, 3, 40, 48), seed=9)
    kinetics = A.TrainAugment(crop_size=32)
    ssv2 = A.TrainAugment(crop_size=32, crop="short_side_jitter", short_side=(40, 44), horizontal_flip=False)
    batch = torch.stack([kinetics(clip, g) for _ in range(3)] + [ssv2(clip, g)]).transpose(1, 2)  # (B, C, T, H, W)
    mixed, targets = A.MixUpCutMix(7)(batch, torch.tensor([1, 2, 3, 4]), g)
    return [mixed, targets, A.repeated_augment(lambda: clip, kinetics, 2, g),
            torch.from_numpy(S.train_segment_indices(50, 8, g)), torch.from_numpy(S.random_clip_indices(300, 16, 4, g))]


def test_outputs_are_a_function_of_the_seed_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = _everything(0)
    assert torch.equal(torch.get_rng_state(), state), "the global torch RNG was advanced"
    torch.manual_seed(999)  # a different global state must not matter
    again = _everything(0)
    other = _everything(1)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
