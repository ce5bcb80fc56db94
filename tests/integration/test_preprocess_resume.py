"""Resume: a preprocessing job whose worker dies, or whose driver is killed and rerun, ends with exactly
the shards (same sha256) and samples of an uninterrupted run, each sample once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import webdataset as wds

from pipelines.config import load_config
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.job import run as preprocess
from pipelines.preprocess.worker import PARTS_DIR
from tests import media

pytestmark = pytest.mark.integration

PARTS = 10  # 30 videos, 3 per part/shard


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-src")
    rows = []
    for i in range(3 * PARTS):
        label = f"class{i % 3}"
        media.write(root / label / f"v{i:02d}.mp4", media.good(frames=40, height=120, width=160, seed=i))
        rows.append(f"{label}/v{i:02d}.mp4,{label}\n")
    (root / "labels.csv").write_text("path,label\n" + "".join(rows))
    return root / "labels.csv"


def overrides(source: Path, out: Path) -> list[str]:
    # One worker: parts finish one after another, so the job is reliably interrupted mid-way.
    return [f"source={source}", f"output={out}", "short_side=96", "fps=0", "max_samples_per_shard=3",
            "val_fraction=0.2", "num_workers=1"]


def config(source: Path, out: Path) -> PreprocessConfig:
    return load_config(PreprocessConfig, None, overrides(source, out))


def sample_keys(out: Path, manifest) -> list[str]:
    keys = []
    for shard in manifest.shards:
        keys += [s["__key__"] for s in wds.WebDataset(str(out / shard.url), shardshuffle=False, empty_check=False)]
    return keys


def finished_parts(out: Path) -> int:
    return len(list((out / PARTS_DIR).glob("*.json"))) if (out / PARTS_DIR).exists() else 0


def wait_for_parts(out: Path, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while finished_parts(out) < count:
        assert time.monotonic() < deadline, f"no part finished within {timeout}s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(source, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume-ref") / "ds"
    manifest = preprocess(config(source, out))
    assert len(manifest.shards) == PARTS
    return out, manifest


def assert_same_as_reference(out: Path, manifest, reference) -> None:
    ref_out, ref = reference
    assert [(s.url, s.sha256, s.num_samples) for s in manifest.shards] == [
        (s.url, s.sha256, s.num_samples) for s in ref.shards
    ]
    keys = sample_keys(out, manifest)
    assert len(keys) == len(set(keys)) == ref.num_samples  # every sample once
    assert sorted(keys) == sorted(sample_keys(ref_out, ref))


def test_a_killed_worker_is_retried_and_nothing_is_lost(source, reference, tmp_path):
    out = tmp_path / "ds"
    outcome: dict = {}

    def run_job() -> None:
        try:
            outcome["manifest"] = preprocess(config(source, out))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
            outcome["error"] = exc

    job = threading.Thread(target=run_job)
    job.start()
    wait_for_parts(out, 1)
    # The worker's title names the task only while it runs one (between tasks it is `ray::IDLE`).
    deadline = time.monotonic() + 60
    while not (busy := busy_workers()):
        assert time.monotonic() < deadline and job.is_alive(), "no preprocessing worker found at work"
        time.sleep(0.01)
    done_at_kill = finished_parts(out)
    for worker in busy:
        worker.send_signal(signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    assert done_at_kill < PARTS, "the job finished before the worker was killed"
    assert_same_as_reference(out, outcome["manifest"], reference)


def busy_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::Map(process_part_row"):
                found.append(process)
        except psutil.Error:  # exited meanwhile
            pass
    return found


def test_a_killed_driver_is_resumed_by_rerunning(source, reference, tmp_path, capsys):
    out = tmp_path / "ds"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "preprocess", *overrides(source, out), "ray.num_cpus=2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_parts(out, 2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done_at_kill = finished_parts(out)
    assert done_at_kill < PARTS and not (out / "manifest.json").exists()
    with pytest.raises(Exception, match="no manifest.json"):  # readers refuse the incomplete prefix
        from pipelines.data.shards import read_manifest

        read_manifest(str(out))

    capsys.readouterr()
    manifest = preprocess(config(source, out))
    printed = capsys.readouterr().out
    assert f"{PARTS} parts ({done_at_kill} already done)" in printed  # finished parts were not redone
    assert_same_as_reference(out, manifest, reference)
