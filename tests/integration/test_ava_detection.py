"""AVA action detection end to end on the synthetic AVA set: the workflow (preprocess -> 2-worker Ray Train
-> evaluation by the official frame-mAP rules -> registry) on CPU, and bad annotations, which are counted
by reason while every annotated keyframe stays accounted for."""

from __future__ import annotations

import csv
import json
import time
import uuid

import mlflow
import pandas as pd
import pytest
import torch

from pipelines import tracking
from pipelines.commands.shards import stats, verify
from pipelines.config import load_config
from pipelines.data.clips import ClipConfig
from pipelines.data.shards import read_samples, sample_metadata
from pipelines.data.sources.ava import CSV_FILES
from pipelines.data.synthetic_ava import ACTIONS, SyntheticAvaSpec, generate
from pipelines.detection.config import DetectionConfig
from pipelines.detection.data import eval_batches, train_loader
from pipelines.detection.keyframes import PAST_THE_END, keyframe_ledger
from pipelines.train.config import TrainConfig

pytestmark = pytest.mark.integration

AVA_RECIPE = "configs/ava_synthetic.yaml"
ASSETS = ["raw_videos", "dataset", "checkpoint", "evaluation", "registered_model"]


# --- bad input ----------------------------------------------------------------------------------------
def test_bad_annotations_are_counted_by_reason_and_every_keyframe_is_accounted_for(ray_session, tmp_path):
    from pipelines.preprocess.config import PreprocessConfig
    from pipelines.preprocess.job import run as preprocess

    raw = generate(tmp_path / "raw", SyntheticAvaSpec(train_videos=2, val_videos=1, duration_s=4, seed=5))
    first, second = (v for v in raw.videos if v.split == "train")
    t0, t1 = first.keyframes[0], second.keyframes[0]
    bad = [
        [first.video_id, f"{t0:04d}", "1.2", "0.1", "1.3", "0.5", "1", "7"],  # box outside [0, 1]
        [first.video_id, f"{t0:04d}", "0.5", "0.1", "0.2", "0.5", "1", "8"],  # inverted box
        [second.video_id, f"{t1:04d}", "0.1", "0.1", "0.2", "0.5", "99", "9"],  # unknown action id
        [second.video_id, "0004", "0.1", "0.1", "0.2", "0.5", "77", "0"],  # a keyframe whose only row is bad
        [second.video_id, "0005", "0.1", "0.1", "0.2", "0.5", "2", "0"],  # past the end of the 4 s video
        [second.video_id, "0005", "0.1", "0.1", "0.2", "0.5", "3", "0"],  # (the same person, another action)
        ["ghostVideo", "0001", "0.1", "0.1", "0.2", "0.5", "1", "0"],  # a video that is not there
        ["ghostVideo", "0002", "0.1", "0.1", "0.2", "0.5", "1", "0"],
    ]
    with raw.groundtruth("train").open("a", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(bad)
    # What the ledger must account for: every keyframe a row names, in both CSVs.
    named = {(split, row[0], int(row[1])) for split in CSV_FILES
             for row in csv.reader(raw.groundtruth(split).read_text().splitlines())}
    out = tmp_path / "dataset"
    cfg = load_config(PreprocessConfig, None, [
        f"source={raw.root}", f"output={out}", "source_format=ava", "short_side=48", "fps=10", "codec=mjpeg",
        "max_samples_per_shard=1", "ava.window_s=[0,6]", "ava.proposals=person_proposals_{split}.csv"])
    manifest = preprocess(cfg)  # no crash: the bad rows, keyframes and video are quarantined or reported

    ledger = keyframe_ledger(str(out))
    assert ledger.rejected_rows == {"box outside [0, 1]": 1, "inverted box (x1 > x2 or y1 > y2)": 1,
                                    "unknown action_id": 2}
    assert ledger.lost == {"keyframe without a usable row": 1, PAST_THE_END: 1, "missing file": 2}
    usable = sum(len(v.keyframes) for v in raw.videos)  # each video's annotated keyframes (the excluded one aside)
    assert ledger.usable == usable == 6
    assert ledger.usable + sum(ledger.lost.values()) == ledger.keyframes == len(named) == 10
    assert stats(str(out))["keyframes"] == ledger.to_dict()  # `mvit shards stats` shows it
    report = verify(str(out))
    assert report["ok"], report["problems"]
    assert manifest.num_samples + manifest.quarantined == manifest.inputs
    # the keyframe past the end is listed in its sample, with the frame it would have had
    dropped = [d for s in read_samples(manifest.shard_urls(str(out), "train"))
               for d in sample_metadata(s)["extra"]["dropped_keyframes"]]
    assert [(d["t"], d["reason"]) for d in dropped] == [(5, PAST_THE_END)]
    assert "frame 50, the stored video holds frames 0..39" in dropped[0]["detail"]

    # and both loaders read the dataset: every usable keyframe once for testing, batches for training
    clip = ClipConfig(num_frames=4, sampling_rate=5, crop_size=32, test_short_side=32, train_crop="random")
    det = DetectionConfig(jitter_scales=[32, 40])
    tested = [key for item in eval_batches(manifest.shard_urls(str(out), "train") + manifest.shard_urls(str(out), "val"),
                                           clip, det, stride=16, batch_size=4) for key in item.batch.keys]
    assert len(tested) == len(set(tested)) == usable
    batches = list(train_loader(manifest.shard_urls(str(out), "train"), clip, det, num_classes=6, batch_size=2,
                                steps_per_epoch=3, shuffle_buffer=4, seed=0))
    assert len(batches) == 3 and all(b.clips.shape == (2, 3, 4, 32, 32) for b in batches)


# --- the workflow ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ava_workflow(services, ray_session, tmp_path_factory, mvit_in_process) -> dict:
    """`mvit workflow run configs/ava_synthetic.yaml`: the synthetic AVA set generated, preprocessed to the
    session's S3, trained on 2 Ray workers (checkpoints on S3, one MLflow run on the session's server),
    evaluated by the official rules and registered."""
    from tests.integration.conftest import last_json_line

    state = tmp_path_factory.mktemp("ava_workflow")
    prefix = f"s3://mvit/ava-{uuid.uuid4().hex[:8]}"
    args = [AVA_RECIPE, f"workflow.state_dir={state}", f"workflow.dataset={prefix}/dataset",
            f"workflow.storage_path={prefix}/runs", "register.model_name=ava-it", "train.mlflow.experiment=ava-it"]
    started = time.monotonic()
    code, out, err = mvit_in_process(["workflow", "run", *args])
    seconds = time.monotonic() - started
    assert code == 0, f"`mvit workflow run {AVA_RECIPE}` exited {code}:\n{err[-3000:]}"
    summary = last_json_line(out, "materialized")
    print(f"[ava_workflow] {seconds:.0f} s: {json.dumps(summary)}")
    return {"summary": summary, "seconds": seconds, "raw": state / "raw", "dataset": f"{prefix}/dataset"}


def test_the_workflow_trains_a_detector_to_frame_map_0_8_on_cpu(ava_workflow, services):
    summary = ava_workflow["summary"]
    assert summary["materialized"] == ASSETS
    assert summary["val_top1"] is None and summary["val_frame_map"] >= 0.8, summary
    train = load_config(TrainConfig, AVA_RECIPE, ["dataset=unused"], section="train")
    client = mlflow.MlflowClient(services.mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["eval/val/frame_map"] == pytest.approx(summary["val_frame_map"])
    # the recipe's SGD through train.optim, as classification trains (no detection-only optimizer)
    assert (run.data.params["optim.name"], run.data.params["optim.nesterov"]) == ("sgd", "True")
    # logged with what it was measured on, which register's champion rule compares
    assert (run.data.tags["mvit.eval.val.dataset_digest"], run.data.tags["mvit.eval.val.views"]) == (
        summary["dataset_digest"], "1x1")
    # validation on the Ray workers after every epoch (each rank its shards, gathered), on the same scale
    history = client.get_metric_history(run.info.run_id, "val/frame_map")
    assert len(history) == train.epochs and all(0.0 <= m.value <= 1.0 for m in history)
    # the per-class AP table and the official prediction CSV are in the run
    table = json.loads(open(client.download_artifacts(run.info.run_id, "eval/ap_val.json")).read())
    frame = pd.DataFrame(table["data"], columns=table["columns"])
    assert sorted(frame["action"]) == sorted(ACTIONS.values())
    assert frame["ap"].mean() == pytest.approx(summary["val_frame_map"])  # every class has val groundtruth
    detections = open(client.download_artifacts(run.info.run_id, "eval/detections_val.csv")).read().splitlines()
    assert detections and all(len(line.split(",")) == 8 for line in detections)
    ledger = keyframe_ledger(ava_workflow["dataset"])
    assert ledger.by_split == {"train": 48 * 4, "val": 12 * 4} and not ledger.lost


def test_the_registered_detector_scores_person_boxes_at_a_keyframe(ava_workflow, services):
    raw = ava_workflow["raw"]
    with tracking.fluent(services.mlflow_uri):
        model = mlflow.pyfunc.load_model("models:/ava-it@champion")
    truth: dict[tuple[str, int], list[tuple[list[float], set[str]]]] = {}
    for row in csv.reader((raw / "ava_val_v2.2.csv").read_text().splitlines()):
        people = truth.setdefault((row[0], int(row[1])), [])
        box = [float(v) for v in row[2:6]]
        match = next((p for p in people if p[0] == box), None)
        if match is None:
            people.append((box, {ACTIONS[int(row[6])]}))
        else:
            match[1].add(ACTIONS[int(row[6])])
    frames = sorted(truth)[:12]
    inputs = pd.DataFrame({"video": [str(raw / "videos" / f"{video}.mp4") for video, _ in frames],
                           "timestamp": [float(t) for _, t in frames],
                           "boxes": [json.dumps([box for box, _ in truth[f]]) for f in frames]})
    out = model.predict(inputs)
    people = [actions for f in frames for _, actions in truth[f]]
    assert len(out) == len(people) and list(out["row"]) == [i for i, f in enumerate(frames) for _ in truth[f]]
    assert all(list(s) == sorted(s, reverse=True) for s in out["top5_scores"])
    # A person's best-scored action is one of theirs (val frame-mAP >= 0.8 says most are)
    hits = sum(labels[0] in actions for labels, actions in zip(out["top5_labels"], people))
    assert hits >= 0.75 * len(people), (hits, len(people))
    # Without boxes: one box over the whole frame
    whole = model.predict(inputs[["video", "timestamp"]].head(1).assign(boxes="[]"))
    assert len(whole) == 1 and list(whole["box"][0]) == [0.0, 0.0, 1.0, 1.0]
    assert torch.tensor(list(whole["scores"][0])).shape == (len(ACTIONS),)
