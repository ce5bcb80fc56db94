"""Video decode / resize / re-encode with PyAV, and clip sampling: pure functions, no Ray.

Every container is opened in a `with` block so its native buffers are freed at once (PyAV objects that
linger until the garbage collector runs are what makes long preprocessing jobs grow).

Why one module of ~450 lines: everything here touches PyAV's containers, streams and frame formats
(open, probe, seek, decode at given times, resample the frame rate, encode), and shares its error mapping
(`VideoError`) and container hygiene; split by caller it would spread PyAV's quirks over three files.
"""

from __future__ import annotations

import contextlib
import io
import platform
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np
from av.video.reformatter import VideoReformatter


class VideoError(ValueError):
    """A video cannot be used; `reason` is a short category written to quarantine.jsonl."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SourceInfo:
    """What decoding learns about a source (filled in at its first frame)."""

    fps: float = 0.0  # the stream's average rate (nominal; frame times are the truth for VFR sources)
    source_width: int = 0  # as displayed (after rotation)
    source_height: int = 0
    rotation: int = 0  # counter-clockwise degrees of the display matrix (0, 90, 180, 270)


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, upright (display rotation applied)
    times: np.ndarray  # (T,) presentation time of each frame in seconds (variable frame rate kept)
    fps: float
    source_width: int
    source_height: int
    rotation: int


def target_size(width: int, height: int, short_side: int, min_short_side: int) -> tuple[int, int]:
    """Scale so the short side is `short_side`, never upscaling past the source except up to
    `min_short_side` (tiny videos are made just big enough to crop). Sizes are even for H.264."""
    short = min(width, height)
    goal = short_side if short > short_side else max(short, min_short_side)
    scale = goal / short
    new_w = max(2, int(round(width * scale / 2)) * 2)
    new_h = max(2, int(round(height * scale / 2)) * 2)
    return new_w, new_h


# A video in memory, or a seekable binary file (storage.open_seekable: a long movie of which only a time
# range is wanted is then read by ranges instead of downloaded whole).
VideoInput = bytes | BinaryIO


def _open(data: VideoInput):
    if isinstance(data, (bytes, bytearray, memoryview)):
        if not data:
            raise VideoError("empty file")
        data = io.BytesIO(data)
    elif data.seek(0, io.SEEK_END) == 0:
        raise VideoError("empty file")
    else:
        data.seek(0)  # the same file object may serve several time ranges in turn
    try:
        return av.open(data, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise VideoError("undecodable", str(exc)) from None


def iter_frames(
    data: VideoInput,
    info: SourceInfo,
    *,
    short_side: int = 0,
    min_short_side: int = 0,
    start_s: float | None = None,
    end_s: float | None = None,
    threads: int = 0,
) -> Iterator[tuple[float, np.ndarray]]:
    """(time in seconds, upright RGB frame resized with swscale) for every frame in [start_s, end_s).

    One frame at a time, so a consumer that streams (transcode) holds one frame, not the video. With
    `start_s` the demuxer first seeks to the keyframe before it, so a segment late in a long movie costs
    one GOP of extra decoding, not the whole prefix. `threads` sizes FFmpeg's frame/slice threading (0:
    its own choice; preprocessing passes the CPUs Ray reserved for the task). Phones store portrait video
    as landscape frames plus a display matrix; FFmpeg reports it per frame (`VideoFrame.rotation`,
    counter-clockwise degrees) and the frames are turned upright here, as a player shows them.
    A truncated tail ends the iteration after the frames that did decode. `info` is filled in at the
    first frame. The container is closed when the iterator ends or is closed.
    """
    with _open(data) as container:
        if not container.streams.video:
            raise VideoError("no video stream", f"streams: {[s.type for s in container.streams]}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.thread_count = threads
        if start_s and stream.time_base:
            container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        info.fps = float(stream.average_rate or stream.guessed_rate or Fraction(30))
        size: tuple[int, int] | None = None  # decoded (pre-rotation) width, height
        # One swscale context for all frames, with the decoder's thread count: to_ndarray(width=...) builds
        # one per frame with a thread per core, which cost half the CPU time of transcoding a 32x24 clip
        # and ~15% at 640x480.
        reformatter = VideoReformatter()
        count = 0
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except av.error.FFmpegError as exc:
                if not count:
                    raise VideoError("undecodable", str(exc)) from None
                return  # keep what decoded before the damage
            t = frame.time if frame.time is not None else count / info.fps
            if start_s is not None and t < start_s:
                continue
            if end_s is not None and t >= end_s:
                return
            if size is None:
                rotation = int(frame.rotation or 0) % 360
                if rotation % 90:
                    raise VideoError("unsupported rotation", f"display matrix rotates by {rotation} degrees")
                turned = rotation in (90, 270)
                info.rotation = rotation
                info.source_width, info.source_height = (frame.height, frame.width) if turned else (frame.width, frame.height)
                out_w, out_h = (target_size(info.source_width, info.source_height, short_side, min_short_side)
                                if short_side else (info.source_width, info.source_height))
                size = (out_h, out_w) if turned else (out_w, out_h)
            array = reformatter.reformat(frame, size[0], size[1], "rgb24", threads=threads).to_ndarray()
            if info.rotation:
                array = np.ascontiguousarray(np.rot90(array, k=info.rotation // 90))
            count += 1
            yield float(t), array


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
    """Every frame of [start_s, end_s) in memory (see `iter_frames`); at most `max_frames`."""
    info = SourceInfo()
    frames, times = [], []
    with contextlib.closing(iter_frames(data, info, short_side=short_side, min_short_side=min_short_side,
                                        start_s=start_s, end_s=end_s, threads=threads)) as timed:
        for t, array in timed:
            frames.append(array)
            times.append(t)
            if max_frames and len(frames) >= max_frames:
                break
    if not frames:
        raise VideoError("no frames", "the video stream decoded to zero frames")
    return DecodedVideo(np.stack(frames), np.asarray(times), info.fps, info.source_width, info.source_height,
                        info.rotation)


def frame_times(data: VideoInput) -> np.ndarray:
    """Presentation times (seconds, ascending) of the frames of the first video stream, read from the
    demuxed packets: nothing is decoded, so a long high-resolution video costs one read of its bytes."""
    with _open(data) as container:
        if not container.streams.video:
            raise VideoError("no video stream", f"streams: {[s.type for s in container.streams]}")
        stream = container.streams.video[0]
        base = stream.time_base
        try:
            times = [float(packet.pts * base) for packet in container.demux(stream)
                     if packet.pts is not None and packet.size]
        except av.error.FFmpegError as exc:
            raise VideoError("undecodable", str(exc)) from None
    if not times:
        raise VideoError("no frames", "the video stream has no timed packets")
    return np.sort(np.asarray(times))


def decode_at(data: VideoInput, times: np.ndarray, wanted, *, short_side: int = 0, max_gap_s: float = 2.0,
              threads: int = 0) -> dict[int, np.ndarray]:
    """Frames number `wanted` (indices into `times`, from `frame_times`) as {index: upright RGB frame},
    resized by swscale to `short_side` while decoding (never upscaled; 0: as stored).

    Wanted frames closer than `max_gap_s` are decoded in one pass; each pass seeks to the keyframe
    before its first frame (see `iter_frames`), so a few clips of a long video cost a few GOPs of
    decoding, and memory holds only the wanted frames. A frame the decoder does not return (a damaged
    packet) is replaced by the nearest earlier one of its pass."""
    wanted = sorted({int(i) for i in wanted})
    runs: list[list[int]] = []
    for index in wanted:
        if runs and times[index] - times[runs[-1][-1]] <= max_gap_s:
            runs[-1].append(index)
        else:
            runs.append([index])
    tolerance = 1e-6  # packet and frame times are the same pts x time_base, computed in two ways
    got: dict[int, np.ndarray] = {}
    for run in runs:
        last = run[-1]
        end_s = (times[last] + times[last + 1]) / 2 if last + 1 < len(times) else None
        keep = set(run)
        decoded: dict[int, np.ndarray] = {}
        timed = iter_frames(data, SourceInfo(), short_side=short_side, start_s=float(times[run[0]]) - tolerance,
                            end_s=end_s, threads=threads)
        with contextlib.closing(timed):
            for t, array in timed:
                i = int(np.searchsorted(times, t - tolerance))
                if i < len(times) and abs(times[i] - t) <= tolerance and i in keep:
                    decoded[i] = array
        if not decoded:
            raise VideoError("undecodable", f"no frame between {times[run[0]]:.3f}s and {times[last]:.3f}s decoded")
        present = sorted(decoded)
        for i in run:
            got[i] = decoded[present[max(0, int(np.searchsorted(present, i, side="right")) - 1)]]
    return got


def resample_stream(timed: Iterable[tuple[float, np.ndarray]], dst_fps: float) -> Iterator[np.ndarray]:
    """Frames on a constant `dst_fps` grid from frames shown at their times (variable frame rate
    allowed): each grid point takes the frame on screen at that moment (dropping or repeating frames), as
    the decoders of the official recipes do when they sample at a target frame rate. The last frame stays
    on screen for one typical (median) frame interval. Streams: holds one frame. `dst_fps=0` passes the
    frames through unchanged."""
    current: np.ndarray | None = None
    start = last = 0.0
    intervals: list[float] = []
    emitted = 0
    for t, frame in timed:
        if not dst_fps:
            yield frame
            continue
        if current is None:
            start = t
        else:
            intervals.append(t - last)
            while start + emitted / dst_fps + 1e-6 < t:  # grid points before this frame show the previous one
                yield current
                emitted += 1
        current, last = frame, t
    if current is None or not dst_fps:
        return
    end = last + (statistics.median(intervals) if intervals else 1.0 / dst_fps)
    for _ in range(max(1, round((end - start) * dst_fps)) - emitted):
        yield current


def resample_fps(frames: np.ndarray, times: np.ndarray, dst_fps: float) -> np.ndarray:
    """`resample_stream` over frames already in memory."""
    if not dst_fps or len(frames) == 0:
        return frames
    return np.stack(list(resample_stream(zip(times.tolist(), frames), dst_fps)))


CODECS = ("h264", "mjpeg")
INTRA_ONLY_CODECS = ("mjpeg",)  # every frame decodes on its own: no need to decode the ones in between


def x264_params() -> str:
    """The x264 option that makes its bytes a function of the frames alone, whatever x86 CPU runs it.

    x264 picks its SIMD kernels by CPU. With its AVX-512 ones, the same 40 frames of 32x24, in the same
    buffers, encoded 120 times in one process with threads=1 gave 7 different files (96x64 x 120
    frames: 5); with AVX-512 masked out, at the SSE2 level, or with mbtree=0 every encode was identical.
    With one thread and identical input, only memory the encoder never wrote can differ between runs:
    an AVX-512 kernel of the macroblock-tree lookahead reads some (valgrind, which cannot run AVX-512,
    cannot name it). Its SIMD levels also round the lookahead's float math differently (AVX2 and SSE2
    output differed at every size tried), so workers of different CPU generations wrote different
    bytes for one input. Pinning the SSE2 level, which every x86-64 CPU has, fixes both for ~3% more
    transcode CPU time (640x480 -> 426x320); its output equalled x264's C code (asm=0) in every case
    tried. The names are x86 ones: other architectures keep x264's own choice.
    """
    if platform.machine().lower() in ("x86_64", "amd64"):
        return "asm=MMX2,SSE2Fast"
    return ""


class Mp4Encoder:
    """Frames in, MP4 bytes out; deterministic for the same frames (reproducible shard sha256), also
    across x86-64 CPU generations (see `x264_params`) with the same PyAV/FFmpeg build.

    h264: a short GOP (`gop` frames, no B-frames) so that a clip needs little decoding before its first
    frame; x264 runs single-threaded because its output depends on the thread count (and preprocessing
    runs one video per CPU anyway). mjpeg: every frame a JPEG (quality `qscale`, 2 best .. 31 worst):
    random access is free, at several times the bytes. The size is taken from the first frame (cropped
    to even numbers for 4:2:0 chroma).
    """

    def __init__(self, fps: float, *, codec: str = "h264", crf: int = 23, gop: int = 16,
                 preset: str = "veryfast", qscale: int = 5):
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; use one of {CODECS}")
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        rate = Fraction(fps).limit_denominator(1001)
        if codec == "h264":
            self.stream = self.container.add_stream("libx264", rate=rate)
            self.stream.pix_fmt = "yuv420p"
            options = {"crf": str(crf), "preset": preset, "g": str(gop), "bf": "0", "threads": "1"}
            params = x264_params()
            self.stream.options = {**options, "x264-params": params} if params else options
        else:
            self.stream = self.container.add_stream("mjpeg", rate=rate)
            self.stream.pix_fmt = "yuvj420p"
            self.stream.options = {"qmin": str(qscale), "qmax": str(qscale)}
        self.frames = 0
        self.height = self.width = 0

    def write(self, array: np.ndarray) -> None:
        if not self.frames:
            self.height, self.width = array.shape[0] // 2 * 2, array.shape[1] // 2 * 2
            self.stream.width, self.stream.height = self.width, self.height
        array = array[: self.height, : self.width]
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
            self.container.mux(packet)
        self.frames += 1

    def finish(self) -> bytes:
        try:
            if self.frames:
                for packet in self.stream.encode():
                    self.container.mux(packet)
        finally:
            self.container.close()
        return self.buffer.getvalue()


def encode_mp4(frames: np.ndarray, fps: float, **options) -> bytes:
    """Frames in memory -> MP4 bytes (see Mp4Encoder for `options`)."""
    encoder = Mp4Encoder(fps, **options)
    for array in frames:
        encoder.write(array)
    return encoder.finish()


def transcode(
    data: VideoInput,
    *,
    short_side: int,
    min_short_side: int = 0,
    start_s: float | None = None,
    end_s: float | None = None,
    fps: float = 0.0,
    max_frames: int = 0,
    threads: int = 0,
    **encoder_options,
) -> tuple[bytes, dict]:
    """decode -> trim -> upright -> resize -> constant fps -> re-encode, one frame at a time, so memory
    stays that of a frame whatever the length of the video. Returns the MP4 bytes and what the sample
    json records about them. Raises VideoError for unusable input."""
    info = SourceInfo()
    encoder: Mp4Encoder | None = None
    timed = iter_frames(data, info, short_side=short_side, min_short_side=min_short_side, start_s=start_s,
                        end_s=end_s, threads=threads)
    first: list[float] = []  # the time of the first frame kept: stored frame i shows the source at first + i / fps

    def noting_the_first(frames):
        for t, array in frames:
            if not first:
                first.append(t)
            yield t, array

    try:
        with contextlib.closing(timed):
            for array in resample_stream(noting_the_first(timed), fps):
                if encoder is None:
                    encoder = Mp4Encoder(fps or info.fps, **encoder_options)
                encoder.write(array)
                if max_frames and encoder.frames >= max_frames:
                    break
    except BaseException:
        if encoder is not None:
            encoder.container.close()
        raise
    if encoder is None:
        raise VideoError("no frames", "the video stream decoded to zero frames")
    media = encoder.finish()
    return media, {
        "fps": fps or info.fps,
        "frames": encoder.frames,
        "height": encoder.height,
        "width": encoder.width,
        "source_fps": info.fps,
        "source_width": info.source_width,
        "source_height": info.source_height,
        "rotation": info.rotation,
        "first_frame_s": first[0],
    }


def decode_frames(data: bytes, indices, *, threads: int = 0) -> np.ndarray:
    """Frames number `indices` of a constant-frame-rate video (as preprocessing stores them):
    (len(indices), H, W, 3) uint8, in the order given; indices past the end repeat the last frame.

    Only what a clip needs is paid for: the demuxer seeks to the keyframe before the first index,
    decoding stops after the last one, only the wanted frames are converted to RGB, and for intra-only
    codecs (mjpeg) the packets in between are not decoded at all.
    """
    wanted = sorted({int(i) for i in indices})
    got: dict[int, np.ndarray] = {}
    with _open(data) as container:
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
