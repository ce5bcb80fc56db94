"""The AVA detector and its data path, without Ray: the RoI head reads the cells under each box, padded
and empty box slots change nothing, boxes and pixels move together, training/test boxes and clips are
chosen as the recipe says, keyframes land on their stored frames."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mvit
from pipelines.data.shards import DatasetError
from pipelines.detection.boxes import eval_size, eval_view, jitter_boxes, normalise, train_view
from pipelines.detection.data import Keyframe, clip_frames, multi_hot, pad_boxes, training_targets
from pipelines.detection.keyframes import BEFORE_THE_START, PAST_THE_END, place_keyframes
from pipelines.detection.loss import action_loss


def detector(name: str = "mvit_debug", **overrides) -> mvit.MViTDetector:
    torch.manual_seed(0)
    return mvit.create_model(name, head="roi", num_classes=5, drop_path_rate=0.0, **overrides)


# --- the RoI head -----------------------------------------------------------------------------------
def test_a_box_reads_the_feature_of_the_cells_under_it():
    """Tokens are laid out (t, h, w) after the class token; a box in input pixels covers the cells at the
    last stage's stride (16 for mvit_debug), and the head averages over time before RoIAlign."""
    model = detector().eval()
    assert model.feature_stride == 16 and model.head.roi_align.spatial_scale == 1 / 16
    assert mvit.get_config("mvit_b_16x4").input_multiple[-1] == 32  # MViT-B: RoIAlign at 1/32, as SlowFast
    grid = (4, 4, 6)  # T', H', W' of a (2, 3, 8, 64, 96) input
    channels = model.num_features
    feature = torch.linspace(1.0, 2.0, channels)  # positive in every channel: the max-pool returns it
    tokens = torch.zeros(2, 1 + math.prod(grid), channels)
    tokens[:, 0] = 100.0  # the class token: never pooled
    tokens[0, 1 + 2 * 24 + 1 * 6 + 3] = feature  # clip 0: time slice 2, row 1, column 3
    tokens[1, 1 + 0 * 24 + 3 * 6 + 0] = 2 * feature  # clip 1: time slice 0, row 3, column 0
    model.forward_tokens = lambda x: (tokens, grid)
    model.norm = nn.Identity()
    model.head.projection = nn.Identity()  # the logits are then the pooled features
    stride = 16
    cell = lambda row, col: [col * stride, row * stride, (col + 1) * stride, (row + 1) * stride]  # noqa: E731
    boxes = torch.tensor([[cell(1, 3), cell(3, 1), [0.0, 0.0, 96.0, 64.0]],
                          [cell(3, 0), cell(1, 3), [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    pooled = model(torch.zeros(2, 3, 8, 64, 96), boxes, mask)
    assert pooled.shape == (5, channels)
    # RoIAlign (aligned) samples each 1x1-cell box once per 7x7 bin, at bin centres; the middle bin's sample
    # lies on the cell's centre: the max over space is the cell's feature, averaged over the 4 time slices.
    torch.testing.assert_close(pooled[0], feature / 4)
    torch.testing.assert_close(pooled[1], torch.zeros(channels))  # (3, 1): x and y not swapped
    # the whole frame holds the cell too, seen through bilinear samples that fall between cell centres
    assert (pooled[2] > 0).all() and (pooled[2] <= feature / 4 + 1e-6).all()
    torch.testing.assert_close(pooled[3], 2 * feature / 4)  # clip 1's map for clip 1's box
    torch.testing.assert_close(pooled[4], torch.zeros(channels))


def test_padded_box_slots_are_never_read_and_empty_clips_are_fine():
    model = detector(input_size=(8, 32, 32)).double().eval()
    x = torch.randn(3, 3, 8, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[[1.0, 2.0, 20.0, 30.0], [0.0, 0.0, 0.0, 0.0]],
                          [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],  # a clip without boxes
                          [[5.0, 5.0, 31.0, 31.0], [10.0, 0.0, 12.0, 16.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    labels = torch.zeros(3, 2, 5, dtype=torch.float64)
    labels[0, 0, 1] = labels[2, 0, 3] = labels[2, 1, 0] = 1.0

    def loss_and_grads(boxes, labels):
        model.zero_grad()
        loss = action_loss(model(x, boxes, mask), labels[mask])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads(boxes, labels)
    garbage_boxes, garbage_labels = boxes.clone(), labels.clone()
    garbage_boxes[~mask] = torch.tensor([float("nan"), -1e9, 1e9, float("inf")], dtype=torch.float64)
    garbage_labels[~mask] = 7.0
    loss2, grads2 = loss_and_grads(garbage_boxes, garbage_labels)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)
    # The real boxes' logits do not depend on the other clips' slots either: clip 2 alone gives the same rows.
    alone = model(x[2:], boxes[2:], mask[2:])
    torch.testing.assert_close(alone, model(x, garbage_boxes, mask)[1:], rtol=1e-12, atol=1e-12)


def test_no_box_in_a_batch_gives_zero_loss_and_a_zero_gradient_for_every_parameter():
    """What DDP needs when one rank's batch has no box left: every parameter still gets a gradient."""
    model = detector(input_size=(8, 32, 32))
    logits = model(torch.randn(2, 3, 8, 32, 32), torch.zeros(2, 1, 4), torch.zeros(2, 1, dtype=torch.bool))
    assert logits.shape == (0, 5)
    loss = action_loss(logits, torch.zeros(0, 5))
    loss.backward()
    assert loss.item() == 0.0
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name


def test_action_loss_is_the_mean_binary_cross_entropy_over_boxes_and_actions():
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # -log(sigmoid(z)) for positives, -log(1 - sigmoid(z)) for negatives, averaged over the 4 entries
    expected = (math.log(2) + math.log(2) + math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 4
    assert action_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        action_loss(logits, targets[:1])


def test_kinetics_weights_initialise_the_backbone_and_detector_checkpoints_round_trip(tmp_path):
    torch.manual_seed(3)
    kinetics = mvit.create_model("mvit_debug", num_classes=400)
    torch.save({"model": kinetics.state_dict(), "config": kinetics.cfg.to_dict()}, tmp_path / "k400.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mvit.create_model("mvit_debug", head="roi", num_classes=80, checkpoint=tmp_path / "k400.pt")
    assert isinstance(model, mvit.MViTDetector) and model.head.projection.out_features == 80
    assert any("re-initialised" in str(w.message) for w in caught)
    own = model.state_dict()
    assert set(own) == set(kinetics.state_dict())  # the classifier's keys: checkpoints move between the two
    assert all(torch.equal(own[k], v) for k, v in kinetics.state_dict().items() if not k.startswith("head."))

    mvit.checkpoint.save_checkpoint(model, tmp_path / "det.pt")
    again = mvit.checkpoint.load_model(tmp_path / "det.pt")  # the config says head="roi"
    assert isinstance(again, mvit.MViTDetector)
    x, boxes = torch.randn(1, 3, 8, 32, 32), torch.tensor([[[0.0, 0.0, 16.0, 24.0]]])
    torch.testing.assert_close(again.eval()(x, boxes), model.eval()(x, boxes))
    with pytest.raises(ValueError, match="head must be one of"):
        mvit.get_config("mvit_debug", head="box")


# --- boxes and pixels ---------------------------------------------------------------------------------
def _scene(height: int = 48, width: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    """Four frames, dark, a white person at the box and a grey marker elsewhere (so flips are visible)."""
    frames = np.full((4, height, width, 3), 20, dtype=np.uint8)
    frames[:, 10:40, 8:20] = 255  # the person: x 8..20, y 10..40
    frames[:, 5:15, 44:60] = 120  # a marker, not a box
    return frames, torch.tensor([[8 / width, 10 / height, 20 / width, 40 / height]])


def test_training_views_move_boxes_and_pixels_together():
    frames, boxes = _scene()
    flipped = 0
    for seed in range(24):
        plain_video, plain_boxes, _ = train_view(frames, boxes, crop=32, jitter_scales=(40, 56), flip=False,
                                                 generator=torch.Generator().manual_seed(seed))
        video, out, kept = train_view(frames, boxes, crop=32, jitter_scales=(40, 56), flip=True,
                                      generator=torch.Generator().manual_seed(seed))
        # Same draws up to the coin: either the plain view, or it mirrored - pixels and boxes alike.
        if torch.equal(video, plain_video):
            torch.testing.assert_close(out, plain_boxes)
        else:
            flipped += 1
            assert torch.equal(video, plain_video.flip(-1))
            torch.testing.assert_close(out, torch.stack([32 - plain_boxes[:, 2], plain_boxes[:, 1],
                                                         32 - plain_boxes[:, 0], plain_boxes[:, 3]], dim=1))
        for x1, y1, x2, y2 in out.tolist():  # the box still frames the person's pixels
            inside = video[:, 0, math.ceil(y1) + 1:math.floor(y2) - 1, math.ceil(x1) + 1:math.floor(x2) - 1]
            if inside.numel():
                assert inside.float().mean() > 240, (seed, x1, y1, x2, y2)
        assert kept.tolist() == list(range(len(out)))
    assert 4 <= flipped <= 20  # a fair coin: 24 throws, P(outside) < 0.002


def test_boxes_cropped_away_are_dropped_with_their_labels():
    frames, _ = _scene()
    boxes = torch.tensor([[0.0, 0.0, 0.05, 0.05], [0.2, 0.2, 0.8, 0.8]])  # a 3x2 px corner box, a big one
    dropped = 0
    for seed in range(20):
        _, out, kept = train_view(frames, boxes, crop=32, jitter_scales=(48, 48), flip=False,
                                  generator=torch.Generator().manual_seed(seed))
        assert 1 in kept.tolist() and len(out) == len(kept)
        assert ((out[:, 2] - out[:, 0]) >= 1).all() and ((out[:, 3] - out[:, 1]) >= 1).all()
        dropped += 0 not in kept.tolist()
    assert dropped > 0  # the corner box leaves most crops (x offset 0..32 of 64)


def test_box_jitter_moves_each_edge_by_its_share_of_the_box_size():
    boxes = torch.tensor([[0.4, 0.3, 0.5, 0.7]]).repeat(4000, 1)  # 0.1 wide, 0.4 tall, far from the edges
    moved = jitter_boxes(boxes, 0.05, torch.Generator().manual_seed(0))
    assert (moved[:, 0] <= moved[:, 2]).all() and (moved[:, 1] <= moved[:, 3]).all()
    spread = (moved - boxes).std(dim=0)
    # sd 0.05 x (0.1, 0.4, 0.1, 0.4); 4000 draws estimate a std within ~1.1% (1/sqrt(2n)): 5% margin
    torch.testing.assert_close(spread, torch.tensor([0.005, 0.02, 0.005, 0.02]), rtol=0.05, atol=0)
    assert torch.equal(jitter_boxes(boxes[:3], 0.0, torch.Generator()), boxes[:3])


def test_test_views_keep_the_whole_frame_at_a_multiple_of_the_stride():
    assert eval_size(48, 64, 48, 16) == (48, 64)
    assert eval_size(96, 128, 48, 16) == (48, 64)
    assert eval_size(50, 90, 48, 16) == (48, 80)  # 86.4 wide rounds to 80
    assert eval_size(720, 1280, 256, 32) == (256, 448)  # AVA: 455 -> 448
    frames, boxes = _scene(96, 128)
    video, out = eval_view(frames, boxes, short_side=48, stride=16)
    assert video.shape == (4, 3, 48, 64)
    torch.testing.assert_close(out, torch.tensor([[4.0, 5.0, 10.0, 20.0]]))  # the person, halved
    assert video[:, 0, 6:19, 5:9].float().mean() > 240
    model_input = normalise(video, 0.45, 0.225)
    assert model_input.shape == (3, 4, 48, 64) and model_input.max() == pytest.approx((1 - 0.45) / 0.225)


def test_normalise_takes_the_recipes_per_channel_mean_and_std_and_channel_order():
    """ClipConfig.mean/std are lists (one value, or one per RGB channel) and channel_order may be bgr: the
    detection views are normalised as the classification clips are."""
    video = torch.zeros(2, 3, 4, 5, dtype=torch.uint8)
    video[:, 0], video[:, 1], video[:, 2] = 255, 51, 0  # R = 1.0, G = 0.2, B = 0.0
    mean, std = [0.5, 0.2, 0.1], [0.5, 0.25, 0.2]
    rgb = normalise(video, mean, std)
    assert rgb.shape == (3, 2, 4, 5)
    # (x - mean) / std per channel: R (1 - 0.5) / 0.5 = 1, G (0.2 - 0.2) / 0.25 = 0, B (0 - 0.1) / 0.2 = -0.5
    torch.testing.assert_close(rgb[:, 0, 0, 0], torch.tensor([1.0, 0.0, -0.5]))
    torch.testing.assert_close(normalise(video, mean, std, "bgr"), rgb.flip(0))
    torch.testing.assert_close(normalise(video, [0.45], [0.225]), normalise(video, 0.45, 0.225))


# --- what a training example holds --------------------------------------------------------------------
def _keyframe(boxes, actions, proposals) -> Keyframe:
    return Keyframe(key="k@5", video_id="v", t=5, frame=50, frames=60, boxes=np.array(boxes, dtype=np.float32),
                    actions=actions, person_ids=list(range(len(actions))),
                    proposals=np.array(proposals, dtype=np.float32).reshape(-1, 5), media=b"")


def test_training_boxes_are_groundtruth_plus_proposals_overlapping_one_by_more_than_0_9():
    truth = [[0.1, 0.1, 0.3, 0.5], [0.6, 0.2, 0.8, 0.6]]
    proposals = [
        [0.1, 0.1, 0.3, 0.49, 0.95],  # IoU 0.975 with person 0: joins, with person 0's actions
        [0.6, 0.2, 0.8, 0.55, 0.99],  # IoU 0.875 with person 1: not close enough
        [0.0, 0.8, 0.1, 1.0, 0.3],  # nobody
    ]
    boxes, targets = training_targets(_keyframe(truth, [[1, 3], [2]], proposals), 4, 0.9)
    torch.testing.assert_close(boxes, torch.tensor(truth + [proposals[0][:4]]))
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0]]))
    assert multi_hot([[4]], 4).tolist() == [[0, 0, 0, 1]]
    with pytest.raises(DatasetError, match="action id 5 is outside"):
        multi_hot([[5]], 4)


def test_a_clip_is_centred_on_its_keyframe_and_clamped_to_the_video():
    # SlowFast's sequence: start at keyframe - T * tau // 2, so the keyframe is frame T // 2 of the clip
    assert clip_frames(30, 60, 4, 5).tolist() == [20, 25, 30, 35]
    assert clip_frames(3, 60, 4, 5).tolist() == [0, 0, 3, 8]
    assert clip_frames(57, 60, 4, 5).tolist() == [47, 52, 57, 59]
    assert clip_frames(64, 130, 16, 4)[8] == 64


def test_padding_marks_the_real_rows():
    padded, mask = pad_boxes([torch.ones(2, 4), torch.ones(0, 4), torch.ones(1, 4)], 4)
    assert padded.shape == (3, 2, 4) and mask.tolist() == [[True, True], [False, False], [True, False]]
    assert padded[~mask].abs().sum() == 0
    assert pad_boxes([torch.ones(0, 4)], 4)[0].shape == (1, 1, 4)  # at least one slot: tensors stay 3-D


def test_keyframes_land_on_their_stored_frame_or_are_dropped_with_the_reason():
    extra = {"video_id": "v", "keyframes": [
        {"t": 901, "boxes": [[0, 0, 1, 1]], "actions": [[1]]},
        {"t": 905, "boxes": [], "actions": []},  # proposals only
        {"t": 960, "boxes": [[0, 0, 1, 1]], "actions": [[1]]},
    ]}
    # the chunk's first stored frame shows movie second 898.5; 30 fps; 63 s stored = 1890 frames
    placed, counts = place_keyframes(extra, first_frame_s=898.5, fps=30.0, frames=1890)
    assert [k["frame"] for k in placed["keyframes"]] == [75, 195, 1845]
    assert counts == {"labelled": 2, "unlabelled": 1, "dropped": {}}
    # the movie ends at 955 s (1695 frames): 960 is past the end; starting at 902 s, 901 is before the start
    placed, counts = place_keyframes(extra, first_frame_s=898.5, fps=30.0, frames=1695)
    assert [k["t"] for k in placed["keyframes"]] == [901, 905]
    assert [(d["t"], d["reason"]) for d in placed["dropped_keyframes"]] == [(960, PAST_THE_END)]
    assert counts == {"labelled": 1, "unlabelled": 1, "dropped": {PAST_THE_END: 1}}
    placed, counts = place_keyframes(extra, first_frame_s=902.0, fps=30.0, frames=1695)
    assert counts["dropped"] == {BEFORE_THE_START: 1, PAST_THE_END: 1}
    assert placed["first_frame_s"] == 902.0 and extra["keyframes"][0].get("frame") is None  # input untouched


def test_the_detection_task_is_chosen_by_the_manifest_and_checks_the_chunks_context(tmp_path):
    from pipelines.data.clips import ClipConfig
    from pipelines.data.shards import Manifest
    from pipelines.detection.config import DetectionConfig
    from pipelines.detection.task import detection_task

    def manifest(fmt: str) -> Manifest:
        config = {"source_format": fmt, "source": str(tmp_path), "fps": 30.0, "ava": {"context_s": 1.5}}
        return Manifest(0, {"a": 0, "c": 2}, [], config, "f", 0, 0)

    det = DetectionConfig()
    assert detection_task("ds", manifest("kinetics"), ClipConfig(), det) is None
    task = detection_task("ds", manifest("ava"), ClipConfig(num_frames=16, sampling_rate=4), det)  # 1.07 s: fits
    assert task.num_classes == 3 and task.action_ids == [1, 3]  # one output per action id up to the largest
    assert [c.id for c in task.categories] == [1, 3]  # no 60-class map next to the annotations: every class
    with pytest.raises(DatasetError, match=r"clip 32x3 .* reaches 1.60 s .* preprocess with ava.context_s >= 1.60"):
        detection_task("ds", manifest("ava"), ClipConfig(num_frames=32, sampling_rate=3), det)
