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
