"""Video decode / resize / re-encode with PyAV, and clip sampling: pure functions, no Ray.

Every container is opened in a `with` block so its native buffers are freed at once (PyAV objects that
linger until the garbage collector runs are what makes long preprocessing jobs grow).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


class VideoError(ValueError):
    """A video cannot be used; `reason` is a short category written to quarantine.jsonl."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: float
    source_width: int
    source_height: int
    rotation: int


def _rotation_of(stream) -> int:
    # Phones store portrait video as landscape + a display-matrix side datum; honour it so the stored
    # frames look the way a player shows them.
    rotate = (stream.metadata or {}).get("rotate")
    try:
        return int(rotate) % 360 if rotate is not None else 0
    except ValueError:
        return 0


def target_size(width: int, height: int, short_side: int, min_short_side: int) -> tuple[int, int]:
    """Scale so the short side is `short_side`, never upscaling past the source except up to
    `min_short_side` (tiny videos are made just big enough to crop). Sizes are even for H.264."""
    short = min(width, height)
    goal = short_side if short > short_side else max(short, min_short_side)
    scale = goal / short
    new_w = max(2, int(round(width * scale / 2)) * 2)
    new_h = max(2, int(round(height * scale / 2)) * 2)
    return new_w, new_h


def decode(
    data: bytes,
    *,
    short_side: int = 0,
    min_short_side: int = 0,
    start_s: float | None = None,
    end_s: float | None = None,
    max_frames: int = 0,
) -> DecodedVideo:
    """Decode every frame (optionally only [start_s, end_s)), resized with swscale on the way."""
    if not data:
        raise VideoError("empty file")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise VideoError("undecodable", str(exc)) from None
    with container:
        if not container.streams.video:
            raise VideoError("no video stream", f"streams: {[s.type for s in container.streams]}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(30)
        fps = float(rate)
        rotation = _rotation_of(stream)
        frames: list[np.ndarray] = []
        size: tuple[int, int] | None = None
        src_w = src_h = 0
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else len(frames) / fps
                if start_s is not None and t < start_s:
                    continue
                if end_s is not None and t >= end_s:
                    break
                if size is None:
                    src_w, src_h = frame.width, frame.height
                    if rotation in (90, 270):
                        src_w, src_h = src_h, src_w
                    size = (
                        target_size(src_w, src_h, short_side, min_short_side) if short_side else (src_w, src_h)
                    )
                out_w, out_h = size
                if rotation in (90, 270):
                    out_w, out_h = out_h, out_w
                array = frame.to_ndarray(format="rgb24", width=out_w, height=out_h)
                if rotation:
                    array = np.ascontiguousarray(np.rot90(array, k=-rotation // 90))
                frames.append(array)
                if max_frames and len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as exc:
            if not frames:
                raise VideoError("undecodable", str(exc)) from None
            # A truncated tail still gives usable frames; keep what decoded.
    if not frames:
        raise VideoError("no frames", "the video stream decoded to zero frames")
    return DecodedVideo(np.stack(frames), fps, src_w, src_h, rotation)


def encode_mp4(frames: np.ndarray, fps: float, *, crf: int = 23, gop: int = 16, preset: str = "veryfast") -> bytes:
    """H.264 in MP4 with a short GOP (cheap random access for clip sampling). Deterministic for the
    same frames: x264 output does not depend on thread timing, and the muxer writes no wall-clock time."""
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        frames = frames[:, : height - height % 2, : width - width % 2]
        height, width = frames.shape[1:3]
    buffer = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset, "g": str(gop), "bf": "0"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def resample_fps(frames: np.ndarray, src_fps: float, dst_fps: float) -> np.ndarray:
    """Keep the frames nearest to a `dst_fps` grid (dropping or repeating), as the decoders of the
    official recipes do when they sample at a target frame rate."""
    if not dst_fps or abs(src_fps - dst_fps) < 1e-3 or len(frames) == 0:
        return frames
    duration = len(frames) / src_fps
    count = max(1, int(math.floor(duration * dst_fps + 1e-6)))
    index = np.minimum((np.arange(count) * src_fps / dst_fps).round().astype(int), len(frames) - 1)
    return frames[index]


def clip_indices(num_frames_in_video: int, num_frames: int, sampling_rate: int, start: int) -> np.ndarray:
    """Frame indices of one clip; short videos are padded by repeating their last frame."""
    index = start + np.arange(num_frames) * sampling_rate
    return np.clip(index, 0, max(0, num_frames_in_video - 1))


def clip_starts(num_frames_in_video: int, num_frames: int, sampling_rate: int, views: int) -> list[int]:
    """Evenly spaced start frames of `views` temporal views (one view: the centre clip)."""
    span = (num_frames - 1) * sampling_rate + 1
    room = max(0, num_frames_in_video - span)
    if views == 1:
        return [room // 2]
    return [room * i // (views - 1) for i in range(views)]
