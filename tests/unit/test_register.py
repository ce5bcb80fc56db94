"""The champion rule and the lineage of a registered version (pipelines/register/job.py)."""

from __future__ import annotations

import pytest

from pipelines.config import load_config
from pipelines.register.job import Evaluation, RegisterConfig, decide, lineage_tags

VAL = dict(split="val", dataset_digest="d1", views="2x1")


def test_a_better_score_on_the_same_evaluation_takes_the_alias():
    decision = decide("eval/val/top1", "champion", Evaluation(0.8, **VAL), 3, Evaluation(0.7, **VAL), 2)
    assert decision.promote and "0.8000 > 0.7000 of v2" in decision.reason
    same = decide("eval/val/top1", "champion", Evaluation(0.7, **VAL), 3, Evaluation(0.7, **VAL), 2)
    assert not same.promote and "not above" in same.reason


@pytest.mark.parametrize("holder", [
    Evaluation(0.1, split="val", dataset_digest="d2", views="2x1"),   # another dataset
    Evaluation(0.1, split="val", dataset_digest="d1", views="1x1"),   # other views
])
def test_evaluations_of_different_kinds_are_not_compared(holder):
    decision = decide("eval/val/top1", "champion", Evaluation(0.9, **VAL), 3, holder, 2)
    assert not decision.promote
    assert "not comparable" in decision.reason and "dataset d1, split val, 2x1 views" in decision.reason
    assert f"dataset {holder.dataset_digest}, split val, {holder.views} views" in decision.reason


def test_a_holder_without_a_recorded_evaluation_keeps_the_alias():
    for holder in (Evaluation(None, "val", "", ""), Evaluation(0.2, "val", "", "")):  # none, or from older code
        decision = decide("eval/val/top1", "champion", Evaluation(0.9, **VAL), 3, holder, 1)
        assert not decision.promote and "v1 holds @champion without" in decision.reason


def test_an_unevaluated_candidate_never_takes_the_alias_and_the_first_evaluated_one_does():
    assert not decide("eval/val/top1", "champion", Evaluation(None, "val", "", ""), 1, None, None).promote
    first = decide("eval/val/top1", "champion", Evaluation(0.3, **VAL), 1, None, None)
    assert first.promote and "no version holds @champion" in first.reason


def test_the_compared_metric_must_be_an_evaluation_metric():
    with pytest.raises(ValueError, match="eval/<split>/<name>"):
        load_config(RegisterConfig, None, ["checkpoint=c", "mlflow_run_id=r", "metric=val/top1"])


def test_lineage_tags_come_from_the_checkpoint():
    state = {"train_config": {"dataset": "s3://b/ds", "init_checkpoint": "s3://b/k400.pyth"},
             "lineage": {"dataset": "s3://b/ds", "manifest_digest": "abc", "input_fingerprint": "fp",
                         "fps": 15.0, "short_side": 40, "code_version": "git:123"}}
    assert lineage_tags(state, "run1") == {
        "mvit.training_run_id": "run1", "mvit.dataset_manifest": "s3://b/ds/manifest.json",
        "mvit.dataset_digest": "abc", "mvit.input_fingerprint": "fp", "mvit.init_checkpoint": "s3://b/k400.pyth",
        "mvit.code_version": "git:123", "mvit.clip_fps": "15.0"}


def test_the_stored_frame_rate_is_the_preprocessing_fps_or_the_samples_median(tmp_path):
    import json

    from pipelines.data.shards import INDEX, Manifest, stored_fps

    def manifest(fps: float) -> Manifest:
        return Manifest(num_samples=3, label_map={"a": 0}, shards=[], config={"fps": fps}, input_fingerprint="f",
                        inputs=3, quarantined=0)

    assert stored_fps(str(tmp_path), manifest(30.0)) == 30.0
    assert stored_fps(str(tmp_path), manifest(0)) == 0.0  # sources' rates kept, and no index to read them from
    rows = [{"split": "train", "fps": 25.0}, {"split": "train", "fps": 30.0}, {"split": "train", "fps": 30.0},
            {"split": "val", "fps": 60.0}]
    (tmp_path / INDEX).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert stored_fps(str(tmp_path), manifest(0)) == 30.0
