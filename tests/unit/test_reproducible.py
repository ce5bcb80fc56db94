"""Preprocessed bytes are a function of the data alone: the same videos transcode to the same bytes every
time, in every process, on any x86-64 CPU generation."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.data import video
from pipelines.data.video import transcode
from tests import media

REPO = Path(__file__).resolve().parents[2]
# What a preprocessing worker does with each input (threads > 1, as with cpus_per_task=2).
SETTINGS = {"short_side": 24, "fps": 30.0, "threads": 2, "codec": "h264", "crf": 23, "gop": 16}


def odd_corpus() -> dict[str, bytes]:
    """Inputs where x264's output used to vary from run to run (tiny frames), plus a wide and a
    variable-frame-rate one."""
    return {
        "tiny_32x24.mp4": media.good(frames=20, height=24, width=32, seed=1),
        "wide_640x16.mp4": media.good(frames=20, height=16, width=640, seed=2),
        "odd_33x17.mp4": media.odd_sized(33, 17, frames=20, seed=3),
        "vfr.mp4": media.variable_frame_rate([0, 0.03, 0.09, 0.1, 0.25, 0.26, 0.4, 0.55, 0.6, 0.9]),
        "small_96x64.mp4": media.good(frames=60, height=64, width=96, seed=5),
    }


def digests(corpus: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(transcode(data, **SETTINGS)[0]).hexdigest() for name, data in corpus.items()}


# Runs in a fresh interpreter: transcodes every file of a folder, prints name -> sha256 as JSON.
CHILD = """
import hashlib, json, sys
from pathlib import Path
from pipelines.data.video import transcode
settings = json.loads(sys.argv[2])
print(json.dumps({p.name: hashlib.sha256(transcode(p.read_bytes(), **settings)[0]).hexdigest()
                  for p in sorted(Path(sys.argv[1]).iterdir())}))
"""


def test_odd_inputs_transcode_to_the_same_bytes_every_time_and_in_every_process(tmp_path):
    corpus = odd_corpus()
    for name, data in corpus.items():
        media.write(tmp_path / name, data)
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), json.dumps(SETTINGS)], cwd=REPO,
                                 stdout=subprocess.PIPE, text=True) for _ in range(3)]
    first = digests(corpus)
    # Before the fix, x264's AVX-512 kernels gave another file for ~1 encode in 20 of these inputs.
    for attempt in range(20):
        assert digests(corpus) == first, f"attempt {attempt}"
    for child in children:
        out, _ = child.communicate(timeout=300)
        assert child.returncode == 0
        assert json.loads(out) == first


def test_h264_bytes_do_not_depend_on_the_cpu(monkeypatch):
    """On x86-64 x264 is pinned to SSE2, whose output equals its plain C code (asm=0), which no CPU
    feature can change; unpinned, AVX2 and AVX-512 CPUs write other bytes. Elsewhere x264 keeps its own
    choice (the x86 names would not parse)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert video.x264_params() == ""
        return
    corpus = odd_corpus()
    pinned = digests(corpus)
    monkeypatch.setattr(video, "x264_params", lambda: "asm=0")
    assert digests(corpus) == pinned
