"""A synthetic video-classification set whose label lives only in the motion.

Class k moves a square along direction (k mod 8) * 45 degrees at speed tier k // 8. Colours, sizes,
start positions, backgrounds and a static distractor are random, so no single frame tells the class:
a model has to compare frames, the property that makes it a useful smoke test of a video model.
"""

from __future__ import annotations

import concurrent.futures
import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data.video import encode_mp4

DIRECTION_NAMES = ["right", "down_right", "down", "down_left", "left", "up_left", "up", "up_right"]


@dataclass
class SyntheticSpec:
    classes: int = 8
    videos_per_class: int = 100
    frames: int = 16
    size: int = 64
    fps: int = 15
    seed: int = 0


def class_names(classes: int) -> list[str]:
    names = []
    for k in range(classes):
        tier = k // len(DIRECTION_NAMES)
        names.append(f"{DIRECTION_NAMES[k % len(DIRECTION_NAMES)]}_speed{tier + 1}")
    return names


def render_video(label: int, rng: np.random.Generator, spec: SyntheticSpec) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of one sample of class `label`."""
    size, frames = spec.size, spec.frames
    angle = (label % 8) * math.pi / 4
    speed = (3.0 + 2.0 * (label // 8)) * size / 64  # pixels per frame
    velocity = np.array([math.sin(angle), math.cos(angle)]) * speed  # (dy, dx)
    background = rng.integers(0, 120, size=3)
    colour = rng.integers(130, 256, size=3)
    side = int(rng.integers(size // 8, size // 4))
    start = rng.uniform(0, size, size=2)
    distractor_colour = rng.integers(0, 256, size=3)
    distractor_side = int(rng.integers(size // 10, size // 5))
    distractor_pos = rng.integers(0, size - distractor_side, size=2)
    noise = rng.normal(0, 6, size=(frames, size, size, 3))

    video = np.empty((frames, size, size, 3), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for t in range(frames):
        frame = np.broadcast_to(background, (size, size, 3)).astype(np.float32).copy()
        dy, dx = distractor_pos
        frame[dy : dy + distractor_side, dx : dx + distractor_side] = distractor_colour
        # The moving square wraps around the frame edges, so its direction never reverses.
        cy, cx = (start + velocity * t) % size
        inside = ((yy - cy) % size < side) & ((xx - cx) % size < side)
        frame[inside] = colour
        video[t] = frame
    return np.clip(video + noise, 0, 255).astype(np.uint8)


def _write_video(out: str, name: str, label: int, i: int, spec: SyntheticSpec) -> str:
    # One generator per video, seeded from (seed, label, i): any subset regenerates identically.
    rng = np.random.default_rng([spec.seed, label, i])
    path = Path(out) / name / f"{name}_{i:04d}.mp4"
    path.write_bytes(encode_mp4(render_video(label, rng, spec), spec.fps, crf=18, gop=spec.frames))
    return f"{name}/{path.name}"


def generate(out_dir: str | Path, spec: SyntheticSpec, workers: int | None = None) -> Path:
    """Write `<out>/<class>/<class>_<i>.mp4` plus `<out>/labels.csv` (path,label). Returns the CSV path.
    Videos are rendered in `workers` processes (default: one per core this process may use); the bytes do not depend on it."""
    out = Path(out_dir)
    names = class_names(spec.classes)
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), name, label, i, spec) for label, name in enumerate(names) for i in range(spec.videos_per_class)]
    workers = workers or len(os.sched_getaffinity(0))
    if workers > 1 and len(jobs) > 32:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            paths = list(pool.map(_write_video, *zip(*jobs), chunksize=16))
    else:
        paths = [_write_video(*job) for job in jobs]
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows((path, path.split("/", 1)[0]) for path in paths)
    return csv_path


# ------------------------------------------------------------------------------------------------ images

TEXTURE_NAMES = ["horizontal", "vertical", "checker", "diagonal"]


def render_image(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W, 3) uint8: a texture whose kind is the class (stripes across / down, a checkerboard, diagonal
    stripes either way), with random period, phase, colours and noise. Kinds survive a horizontal flip,
    crops and the recipes' RandAugment (rotations up to ~30 degrees), so the image recipe's augmentations
    keep the label."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(6, 12)
    phase = rng.uniform(0, period, size=2)
    across = ((yy + phase[0]) // (period / 2)) % 2
    down = ((xx + phase[1]) // (period / 2)) % 2
    if TEXTURE_NAMES[label] == "horizontal":
        mask = across
    elif TEXTURE_NAMES[label] == "vertical":
        mask = down
    elif TEXTURE_NAMES[label] == "checker":
        mask = (across + down) % 2
    else:
        sign = 1 if rng.random() < 0.5 else -1
        mask = (((xx + sign * yy + phase[0]) / np.sqrt(2)) // (period / 2)) % 2
    a, b = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    while np.abs(a.astype(int) - b).sum() < 150:  # two colours far enough apart to see the texture
        b = rng.integers(0, 256, size=3)
    image = np.where(mask[..., None] > 0, a, b).astype(np.float32) + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def generate_images(out_dir: str | Path, *, images_per_class: int = 60, size: int = 48, seed: int = 0,
                    val_fraction: float = 0.25) -> Path:
    """An ImageNet-style folder `<out>/{train,val}/<kind>/<kind>_<i>.jpg` of the texture classes
    (`mvit preprocess source_format=imagefolder` turns it into `jpg` shards). Returns `out`."""
    from PIL import Image

    out = Path(out_dir)
    val_count = int(round(images_per_class * val_fraction))
    for label, name in enumerate(TEXTURE_NAMES):
        for i in range(images_per_class):
            split = "val" if i < val_count else "train"
            path = out / split / name / f"{name}_{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render_image(label, np.random.default_rng([seed, label, i]), size)).save(path, quality=95)
    return out
