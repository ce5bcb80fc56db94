"""Real media files for tests, made with PyAV in milliseconds: good videos and every kind of bad input a
video dataset holds in practice (the corpus of issue 'Preprocessing at scale', acceptance 1)."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pipelines.data.video import encode_mp4


def pattern(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) frames with a bright left half, so that orientation can be checked after decoding."""
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 60, (frames, height, width, 3), dtype=np.uint8)
    video[:, :, : width // 2] += 180
    return video


def good(frames: int = 12, height: int = 48, width: int = 64, fps: int = 15, seed: int = 0) -> bytes:
    return encode_mp4(pattern(frames, height, width, seed), fps)


def odd_sized(width: int = 33, height: int = 17, frames: int = 12, seed: int = 0) -> bytes:
    """Odd width and height, which 4:2:0 chroma cannot hold: H.264 in 4:4:4, as some cameras and screen
    recorders write it."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=15)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for array in pattern(frames, height, width, seed):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def rotated(degrees: int, frames: int = 6, height: int = 32, width: int = 64) -> bytes:
    """Landscape frames with a display matrix that tells players to rotate them (as phones record)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=15)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.set_display_rotation(degrees)
        for array in pattern(frames, height, width):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def variable_frame_rate(times_s: list[float], height: int = 32, width: int = 48, brightness_steps: bool = False) -> bytes:
    """Frames shown at irregular times (a phone dropping frames under load). With `brightness_steps`,
    frame k is a flat image of brightness 30 * k, so a decoded frame tells which source frame it is."""
    buffer = io.BytesIO()
    time_base = Fraction(1, 1000)
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = time_base
        stream.options = {"bf": "0"}
        frames = pattern(len(times_s), height, width)
        if brightness_steps:
            frames = np.stack([np.full((height, width, 3), 30 * k, np.uint8) for k in range(len(times_s))])
        for t, array in zip(times_s, frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = int(round(t * 1000)), time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def audio_only(seconds: float = 0.5, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        samples = (np.sin(np.arange(int(seconds * rate)) / 10) * 0.3).astype(np.float32)
        for start in range(0, len(samples), 1024):
            chunk = samples[start : start + 1024]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _yuv(rgb) -> np.ndarray:
    """BT.601 limited-range Y, U, V of an RGB colour (what an H.264 decoder turns back into that RGB)."""
    r, g, b = (float(c) for c in rgb)
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    return np.clip(np.rint([y, u, v]), 0, 255).astype(np.uint8)


def render_motion(path: Path, *, label: int, seed: int, seconds: float, fps: float, width: int, height: int,
                  size: int = 32, grid_fps: float = 15, crf: int = 30, preset: str = "ultrafast") -> Path:
    """One motion of the synthetic set (pipelines/data/synthetic.py: class `label`'s direction and speed) at
    any frame rate, resolution and length: training's `size`-pixel frame at `grid_fps` is the central
    height x height square, and the square's position is a function of time, so every rendering shows the
    same motion. Margins outside that square are static background. Drawn straight into YUV 4:2:0 planes
    and encoded (H.264) one frame at a time: a minute of 1080p60 takes the memory of a frame, and encodes
    in about a minute on 2 cores (mostly static content, ultrafast preset)."""
    rng = np.random.default_rng(seed)
    angle = (label % 8) * np.pi / 4
    speed = (3.0 + 2.0 * (label // 8)) * size / 64 * grid_fps  # training pixels per second
    velocity = np.array([np.sin(angle), np.cos(angle)]) * speed  # (dy, dx)
    background, colour = _yuv(rng.integers(0, 120, size=3)), _yuv(rng.integers(130, 256, size=3))
    side = int(rng.integers(size // 8, size // 4))
    start = rng.uniform(0, size, size=2)
    left = (width - height) // 2 // 2 * 2  # even, so the chroma planes line up
    base = np.empty((height * 3 // 2, width), np.uint8)  # yuv420p as one array: Y, then U and V quarter planes
    base[:height] = background[0]
    base[height:].reshape(2, height // 2, width // 2)[:] = background[1:, None, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for i in range(int(round(seconds * fps))):
            cy, cx = (start + velocity * (i / fps)) % size
            frame = base.copy()
            for plane, (rows, cols, offset) in enumerate(((height, width, 0), (height // 2, width // 2, height))):
                span = np.arange(rows) * size / rows  # each output row/column in training pixels
                inside_y = (span - cy) % size < side
                inside_x = (span - cx) % size < side
                x0 = left >> plane
                region = frame[offset : offset + rows, x0 : x0 + rows] if plane == 0 else None
                if plane == 0:
                    region[inside_y[:, None] & inside_x[None, :]] = colour[0]
                else:
                    chroma = frame[height:].reshape(2, rows, cols)[:, :, x0 : x0 + rows]
                    chroma[:, inside_y[:, None] & inside_x[None, :]] = colour[1:, None]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
