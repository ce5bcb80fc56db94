"""AVA detection between the shards and the evaluator, without Ray: keyframe examples read from a real
shard (the clip centred on the keyframe's stored frame, training boxes = groundtruth + close proposals,
test boxes = proposals above the score), the padded batches the model takes, the scores written as the
official prediction rows and ranked by the official rules, the task's loss, the detection pyfunc."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds

import mvit
from pipelines.data.clips import ClipConfig
from pipelines.data.shards import MEDIA_KEY, DatasetError, Manifest
from pipelines.data.video import encode_mp4
from pipelines.detection import ava_eval
from pipelines.detection.config import DetectionConfig
from pipelines.detection.data import DetectionBatch, Keyframe, eval_batches, keyframes_of, train_loader
from pipelines.detection.loss import action_loss
from pipelines.detection.scoring import (
    FrameScores,
    detection_rows,
    frame_map,
    groundtruth_csv,
    score_keyframes,
    validation_map,
)
from pipelines.detection.task import DetectionTask

FPS = 10
MEAN, STD = 0.45, 0.225


def brightness(index: int) -> int:
    """Stored frame `index` is a uniform grey of this level: a clip's frames can be read back from pixels."""
    return 5 + 8 * index


def grey_video(frames: int, height: int, width: int) -> bytes:
    video = np.stack([np.full((height, width, 3), brightness(i), dtype=np.uint8) for i in range(frames)])
    return encode_mp4(video, FPS, codec="mjpeg", qscale=2)


# Video A (48x64, 30 frames): keyframe 1 s (frame 10) with two persons and three proposals, keyframe 2 s
# (frame 20) with a proposal only. Video B (64x64, 20 frames): keyframe 1 s with one person, no proposal.
PERSON_0, PERSON_1 = [0.1, 0.1, 0.45, 0.9], [0.55, 0.1, 0.9, 0.9]
A_PROPOSALS = [
    [0.1, 0.1, 0.45, 0.88, 0.95],  # IoU 0.975 with person 0: a training box with person 0's actions; tested
    [0.55, 0.1, 0.9, 0.7, 0.5],  # IoU 0.75 with person 1: not a training box; below the test score
    [0.5, 0.0, 0.6, 0.2, 0.85],  # nobody: not a training box; tested
]
A_KEYFRAMES = [
    {"t": 1, "frame": 10, "boxes": [PERSON_0, PERSON_1], "actions": [[1], [2, 3]], "person_ids": [0, 1],
     "proposals": A_PROPOSALS},
    {"t": 2, "frame": 20, "boxes": [], "actions": [], "person_ids": [], "proposals": [[0.2, 0.2, 0.6, 0.9, 0.9]]},
]
B_KEYFRAMES = [{"t": 1, "frame": 10, "boxes": [[0.25, 0.2, 0.75, 0.95]], "actions": [[3]], "person_ids": [4],
                "proposals": []}]


def sample(key: str, video_id: str, frames: int, height: int, width: int, keyframes: list[dict]) -> dict:
    meta = {"frames": frames, "fps": FPS, "extra": {"video_id": video_id, "keyframes": keyframes}}
    return {"__key__": key, MEDIA_KEY: grey_video(frames, height, width), "json": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ava_shard") / "train-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write(sample("vidA_000", "vidA", 30, 48, 64, A_KEYFRAMES))
        writer.write(sample("vidB_000", "vidB", 20, 64, 64, B_KEYFRAMES))
    return str(path)


def clip_config(**overrides) -> ClipConfig:
    return ClipConfig(**{"num_frames": 4, "sampling_rate": 3, "crop_size": 48, "test_short_side": 48,
                         "mean": MEAN, "std": STD, "horizontal_flip": False, **overrides})


def pixel_levels(clip: torch.Tensor) -> list[float]:
    """(3, T, H, W) normalised model input -> the mean grey level of each frame."""
    return ((clip * STD + MEAN) * 255).mean(dim=(0, 2, 3)).tolist()


def detector(num_classes: int = 3) -> mvit.MViTDetector:
    torch.manual_seed(0)
    return mvit.create_model("mvit_debug", head="roi", num_classes=num_classes, drop_path_rate=0.0)


# --- keyframes out of stored chunks -----------------------------------------------------------------
def test_a_chunk_yields_its_keyframes_with_boxes_actions_and_proposals(shard):
    from pipelines.data.shards import read_samples

    first = next(read_samples([shard]))
    every = list(keyframes_of(first, labelled_only=False))
    assert [(k.key, k.t, k.frame, k.frames) for k in every] == [("vidA_000@1", 1, 10, 30), ("vidA_000@2", 2, 20, 30)]
    np.testing.assert_allclose(every[0].boxes, [PERSON_0, PERSON_1])
    assert every[0].actions == [[1], [2, 3]] and every[0].proposals.shape == (3, 5)
    assert every[1].boxes.shape == (0, 4) and every[1].media is every[0].media  # one chunk, shared bytes
    assert [k.t for k in keyframes_of(first, labelled_only=True)] == [1]
    stale = {**first, "json": json.dumps({"frames": 30, "extra": {"video_id": "vidA", "keyframes": [
        {"t": 1, "boxes": [PERSON_0], "actions": [[1]]}]}})}
    with pytest.raises(DatasetError, match="keyframe 1 has no stored frame index.*preprocess the AVA source again"):
        list(keyframes_of(stale, labelled_only=True))


def test_test_batches_score_every_keyframe_once_on_proposals_above_the_score(shard):
    items = list(eval_batches([shard], clip_config(), DetectionConfig(test_score=0.8), stride=16, batch_size=4))
    # A's views are 48x64, B's 48x48: a batch ends where the size changes
    assert [item.batch.keys for item in items] == [["vidA_000@1", "vidA_000@2"], ["vidB_000@1"]]
    assert [item.frames for item in items] == [[("vidA", 1), ("vidA", 2)], [("vidB", 1)]]
    first, second = items
    assert first.batch.clips.shape == (2, 3, 4, 48, 64) and second.batch.clips.shape == (1, 3, 4, 48, 48)
    # proposals scoring >= 0.8 (the 0.95 and 0.85 ones of A@1, the 0.9 one of A@2), in the view's pixels
    tested = np.array(A_PROPOSALS)[[0, 2], :4]
    np.testing.assert_allclose(first.normalised[0], tested, rtol=1e-6)
    assert first.batch.box_mask.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(first.batch.boxes[0], torch.tensor(tested, dtype=torch.float32)
                               * torch.tensor([64.0, 48, 64, 48]))
    assert first.batch.boxes[1, 1].abs().sum() == 0  # the padded slot
    assert second.batch.box_mask.tolist() == [[False]]  # B has no proposal: nothing to score, one empty slot
    # the clip is centred on the keyframe's stored frame: 4 frames every 3 from 10 - 4 * 3 // 2 = 4
    expected = [brightness(i) for i in (4, 7, 10, 13)]
    np.testing.assert_allclose(pixel_levels(first.batch.clips[0]), expected, atol=3)  # mjpeg q2 of flat grey
    np.testing.assert_allclose(pixel_levels(first.batch.clips[1]), [brightness(i) for i in (14, 17, 20, 23)], atol=3)
    # groundtruth boxes instead of proposals: the upper bound that leaves person detection out
    items = list(eval_batches([shard], clip_config(), DetectionConfig(test_boxes="groundtruth"), stride=16, batch_size=4))
    np.testing.assert_allclose(items[0].normalised[0], [PERSON_0, PERSON_1])
    assert items[0].batch.box_mask.tolist() == [[True, True], [False, False]]
    assert items[1].batch.box_mask.tolist() == [[True]]


def test_training_batches_hold_groundtruth_and_close_proposals_with_their_labels(shard):
    det = DetectionConfig(jitter_scales=[48, 48])
    clip = clip_config()

    def batches(seed: int) -> list[DetectionBatch]:
        return list(train_loader([shard], clip, det, num_classes=3, batch_size=2, steps_per_epoch=4,
                                 shuffle_buffer=2, seed=seed))

    got = batches(0)
    assert len(got) == 4
    labels_of = {"vidA_000@1": [[1.0, 0, 0], [0, 1, 1], [1, 0, 0]],  # persons 0, 1, then the proposal on person 0
                 "vidB_000@1": [[0.0, 0, 1]]}
    seen = set()
    for batch in got:
        assert batch.clips.shape == (2, 3, 4, 48, 48)
        assert batch.boxes.shape[:2] == batch.box_mask.shape == batch.labels.shape[:2]
        for i, key in enumerate(batch.keys):
            seen.add(key)
            mask = batch.box_mask[i]
            # the persons fill most of the height: a 48x48 crop of a 48x64 view keeps every box
            assert batch.labels[i][mask].tolist() == labels_of[key], key
            assert batch.labels[i][~mask].abs().sum() == 0 and batch.boxes[i][~mask].abs().sum() == 0
            boxes = batch.boxes[i][mask]
            assert ((boxes >= 0) & (boxes <= 48)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
            assert pixel_levels(batch.clips[i])[2] == pytest.approx(brightness(10), abs=3)  # the keyframe
    assert seen == set(labels_of)  # proposal-only keyframes are not training examples
    again = batches(0)
    assert all(torch.equal(a.clips, b.clips) and torch.equal(a.boxes, b.boxes) and a.keys == b.keys
               for a, b in zip(got, again))  # a view is a function of the seed


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_a_detection_loader_resumed_at_batch_k_yields_exactly_batches_k_on_of_the_whole_epoch(shard, loader_workers):
    """Exact mid-epoch resume for detection, as for classification (test_data.py): the same keys, clips,
    boxes and labels as the uninterrupted epoch from batch k on, whichever DataLoader worker k falls to.
    Jittered scales and boxes make every view depend on its generator, so a view drawn from the wrong
    stream position would differ."""
    det = DetectionConfig(jitter_scales=[48, 64], box_jitter=0.05)

    def epoch(start_batch: int) -> list[DetectionBatch]:
        return list(train_loader([shard], clip_config(), det, num_classes=3, batch_size=2, steps_per_epoch=5,
                                 shuffle_buffer=3, seed=7, loader_workers=loader_workers, start_batch=start_batch))

    whole = epoch(0)
    assert len(whole) == 5
    for k in (1, 2, 5):
        resumed = epoch(k)
        assert [b.keys for b in resumed] == [b.keys for b in whole[k:]], f"start_batch={k}"
        assert all(torch.equal(a.clips, b.clips) and torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
                   for a, b in zip(resumed, whole[k:])), f"start_batch={k}"
    with pytest.raises(ValueError, match="outside the epoch"):
        epoch(6)


# --- scores -> official rows -> the official rules -----------------------------------------------------
def test_scores_cover_every_keyframe_split_back_by_box(shard):
    model = detector()
    clip, det = clip_config(), DetectionConfig(test_score=0.8)
    model.train()
    scored, truth = score_keyframes(model, [shard], clip, det, device=torch.device("cpu"), batch_size=4)
    assert model.training  # put back as found
    assert [(s.video_id, s.timestamp, s.scores.shape) for s in scored] == [
        ("vidA", 1, (2, 3)), ("vidA", 2, (1, 3)), ("vidB", 1, (0, 3))]
    assert [(k.video_id, k.t) for k in truth] == [("vidA", 1), ("vidB", 1)] and all(k.media == b"" for k in truth)
    # each keyframe's rows are its own boxes' sigmoid scores (eval mode: no dropout)
    batch = next(eval_batches([shard], clip, det, stride=16, batch_size=4)).batch
    with torch.no_grad():
        direct = model.eval()(batch.clips, batch.boxes, batch.box_mask).sigmoid()
    np.testing.assert_allclose(np.concatenate([scored[0].scores, scored[1].scores]), direct.numpy(), rtol=1e-5)


def _frame(video_id: str, t: int, boxes, actions) -> Keyframe:
    return Keyframe(key=f"{video_id}@{t}", video_id=video_id, t=t, frame=0, frames=1,
                    boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4), actions=actions,
                    person_ids=list(range(len(actions))), proposals=np.zeros((0, 5), dtype=np.float32), media=b"")


CATEGORIES = [ava_eval.Category(1, "stand"), ava_eval.Category(2, "walk"), ava_eval.Category(3, "wave"),
              ava_eval.Category(4, "jump")]
TRUTH = [_frame("v", 1, [PERSON_0, PERSON_1], [[1], [2, 3]])]
# Each person's own actions outscore the other's on every class
RIGHT = FrameScores("v", 1, np.array([PERSON_0, PERSON_1]), np.array([[0.9, 0.1, 0.2, 0.3], [0.1, 0.8, 0.7, 0.3]]))


def test_detection_rows_are_one_per_box_and_action_with_that_actions_column():
    rows = list(detection_rows([RIGHT], [1, 3]))
    assert [(r.box, r.action_id, r.score) for r in rows] == [
        (tuple(PERSON_0), 1, 0.9), (tuple(PERSON_0), 3, 0.2), (tuple(PERSON_1), 1, 0.1), (tuple(PERSON_1), 3, 0.7)]
    assert all((r.video_id, r.timestamp) == ("v", 1) for r in rows)


def test_the_samples_groundtruth_reads_back_as_the_official_groundtruth(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text(groundtruth_csv(TRUTH))
    assert path.read_text().splitlines()[0].startswith("v,0001,0.1,0.1,0.45,0.9,1,0")
    frames = ava_eval.read_groundtruth(str(path), None)
    frame = frames[ava_eval.image_key("v", 1)]
    assert sorted(frame.labels.tolist()) == [1, 2, 3]
    np.testing.assert_allclose(frame.boxes[frame.labels == 3], [PERSON_1])


def test_perfect_scores_give_frame_map_one_and_classes_without_groundtruth_are_left_out():
    result = validation_map([RIGHT], TRUTH, CATEGORIES, [1, 2, 3, 4])
    # every class's true box outranks its false one (a false detection ranked after every true one costs nothing)
    assert result.per_class["stand"] == result.per_class["walk"] == result.per_class["wave"] == 1.0
    assert math.isnan(result.per_class["jump"])  # no groundtruth: NaN, not 0, and not in the mean
    assert result.mean_ap == 1.0


def test_a_confident_box_on_a_frame_without_groundtruth_is_a_false_positive_unless_excluded(tmp_path):
    # frame v,2 has no groundtruth; its box scores "stand" 0.95, above person 0's true 0.9:
    # stand ranks FP (0.95), TP (0.9), FP (0.1): precision 1/2 at recall 1 -> AP 0.5; walk and wave keep 1.0
    # (v,2's scores for them are 0, ranked after their true boxes)
    extra = FrameScores("v", 2, np.array([PERSON_0]), np.array([[0.95, 0.0, 0.0, 0.0]]))
    result = validation_map([RIGHT, extra], TRUTH, CATEGORIES, [1, 2, 3, 4])
    assert result.per_class["stand"] == pytest.approx(0.5, abs=1e-12)
    assert result.mean_ap == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-12)
    # v,2 listed in the excluded timestamps: its detections are not ranked at all
    (tmp_path / "gt.csv").write_text(groundtruth_csv(TRUTH))
    (tmp_path / "excluded.csv").write_text("v,0002\n")
    excluded = frame_map([RIGHT, extra], str(tmp_path / "gt.csv"), CATEGORIES, [1, 2, 3, 4],
                         str(tmp_path / "detections.csv"), str(tmp_path / "excluded.csv"))
    assert excluded.mean_ap == 1.0
    # the prediction file frame_map scored is the official 8-column CSV, every (frame, box, action)
    lines = (tmp_path / "detections.csv").read_text().splitlines()
    assert len(lines) == 3 * 4 and all(len(line.split(",")) == 8 for line in lines)


# --- the task the training loop asks ------------------------------------------------------------------
def test_the_tasks_loss_is_the_bce_of_the_real_boxes_only(shard, tmp_path):
    manifest = Manifest(0, {"stand": 0, "walk": 1, "wave": 2}, [], {"source_format": "ava", "source": str(tmp_path),
                                                                     "fps": FPS, "ava": {"context_s": 1.5}}, "f", 0, 0)
    task = DetectionTask("ds", manifest, clip_config(), DetectionConfig(jitter_scales=[48, 48]))
    batch = next(iter(task.train_loader([shard], batch_size=2, steps_per_epoch=1, shuffle_buffer=2, seed=1,
                                        loader_workers=0)))
    model = detector().eval()
    loss, keys = task.loss(model, batch, torch.device("cpu"), "fp32")
    assert keys == batch.keys
    with torch.no_grad():
        logits = model(batch.clips, batch.boxes, batch.box_mask)
    assert loss.item() == pytest.approx(action_loss(logits, batch.labels[batch.box_mask]).item(), rel=1e-6)
    # one validation metric, frame-mAP over the val keyframes' groundtruth, and none without groundtruth
    metrics = task.validate(model, [shard], device=torch.device("cpu"), batch_size=4, precision="fp32")
    assert list(metrics) == ["val/frame_map"] and 0.0 <= metrics["val/frame_map"] <= 1.0
    assert task.validate(model, [], device=torch.device("cpu"), batch_size=4, precision="fp32") == {}


def test_detection_config_rejects_bad_values_by_key():
    for bad, key in [({"test_boxes": "all"}, "detection.test_boxes"),
                     ({"jitter_scales": [320, 256]}, "detection.jitter_scales"),
                     ({"test_score": 1.5}, "detection.test_score")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            DetectionConfig(**bad).validate()


def test_the_per_class_table_shows_classes_without_groundtruth_as_empty():
    from pipelines.evaluate.detection import ap_table

    result = validation_map([RIGHT], TRUTH, CATEGORIES, [1, 2, 3, 4])
    table = ap_table(result)
    assert table["action_id"] == [1, 2, 3, 4] and table["ap"] == [1.0, 1.0, 1.0, None]
    assert table["groundtruth"] == [1, 1, 1, 0] and len(set(map(len, table.values()))) == 1


# --- the registered model's pyfunc ----------------------------------------------------------------------
def test_the_pyfunc_cuts_the_clip_around_the_timestamp_and_scores_each_box(tmp_path):
    from pipelines.register.detection_pyfunc import MViTActionDetector, is_detector, keyframe_clip

    data = grey_video(30, 48, 64)
    clip = keyframe_clip(data, 1.0, num_frames=4, sampling_rate=3, fps=FPS)  # keyframe 1.0 s = frame 10
    np.testing.assert_allclose(clip.mean(axis=(1, 2, 3)), [brightness(i) for i in (4, 7, 10, 13)], atol=3)
    own_rate = keyframe_clip(data, 2.0, num_frames=4, sampling_rate=3, fps=0)  # 0: the video's own 10 fps
    np.testing.assert_allclose(own_rate.mean(axis=(1, 2, 3)), [brightness(i) for i in (14, 17, 20, 23)], atol=3)

    assert is_detector({"config": {"head": "roi"}}) and not is_detector({"config": {"head": "cls"}})
    path = tmp_path / "a.mp4"
    path.write_bytes(data)
    served = MViTActionDetector()  # load_context's result, without an MLflow artifact
    served.model, served.clip, served.fps = detector().eval(), clip_config(), float(FPS)
    served.actions = {0: "stand", 1: "walk", 2: "wave"}
    out = served.predict(None, pd.DataFrame({"video": [str(path), str(path)], "timestamp": [1.0, 2.0],
                                             "boxes": [json.dumps([PERSON_0, PERSON_1]), None]}))
    assert out["row"].tolist() == [0, 0, 1] and out["box"].tolist() == [PERSON_0, PERSON_1, [0.0, 0.0, 1.0, 1.0]]
    for labels, scores, every in zip(out["top5_labels"], out["top5_scores"], out["scores"]):
        assert sorted(labels) == ["stand", "walk", "wave"] and scores == sorted(scores, reverse=True)
        assert [every[["stand", "walk", "wave"].index(label)] for label in labels] == scores
    with pytest.raises(ValueError, match="normalised to"):
        served.predict(None, pd.DataFrame({"video": [str(path)], "timestamp": [1.0], "boxes": ["[[0, 0, 64, 48]]"]}))
    with pytest.raises(ValueError, match="x1 <= x2"):
        served.predict(None, pd.DataFrame({"video": [str(path)], "timestamp": [1.0], "boxes": ["[[0.5, 0, 0.2, 1]]"]}))
    with pytest.raises(ValueError, match="missing \\['timestamp'\\]"):
        served.predict(None, pd.DataFrame({"video": [str(path)]}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        served.predict(None, pd.DataFrame({"video": [str(Path(tmp_path) / "none.mp4")], "timestamp": [1.0]}))


# --- recipes ------------------------------------------------------------------------------------------------
def test_the_ava_recipe_is_the_reference_one_and_both_recipes_load():
    """shared/reference/models.md: SGD lr 0.6 at batch 512, 30 epochs, 5 warmup, wd 1e-8, drop path 0.4,
    GT + proposals with IoU > 0.9, test proposals scoring >= 0.8; 16x4 clips at 30 fps."""
    from pipelines.config import load_config
    from pipelines.train.config import TrainConfig

    root = Path(__file__).resolve().parents[2] / "configs"
    b16 = load_config(TrainConfig, str(root / "ava_mvit_b_16x4.yaml"), ["dataset=unused"], section="train")
    assert (b16.model, b16.clip.num_frames, b16.clip.sampling_rate) == ("mvit_b_16x4", 16, 4)
    assert (b16.optim.lr, b16.optim.lr_batch, b16.epochs, b16.optim.warmup_epochs) == (0.6, 512, 30, 5)
    assert (b16.optim.weight_decay, b16.drop_path_rate) == (1e-8, 0.4)
    assert (b16.detection.train_proposal_iou, b16.detection.test_boxes, b16.detection.test_score) == (0.9, "proposals", 0.8)
    # SGD, momentum 0.9, Nesterov (train.optim, as classification), at the recipe's global batch 512
    assert (b16.optim.name, b16.optim.momentum, b16.optim.nesterov, b16.global_batch()) == ("sgd", 0.9, True, 512)
    synthetic = load_config(TrainConfig, str(root / "ava_synthetic.yaml"), ["dataset=unused"], section="train")
    assert (synthetic.optim.name, synthetic.optim.momentum, synthetic.optim.nesterov) == ("sgd", 0.9, True)
    assert synthetic.detection.jitter_scales[0] >= synthetic.clip.crop_size  # a crop fits every training view
    assert not synthetic.clip.horizontal_flip  # its actions name directions: a flip would swap left and right
