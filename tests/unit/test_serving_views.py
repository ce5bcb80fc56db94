"""Serving a user's video (pipelines/data/clips.py video_views, pipelines/register/batch.py): frames put on
the training frame rate, only the views' frames decoded, the same clips as evaluation cuts from a stored
sample of the same motion."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from pipelines.data import video
from pipelines.data.clips import ClipConfig, eval_views, video_views
from pipelines.data.video import encode_mp4

CLIP = ClipConfig(num_frames=8, sampling_rate=2, crop_size=32, test_short_side=32)
LEVEL_STEP = 12  # grey levels between two consecutive time codes: far above the codec's error
CODES = 18  # time codes repeat after this many slots (16 + 12 * 17 = 220 stays a valid grey level)


def time_coded(seconds: float, fps: float, code_fps: float = 15, size: tuple[int, int] = (32, 48)) -> np.ndarray:
    """Frames whose uniform grey level encodes which 1/code_fps-second slot they are shown in: a video of the
    same 'motion' at any frame rate."""
    slots = np.floor(np.arange(int(round(seconds * fps))) / fps * code_fps + 1e-6).astype(int)
    levels = 16 + LEVEL_STEP * (slots % CODES)
    return np.broadcast_to(levels[:, None, None, None], (len(slots), *size, 3)).astype(np.uint8).copy()


def slots_seen(clips: torch.Tensor, clip: ClipConfig = CLIP) -> np.ndarray:
    """The time slot (modulo CODES) of every frame of (views, C, T, H, W) model input, from its grey level."""
    grey = clips.mean(dim=(1, 3, 4)) * clip.std[0] + clip.mean[0]  # (views, T) in [0, 1]; one mean/std for all channels
    return np.rint((grey.numpy() * 255 - 16) / LEVEL_STEP).astype(int)


def test_a_60fps_video_is_seen_at_the_training_frame_rate():
    slow = encode_mp4(time_coded(6, 15), 15, crf=10)
    fast = encode_mp4(time_coded(6, 60), 60, crf=10)
    at_15 = slots_seen(video_views(io.BytesIO(slow), CLIP, views=3, fps=15))
    at_60 = slots_seen(video_views(io.BytesIO(fast), CLIP, views=3, fps=15))
    np.testing.assert_array_equal(at_60, at_15)
    # 90 frames at 15 fps: views start at 0, 37, 75 and step sampling_rate=2 grid frames = 2 slots
    expected = np.array([start + 2 * np.arange(8) for start in (0, 37, 75)])
    np.testing.assert_array_equal(at_15, expected % CODES)
    # the video's own rate (what serving did before): the clip spans a quarter of the time
    native = slots_seen(video_views(io.BytesIO(fast), CLIP, views=1, fps=0))
    assert native[0, -1] - native[0, 0] == 3  # 14 frames at 60 fps = 3.5 slots, vs 14 at 15 fps (no wrap: < CODES)


def test_a_stored_sample_gives_the_clips_evaluation_cuts():
    frames = time_coded(4, 15) + np.random.default_rng(0).integers(0, 4, (60, 32, 48, 3), dtype=np.uint8)
    data = encode_mp4(frames, 15, crf=18)
    served = video_views(io.BytesIO(data), CLIP, views=2, fps=15)
    evaluated = eval_views(data, CLIP, temporal=2, frames_in_video=60)
    torch.testing.assert_close(served, evaluated, rtol=0, atol=0)


def test_only_the_views_frames_are_decoded_and_converted(monkeypatch):
    data = encode_mp4(time_coded(20, 30, size=(64, 96)), 30, gop=30)  # 600 frames, a keyframe every second
    converted = []
    original = video.iter_frames

    def counting(*args, **kwargs):
        for t, array in original(*args, **kwargs):
            converted.append(array.shape)
            yield t, array

    monkeypatch.setattr(video, "iter_frames", counting)
    clips = video_views(io.BytesIO(data), CLIP, views=2, fps=15)
    assert clips.shape == (2, 3, 8, 32, 32)
    # two views of 15 grid frames (= 30 source frames) each, decoded from their start; every converted frame
    # is resized while decoding (short side 32)
    assert 2 * 29 <= len(converted) <= 2 * 31
    assert set(converted) == {(32, 48, 3)}


def test_variable_frame_rate_follows_the_timestamps():
    # A VFR video: frames at irregular times, each showing the slot of its own time.
    times = np.cumsum(np.r_[0, np.random.default_rng(1).uniform(1 / 90, 1 / 20, 299)])
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=90)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.time_base = Fraction(1, 90000)
        stream.options = {"crf": "10", "bf": "0"}
        for t in times:
            level = 16 + LEVEL_STEP * (int(np.floor(t * 15 + 1e-6)) % CODES)
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), level, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(round(t * 90000)), Fraction(1, 90000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    seen = slots_seen(video_views(io.BytesIO(buffer.getvalue()), CLIP, views=1, fps=15))
    # the grid frame k shows the frame on screen at k/15 s, i.e. from slot k (or the one before, when no frame
    # starts in slot k): consecutive sampled frames are 2 slots apart, give or take that one
    steps = np.diff(seen[0]) % CODES
    assert set(steps) <= {1, 2, 3} and abs(steps.sum() - 14) <= 1


def test_batch_inputs_from_a_folder_a_csv_and_files(tmp_path):
    from pipelines.register.batch import list_videos

    for name in ("a/x.mp4", "a/sub/y.MOV", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"0")
    (tmp_path / "list.csv").write_text("path,label\na/x.mp4,l\n/abs/z.mp4,l\n")
    assert list_videos([str(tmp_path / "a")]) == [
        {"key": "x.mp4", "video": str(tmp_path / "a/x.mp4")}, {"key": "sub/y.MOV", "video": str(tmp_path / "a/sub/y.MOV")}]
    assert list_videos([str(tmp_path / "list.csv")]) == [
        {"key": "a/x.mp4", "video": str(tmp_path / "a/x.mp4")}, {"key": "/abs/z.mp4", "video": "/abs/z.mp4"}]
    assert list_videos([str(tmp_path / "a/x.mp4")]) == [{"key": str(tmp_path / "a/x.mp4"), "video": str(tmp_path / "a/x.mp4")}]
    (tmp_path / "bad.csv").write_text("file\nx.mp4\n")
    with pytest.raises(ValueError, match="bad.csv needs a column named video or path"):
        list_videos([str(tmp_path / "bad.csv")])
    with pytest.raises(FileNotFoundError, match="names no video"):
        list_videos([str(tmp_path / "empty-folder")])
