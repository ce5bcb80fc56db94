"""Accounting on a corpus with every kind of bad input: the job finishes, every input is a sample or one
quarantine line naming its reason, and the odd-but-usable videos come out right."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from pipelines.config import load_config
from pipelines.data.shards import sample_metadata
from pipelines.data.video import decode
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.job import run as preprocess
from tests import media

pytestmark = pytest.mark.integration

VFR_TIMES = [0, 0.033, 0.066, 0.3, 0.333, 0.8, 0.833, 0.866]  # frame k has brightness 30 * k


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    videos = root / "videos"
    good = media.good()
    files = {
        "ok/a.mp4": good,
        "ok/b.mp4": media.good(seed=1),
        "ok/vidéo à l'été 1.mp4": media.good(seed=2),  # non-ASCII and spaces
        "ok/one_frame.mp4": media.good(frames=1),
        "ok/tiny.mp4": media.good(height=12, width=16),  # smaller than the crop size
        "ok/wide.mp4": media.good(height=16, width=640),  # extreme aspect ratio
        "ok/vfr.mp4": media.variable_frame_rate(VFR_TIMES, brightness_steps=True),
        "ok/portrait.mp4": media.rotated(90),  # display-matrix rotation
        "bad/zero.mp4": b"",
        "bad/truncated.mp4": good[: len(good) // 2],  # the moov atom is at the end: nothing decodes
        "bad/random.mp4": bytes(range(256)) * 40,
        "bad/audio.mp4": media.audio_only(),
        "other/c.mp4": media.good(seed=3),  # its label is not in labels_file
    }
    for rel, data in files.items():
        media.write(videos / rel, data)
    media.write(root / "outside.mp4", good)
    rows = [(rel, rel.split("/")[0]) for rel in files]
    rows += [("ok/a.mp4", "ok"), ("../outside.mp4", "ok"), ("ok/missing.mp4", "ok")]  # duplicate, outside, missing
    csv_path = videos / "labels.csv"
    csv_path.write_text("path,label\n" + "".join(f'"{p}",{label}\n' for p, label in rows))
    (root / "labels.txt").write_text("ok\nbad\n")
    return {"csv": csv_path, "labels": root / "labels.txt", "inputs": len(rows), "out": root / "dataset"}


@pytest.fixture(scope="module")
def result(corpus, ray_session):
    cfg = load_config(PreprocessConfig, None, [
        f"source={corpus['csv']}", f"output={corpus['out']}", f"labels_file={corpus['labels']}",
        "short_side=32", "min_short_side=24", "fps=30", "max_samples_per_shard=3", "val_fraction=0",
    ])
    manifest = preprocess(cfg)
    quarantine = [json.loads(line) for line in (corpus["out"] / "quarantine.jsonl").read_text().splitlines()]
    samples = {}
    for shard in manifest.shards:
        for sample in wds.WebDataset(str(corpus["out"] / shard.url), shardshuffle=False, empty_check=False):
            meta = sample_metadata(sample)
            samples[meta["source"]] = (sample, meta)  # the path under the source root
    return manifest, quarantine, samples


def test_every_input_is_accounted_for_once(corpus, result):
    manifest, quarantine, samples = result
    assert manifest.inputs == corpus["inputs"]
    assert manifest.num_samples + manifest.quarantined == manifest.inputs
    assert len(quarantine) == manifest.quarantined and len(samples) == manifest.num_samples
    assert all(q["reason"] for q in quarantine)


def test_each_bad_input_names_its_reason(result):
    _, quarantine, _ = result
    reasons = {q["source"].rsplit("/", 2)[-2] + "/" + q["source"].rsplit("/", 1)[-1]: q["reason"] for q in quarantine}
    assert reasons["bad/zero.mp4"] == "empty file"
    assert reasons["bad/truncated.mp4"] == "undecodable"
    assert reasons["bad/random.mp4"] == "undecodable"
    assert reasons["bad/audio.mp4"] == "no video stream"
    assert reasons["other/c.mp4"].startswith("unknown label 'other'")
    assert reasons["ok/missing.mp4"].startswith("missing file")
    assert any(q["source"] == "../outside.mp4" and "outside the source root" in q["reason"] for q in quarantine)
    duplicates = [q for q in quarantine if q["reason"].startswith("duplicate id")]
    assert len(duplicates) == 1 and duplicates[0]["source"].endswith("ok/a.mp4")


def test_usable_odd_videos_become_correct_samples(result):
    _, _, samples = result
    assert set(samples) == {"ok/a.mp4", "ok/b.mp4", "ok/vidéo à l'été 1.mp4", "ok/one_frame.mp4", "ok/tiny.mp4",
                            "ok/wide.mp4", "ok/vfr.mp4", "ok/portrait.mp4"}
    for sample, meta in samples.values():
        key = sample["__key__"]
        assert key.isascii() and "." not in key and " " not in key
        frames = decode(sample["mp4"]).frames
        assert frames.shape == (meta["frames"], meta["height"], meta["width"], 3)
        assert meta["label"] == "ok" and int(sample["cls"]) == 0  # id from labels_file, not from sorting
    # tiny: upscaled to min_short_side; wide: short side 16 < 24 -> 24, long side follows the ratio
    assert min(samples["ok/tiny.mp4"][1]["height"], samples["ok/tiny.mp4"][1]["width"]) == 24
    assert (samples["ok/wide.mp4"][1]["height"], samples["ok/wide.mp4"][1]["width"]) == (24, 960)
    # 12 frames at 15 fps -> 24 at 30 fps; the variable-rate video spans 0.9 s -> 27 frames at 30 fps
    assert samples["ok/a.mp4"][1]["frames"] == 24
    assert samples["ok/vfr.mp4"][1]["frames"] == 27
    # ...and each 30 fps frame is the source frame on screen at its time (frame 2 from 0.066 s to 0.3 s)
    shown = [round(float(f.mean()) / 30) for f in decode(samples["ok/vfr.mp4"][0]["mp4"]).frames]
    expected = [max(k for k, t in enumerate(VFR_TIMES) if t <= i / 30 + 1e-6) for i in range(27)]
    assert shown == expected
    # the portrait video is stored upright: taller than wide, its bright (left) half now at the bottom
    sample, meta = samples["ok/portrait.mp4"]
    assert meta["rotation"] == 90 and meta["height"] > meta["width"]
    frame = decode(sample["mp4"]).frames[0].astype(float)
    assert frame[-4:].mean() > frame[:4].mean() + 80


def test_shards_verify_passes_and_stats_summarise(corpus, result, capsys):
    from pipelines.cli import main

    manifest, _, _ = result
    assert main(["shards", "verify", str(corpus["out"]), "--decode-fraction", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["samples"] == 8 and report["decoded"] == 8 and report["quarantined"] == 8
    assert main(["shards", "stats", str(corpus["out"])]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["per_label"] == {"ok": {"train": 8}, "bad": {}}
    assert stats["quarantine_reasons"]["undecodable"] == 2 and stats["frames"]["min"] == 1
    assert stats["total_bytes"] == sum(s.bytes for s in manifest.shards)


def test_shards_verify_names_corrupted_and_missing_shards(corpus, result, tmp_path, capsys):
    import shutil

    from pipelines.cli import main

    manifest, _, _ = result
    copy = tmp_path / "ds"
    shutil.copytree(corpus["out"], copy)
    first, second = manifest.shards[0].url, manifest.shards[1].url
    data = bytearray((copy / first).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a sample
    (copy / first).write_bytes(bytes(data))
    (copy / second).unlink()
    assert main(["shards", "verify", str(copy)]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert f"{first}: bytes/sha256 differ from the manifest (corrupted or replaced)" in problems
    assert f"{second}: missing" in problems
