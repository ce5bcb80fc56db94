from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipelines.data.sources import VideoRecord, folder_per_class, path_label_csv, sample_key
from pipelines.data.synthetic import SyntheticSpec, generate, render_video
from pipelines.data.video import VideoError, clip_indices, clip_starts, decode, encode_mp4, resample_fps, target_size
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.plan import plan_parts


def test_synthetic_set_is_deterministic_and_real_h264(tmp_path):
    spec = SyntheticSpec(classes=3, videos_per_class=2, frames=8, size=32, seed=4)
    csv_a = generate(tmp_path / "a", spec)
    generate(tmp_path / "b", spec)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.mp4"))
    assert len(files) == 6
    for rel in files:
        assert hashlib.sha256((tmp_path / "a" / rel).read_bytes()).digest() == hashlib.sha256((tmp_path / "b" / rel).read_bytes()).digest()
    video = decode((tmp_path / "a" / files[0]).read_bytes())
    assert video.frames.shape == (8, 32, 32, 3) and abs(video.fps - 15) < 1e-6
    assert csv_a.read_text().splitlines()[0] == "path,label"


def test_synthetic_label_is_not_visible_in_one_frame():
    spec = SyntheticSpec(frames=8, size=32)
    # Same random draws, different classes: frame 0 is identical, later frames differ.
    a = render_video(0, np.random.default_rng(7), spec)
    b = render_video(4, np.random.default_rng(7), spec)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[-1], b[-1])


def test_encode_decode_roundtrip_and_resize():
    frames = np.random.default_rng(0).integers(0, 255, (6, 48, 80, 3), dtype=np.uint8)
    data = encode_mp4(frames, 10)
    assert encode_mp4(frames, 10) == data  # deterministic bytes -> reproducible shard sha256
    video = decode(data, short_side=24)
    assert video.frames.shape == (6, 24, 40, 3) and (video.source_width, video.source_height) == (80, 48)


def test_target_size_never_upscales_past_minimum():
    assert target_size(640, 480, 320, 0) == (426, 320)
    assert target_size(100, 60, 320, 0) == (100, 60)
    assert target_size(100, 60, 320, 120) == (200, 120)
    assert target_size(3, 2, 320, 0) == (4, 2)


@pytest.mark.parametrize("payload, reason", [(b"", "empty file"), (b"\x00garbage" * 50, "undecodable")])
def test_bad_bytes_raise_video_error(payload, reason):
    with pytest.raises(VideoError) as info:
        decode(payload)
    assert info.value.reason == reason


def test_clip_sampling():
    assert clip_indices(10, 4, 2, 0).tolist() == [0, 2, 4, 6]
    assert clip_indices(5, 4, 2, 0).tolist() == [0, 2, 4, 4]  # short videos repeat their last frame
    assert clip_starts(100, 8, 4, 1) == [35]
    assert clip_starts(100, 8, 4, 3) == [0, 35, 71]


def test_sample_keys_are_safe_and_distinct():
    a, b = sample_key("dir one/vidéo.v2.mp4"), sample_key("dir_one/vid_o_v2.mp4")
    for key in (a, b):
        assert all(c.isalnum() or c in "-_" for c in key) and "." not in key
    assert a != b


def test_csv_adapter_rejects_missing_and_outside_rows(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.mp4").write_bytes(b"x")
    (tmp_path / "labels.csv").write_text("path,label\ncat/a.mp4,cat\ncat/missing.mp4,cat\n../etc/passwd,cat\n")
    records, rejected = path_label_csv(str(tmp_path / "labels.csv"))
    assert [r.label for r in records] == ["cat"]
    reasons = sorted(r.reason.split(" (")[0] for r in rejected)
    assert reasons == ["missing file", "path points outside the source root " + str(tmp_path)]


def test_folder_adapter_reads_labels_from_folders(tmp_path):
    for label in ("dog", "cat"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "v.mp4").write_bytes(b"x")
    (tmp_path / "stray.mp4").write_bytes(b"x")
    records, rejected = folder_per_class(str(tmp_path))
    assert sorted(r.label for r in records) == ["cat", "dog"]
    assert len(rejected) == 1 and rejected[0].source.endswith("stray.mp4")


def test_parts_are_deterministic_and_bounded():
    records = [VideoRecord(f"k{i:03d}", f"/v/{i}", "a", "train" if i % 4 else "val", size=100) for i in range(40)]
    cfg = PreprocessConfig(source="s", output="o", target_shard_bytes=1000, max_samples_per_shard=8)
    parts = plan_parts(list(reversed(records)), cfg)
    assert parts == plan_parts(records, cfg)
    assert all(len(p.records) <= 8 and sum(r.size for r in p.records) <= 1000 for p in parts)
    assert sum(len(p.records) for p in parts) == 40
    assert {p.split for p in parts} == {"train", "val"} and all({r.split for r in p.records} == {p.split} for p in parts)


@pytest.mark.parametrize("codec", ["h264", "mjpeg"])
def test_decoding_from_a_seek_gives_the_same_frames_as_from_the_start(codec):
    frames = np.repeat(np.arange(0, 200, 5, dtype=np.uint8)[:, None, None, None], 16 * 16 * 3, axis=1).reshape(40, 16, 16, 3)
    data = encode_mp4(frames, 10, codec=codec, gop=8)
    everything = decode(data).frames
    for start in (0, 7, 8, 17, 35):
        window = decode(data, start_s=(start - 0.5) / 10 if start else None, max_frames=5).frames
        assert np.array_equal(window, everything[start : start + 5]), start
        # and the frames are the ones encoded, not neighbours (content is the frame index)
        assert abs(int(window[0].mean()) - 5 * start) <= 2


def test_resample_fps_follows_timestamps():
    frames = np.arange(5)[:, None, None, None]
    times = np.array([0.0, 0.1, 0.2, 0.6, 0.7])  # a gap: 0.2 stays on screen until 0.6
    assert resample_fps(frames, times, 10).ravel().tolist() == [0, 1, 2, 2, 2, 2, 3, 4]
    assert resample_fps(frames, times, 5).ravel().tolist() == [0, 2, 2, 3]


@pytest.mark.parametrize("codec", ["h264", "mjpeg"])
def test_decode_frames_picks_exactly_the_asked_frames(codec):
    from pipelines.data.video import decode_frames

    frames = np.repeat(np.arange(0, 200, 5, dtype=np.uint8)[:, None, None, None], 16 * 16 * 3, axis=1).reshape(40, 16, 16, 3)
    data = encode_mp4(frames, 10, codec=codec, gop=8)
    everything = decode(data).frames
    for index in ([0, 4, 8, 12], [17, 21, 25, 29], [9], [30, 35, 39, 39], [24, 3, 24]):
        assert np.array_equal(decode_frames(data, index), everything[index]), index
    # past the end: the last frame repeats (short videos pad their clips)
    assert np.array_equal(decode_frames(data, [38, 39, 40, 44]), everything[[38, 39, 39, 39]])
    with pytest.raises(VideoError):
        decode_frames(b"not a video" * 10, [0])


def test_synthetic_set_does_not_depend_on_the_number_of_processes(tmp_path):
    spec = SyntheticSpec(classes=4, videos_per_class=10, frames=6, size=32, seed=2)  # > 32 videos: a pool renders
    generate(tmp_path / "pool", spec, workers=2)
    generate(tmp_path / "one", spec, workers=1)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 41
    assert all((tmp_path / "pool" / f).read_bytes() == (tmp_path / "one" / f).read_bytes() for f in files)


def test_seekable_local_reader_reads_only_what_is_asked(tmp_path):
    import io

    from pipelines.data import storage

    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    with storage.open_seekable(str(path), buffer_size=4096) as reader:
        reader.seek(700_000)
        assert reader.read(10) == data[700_000:700_010]
        reader.seek(-5, io.SEEK_END)
        assert reader.read() == data[-5:]
        assert reader.raw.bytes_read <= 3 * 4096
    with pytest.raises(FileNotFoundError):
        storage.open_seekable(str(tmp_path / "gone.bin"))


def _write_clip_shards(directory, shards: int = 3, per_shard: int = 6) -> list[str]:
    import json

    import webdataset as wds

    from tests.media import good

    urls = []
    for s in range(shards):
        path = directory / f"train-{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                video = good(frames=12, height=32, width=32, seed=s * 100 + i)
                sink.write({"__key__": f"s{s}_v{i}", "mp4": video, "cls": str(i % 3).encode(),
                            "json": json.dumps({"frames": 12}).encode()})
        urls.append(str(path))
    return urls


TINY_CLIP = dict(num_frames=4, sampling_rate=2, crop_size=24, test_short_side=32, horizontal_flip=False)


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_training_stream_is_a_function_of_its_seed(tmp_path, loader_workers):
    """Same seed -> the same shards, order, temporal offsets and crops; another seed -> another stream.
    (WebDataset's own resampling mixes the clock into its shard draws.)"""
    import torch

    from pipelines.data.clips import ClipConfig
    from pipelines.data.loader import train_loader

    urls = _write_clip_shards(tmp_path)
    clip = ClipConfig(**TINY_CLIP)

    def stream(seed):
        torch.manual_seed(seed)  # the global generator must not matter (the loop seeds it alike on every rank)
        loader = train_loader(urls, clip, batch_size=4, batches=6, shuffle_buffer=8, seed=seed,
                              loader_workers=loader_workers)
        return [(keys, clips) for clips, _labels, keys in loader]

    first = stream(7)
    torch.manual_seed(123)
    again, other = stream(7), stream(8)
    assert [keys for keys, _ in first] == [keys for keys, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again))
    assert [keys for keys, _ in first] != [keys for keys, _ in other]


@pytest.mark.parametrize(("steps", "loader_workers"), [(6, 0), (6, 2), (5, 2), (1, 3)])
def test_an_epoch_is_steps_per_epoch_batches_whatever_the_loader_workers(tmp_path, steps, loader_workers):
    # DDP needs the same count on every rank, and the LR schedule was built for exactly this many steps.
    from pipelines.data.clips import ClipConfig
    from pipelines.data.loader import train_loader

    urls = _write_clip_shards(tmp_path, shards=2, per_shard=4)
    loader = train_loader(urls, ClipConfig(**TINY_CLIP), batch_size=2, batches=steps, shuffle_buffer=4,
                          seed=0, loader_workers=loader_workers)
    assert sum(1 for _ in loader) == steps


@pytest.mark.parametrize("count", [5, 40])  # below and above the buffer
def test_shuffle_buffer_yields_every_sample_once_in_an_order_per_worker(monkeypatch, count):
    from pipelines.data import loader

    def order(worker):
        monkeypatch.setattr(loader, "_loader_worker", lambda: (worker, 2))
        return list(loader._shuffled(bufsize=16, seed=3, initial=4)(iter(range(count))))

    assert sorted(order(0)) == list(range(count))
    assert order(0) == order(0)
    assert order(0) != order(1)  # DataLoader workers copy the dataset: each must still draw its own picks


def test_crops_depend_on_the_seed_not_on_the_global_generator(tmp_path):
    import json

    import torch

    from pipelines.data.clips import ClipConfig
    from pipelines.data.loader import _decoded
    from tests.media import good

    sample = {"__key__": "a", "mp4": good(frames=12, height=48, width=48), "cls": b"0",
              "json": json.dumps({"frames": 12}).encode()}
    clip = ClipConfig(**{**TINY_CLIP, "sampling_rate": 1, "num_frames": 12})  # one temporal window: only crops vary

    def crops(seed):
        torch.manual_seed(0)  # as every rank does
        return [video for video, _, _ in _decoded(clip, seed)([sample] * 4)]

    by_rank0, by_rank1 = crops(10), crops(11)
    assert any(not torch.equal(a, b) for a, b in zip(by_rank0, by_rank1))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert all(torch.equal(a, b) for a, b in zip(crops(10), by_rank0))
    assert torch.equal(torch.get_rng_state(), state)  # the training loop's generator (drop-path) is left alone


@pytest.mark.parametrize("loader_workers", [0, 2, 3])
def test_a_loader_resumed_at_batch_k_yields_exactly_batches_k_on_of_the_whole_epoch(tmp_path, loader_workers):
    """Exact mid-epoch resume: the same keys, labels and clip tensors as the uninterrupted epoch from batch
    k on, whichever DataLoader worker k falls to (the workers take batches in turn)."""
    import torch

    from pipelines.data.clips import ClipConfig
    from pipelines.data.loader import train_loader

    urls = _write_clip_shards(tmp_path)
    clip = ClipConfig(**TINY_CLIP)

    def epoch(start_batch):
        loader = train_loader(urls, clip, batch_size=3, batches=7, shuffle_buffer=8, seed=5,
                              loader_workers=loader_workers, start_batch=start_batch)
        return list(loader)

    whole = epoch(0)
    assert len(whole) == 7
    for k in (1, 4, 5, 7):
        resumed = epoch(k)
        assert [keys for _, _, keys in resumed] == [keys for _, _, keys in whole[k:]], f"start_batch={k}"
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, whole[k:]))


def test_a_resumed_loader_skips_the_trained_samples_without_decoding_them(tmp_path, monkeypatch):
    from pipelines.data import loader
    from pipelines.data.clips import ClipConfig

    urls = _write_clip_shards(tmp_path)
    decoded = []
    real = loader.train_clips
    monkeypatch.setattr(loader, "train_clips", lambda *args, **kwargs: decoded.append(1) or real(*args, **kwargs))
    batches = list(loader.train_loader(urls, ClipConfig(**TINY_CLIP), batch_size=3, batches=6, shuffle_buffer=8,
                                       seed=1, start_batch=4))
    assert len(batches) == 2
    assert len(decoded) == 2 * 3  # the samples of the two remaining batches only


def test_iterating_a_training_loader_leaves_the_global_generator_alone(tmp_path):
    # The loop's drop-path draws from torch's global generator and a checkpoint saves its state: the loader
    # must not advance it (the DataLoader draws a base seed per iter(), from a generator of its own here).
    import torch

    from pipelines.data.clips import ClipConfig
    from pipelines.data.loader import train_loader

    urls = _write_clip_shards(tmp_path, shards=1)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    assert len(list(train_loader(urls, ClipConfig(**TINY_CLIP), batch_size=2, batches=2, shuffle_buffer=4,
                                 seed=0, start_batch=1))) == 1
    assert torch.equal(torch.get_rng_state(), state)
