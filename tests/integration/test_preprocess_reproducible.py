"""`mvit preprocess` output is a function of the data alone: the same raw set read from two folders, or
preprocessed five times, gives the same shards (sha256), keys, splits and index."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.data.synthetic import SyntheticSpec, generate
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.job import run as preprocess
from tests import media

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def raw_sets(tmp_path_factory) -> tuple[Path, Path]:
    """`mvit demo-data` output (3 classes x 5 videos) plus odd videos listed in its labels.csv, and a copy
    of the whole folder somewhere else."""
    near = tmp_path_factory.mktemp("raw") / "demo"
    labels_csv = generate(near, SyntheticSpec(classes=3, videos_per_class=5, frames=6, size=24, seed=2), workers=1)
    label = next(csv.DictReader(labels_csv.open()))["label"]
    odd = {"tiny.mp4": media.good(frames=10, height=24, width=32, seed=1),
           "wide.mp4": media.good(frames=10, height=16, width=640, seed=2),
           "odd.mp4": media.odd_sized(33, 17, frames=10),
           "vfr.mp4": media.variable_frame_rate([0, 0.03, 0.09, 0.1, 0.25, 0.4])}
    with labels_csv.open("a", newline="") as handle:
        for name, data in odd.items():
            media.write(near / label / name, data)
            csv.writer(handle).writerow([f"{label}/{name}", label])
    far = tmp_path_factory.mktemp("elsewhere") / "much" / "deeper" / "copy"
    shutil.copytree(near, far)
    return near / "labels.csv", far / "labels.csv"


def run(source: Path, out: Path):
    cfg = load_config(PreprocessConfig, None, [
        f"source={source}", f"output={out}", "short_side=24", "fps=30", "val_fraction=0.25",
        "max_samples_per_shard=4", "cpus_per_task=2"])
    return preprocess(cfg)


def written(out: Path, manifest) -> dict:
    return {"shards": [(s.url, s.split, s.num_samples, s.sha256) for s in manifest.shards],
            "splits": manifest.splits, "label_map": manifest.label_map, "fingerprint": manifest.input_fingerprint,
            "index": (out / "index.jsonl").read_bytes()}


def test_the_same_raw_set_in_two_folders_gives_the_same_dataset(ray_session, raw_sets, tmp_path):
    near, far = raw_sets
    here, there = run(near, tmp_path / "near"), run(far, tmp_path / "far")
    assert written(tmp_path / "near", here) == written(tmp_path / "far", there)
    assert here.num_samples == 19 and here.quarantined == 0
    # where the data was read from is recorded, and only there
    assert (here.config["source"], there.config["source"]) == (str(near), str(far))
    # stratified: each class validates round(0.25 * its videos): 5, 5 and 9 (with the odd ones) videos
    index = [json.loads(line) for line in (tmp_path / "near" / "index.jsonl").read_text().splitlines()]
    val = Counter(entry["labels"][0] for entry in index if entry["split"] == "val")
    assert sorted(val.values()) == [1, 1, 2] and len(val) == 3


def test_one_corpus_preprocessed_five_times_gives_the_same_bytes(ray_session, raw_sets, tmp_path):
    near, _ = raw_sets
    runs = [written(tmp_path / str(i), run(near, tmp_path / str(i))) for i in range(5)]
    assert all(r == runs[0] for r in runs[1:])
