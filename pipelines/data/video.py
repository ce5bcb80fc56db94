"""Video decode / resize / re-encode with PyAV, and clip sampling: pure functions, no Ray.

Every container is opened in a `with` block so its native buffers are freed at once (PyAV objects that
linger until the garbage collector runs are what makes long preprocessing jobs grow).
"""

from __future__ import annotations

import io
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
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, upright (display rotation applied)
    times: np.ndarray  # (T,) presentation time of each frame in seconds (variable frame rate kept)
    fps: float  # the stream's average rate (nominal; `times` is the truth for VFR sources)
    source_width: int  # as displayed (after rotation)
    source_height: int
    rotation: int  # counter-clockwise degrees of the source's display matrix (0, 90, 180, 270)


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
    threads: int = 0,
) -> DecodedVideo:
    """Decode every frame (optionally only [start_s, end_s)), resized with swscale on the way.

    With `start_s`, the demuxer first seeks to the keyframe before it, so a clip late in a long video
    costs one GOP of extra decoding, not the whole prefix. `threads` sizes FFmpeg's frame/slice
    threading (0: as many as it likes; preprocessing passes the CPUs Ray reserved for the task).

    Phones store portrait video as landscape frames plus a display matrix; FFmpeg reports it per frame
    (`VideoFrame.rotation`, counter-clockwise degrees) and the frames are turned upright here, so stored
    samples look the way a player shows them.
    """
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
        if threads:
            stream.thread_count = threads
        if start_s and stream.time_base:
            container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        rate = stream.average_rate or stream.guessed_rate or Fraction(30)
        fps = float(rate)
        frames: list[np.ndarray] = []
        times: list[float] = []
        size: tuple[int, int] | None = None  # decoded (pre-rotation) width, height
        src_w = src_h = rotation = 0
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else len(frames) / fps
                if start_s is not None and t < start_s:
                    continue
                if end_s is not None and t >= end_s:
                    break
                if size is None:
                    rotation = int(frame.rotation or 0) % 360
                    if rotation % 90:
                        raise VideoError("unsupported rotation", f"display matrix rotates by {rotation} degrees")
                    turned = rotation in (90, 270)
                    src_w, src_h = (frame.height, frame.width) if turned else (frame.width, frame.height)
                    out_w, out_h = target_size(src_w, src_h, short_side, min_short_side) if short_side else (src_w, src_h)
                    size = (out_h, out_w) if turned else (out_w, out_h)
                array = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                if rotation:
                    array = np.ascontiguousarray(np.rot90(array, k=rotation // 90))
                frames.append(array)
                times.append(float(t))
                if max_frames and len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as exc:
            if not frames:
                raise VideoError("undecodable", str(exc)) from None
            # A truncated tail still gives usable frames; keep what decoded.
    if not frames:
        raise VideoError("no frames", "the video stream decoded to zero frames")
    return DecodedVideo(np.stack(frames), np.asarray(times), fps, src_w, src_h, rotation)


def decode_frames(data: bytes, indices, *, threads: int = 0) -> np.ndarray:
    """Frames number `indices` of a constant-frame-rate video (as preprocessing stores them):
    (len(indices), H, W, 3) uint8, in the order given; indices past the end repeat the last frame.

    Only what a clip needs is paid for: the demuxer seeks to the keyframe before the first index,
    decoding stops after the last one, only the wanted frames are converted to RGB, and for intra-only
    codecs (mjpeg) the packets in between are not decoded at all.
    """
    wanted = sorted({int(i) for i in indices})
    if not data:
        raise VideoError("empty file")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise VideoError("undecodable", str(exc)) from None
    got: dict[int, np.ndarray] = {}
    with container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.thread_count = threads
        fps = float(stream.average_rate or stream.guessed_rate or 30)
        base = stream.start_time or 0

        def number(pts) -> int:
            return int(round(float((pts - base) * stream.time_base) * fps))

        if wanted[0] > 0:
            container.seek(base + int((wanted[0] - 0.5) / fps / stream.time_base), stream=stream, backward=True)
        keep = set(wanted)
        try:
            if stream.codec_context.name in INTRA_ONLY_CODECS:
                for packet in container.demux(stream):
                    if packet.pts is None:
                        continue
                    n = number(packet.pts)
                    if n in keep:
                        for frame in packet.decode():
                            got[n] = frame.to_ndarray(format="rgb24")
                    if n >= wanted[-1]:
                        break
            else:
                for frame in container.decode(stream):
                    n = number(frame.pts)
                    if n in keep:
                        got[n] = frame.to_ndarray(format="rgb24")
                    if n >= wanted[-1]:
                        break
        except av.error.FFmpegError as exc:
            if not got:
                raise VideoError("undecodable", str(exc)) from None
    if not got:
        raise VideoError("no frames", f"none of frames {wanted[0]}..{wanted[-1]} decoded")
    available = sorted(got)
    # indices past the end (or lost to a damaged tail) take the nearest earlier frame
    pick = {i: got[available[max(0, np.searchsorted(available, i, side="right") - 1)]] for i in wanted}
    return np.stack([pick[int(i)] for i in indices])


CODECS = ("h264", "mjpeg")
INTRA_ONLY_CODECS = ("mjpeg",)  # every frame decodes on its own: no need to decode the ones in between


def encode_mp4(
    frames: np.ndarray, fps: float, *, codec: str = "h264", crf: int = 23, gop: int = 16,
    preset: str = "veryfast", qscale: int = 5,
) -> bytes:
    """Frames -> MP4 bytes, deterministic for the same frames (reproducible shard sha256).

    h264: a short GOP (`gop` frames, no B-frames) so that a clip needs little decoding before its first
    frame; x264 runs single-threaded because its output depends on the thread count (and preprocessing
    runs one video per CPU anyway). mjpeg: every frame a JPEG (quality `qscale`, 2 best .. 31 worst):
    random access is free, at several times the bytes.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; use one of {CODECS}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        frames = frames[:, : height - height % 2, : width - width % 2]
        height, width = frames.shape[1:3]
    buffer = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buffer, mode="w", format="mp4") as container:
        if codec == "h264":
            stream = container.add_stream("libx264", rate=rate)
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset, "g": str(gop), "bf": "0", "threads": "1"}
        else:
            stream = container.add_stream("mjpeg", rate=rate)
            stream.pix_fmt = "yuvj420p"
            stream.options = {"qmin": str(qscale), "qmax": str(qscale)}
        stream.width, stream.height = width, height
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def resample_fps(frames: np.ndarray, times: np.ndarray, dst_fps: float) -> np.ndarray:
    """Frames on a constant `dst_fps` grid from frames shown at `times` (variable frame rate allowed):
    each grid point takes the frame on screen at that moment (dropping or repeating frames), as the
    decoders of the official recipes do when they sample at a target frame rate."""
    if not dst_fps or len(frames) == 0:
        return frames
    start = float(times[0])
    # A frame stays on screen until the next one; the last one for one typical frame interval.
    last = float(times[-1]) + (float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / dst_fps)
    count = max(1, int(round((last - start) * dst_fps)))
    grid = start + np.arange(count) / dst_fps
    index = np.searchsorted(times, grid + 1e-6, side="right") - 1
    return frames[np.clip(index, 0, len(frames) - 1)]


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
