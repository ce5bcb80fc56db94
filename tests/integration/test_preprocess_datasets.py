"""Each dataset layout through the real job: Kinetics (trimmed clips and a cut of a full video), SSv2
(webm, template classes), AVA (a keyframe-annotated chunk of a movie, multi-label) and ImageNet-style
image folders (JPEG samples): the samples carry what training and evaluation need."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from pipelines.commands.shards import verify
from pipelines.config import load_config
from pipelines.data.shards import sample_metadata
from pipelines.data.video import decode
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.job import run as preprocess
from tests import media

pytestmark = pytest.mark.integration


def run(source: Path, out: Path, *overrides: str):
    cfg = load_config(PreprocessConfig, None, [f"source={source}", f"output={out}", "short_side=32", *overrides])
    manifest = preprocess(cfg)
    samples = {}
    for shard in manifest.shards:
        for sample in wds.WebDataset(str(out / shard.url), shardshuffle=False, empty_check=False):
            samples[sample["__key__"]] = sample
    report = verify(str(out), decode_fraction=1.0)
    assert report["ok"], report["problems"]
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert manifest.num_samples + manifest.quarantined == manifest.inputs
    return manifest, samples, quarantine


def webm(frames: int = 8) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=12)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for array in media.pattern(frames, 32, 48):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_kinetics_clips_and_a_cut_of_a_full_video(ray_session, tmp_path):
    root = tmp_path / "k400"
    media.write(root / "train" / "abseiling" / "aaaaaaaaaaa_000010_000020.mp4", media.good(frames=12, fps=15))
    media.write(root / "full" / "bbbbbbbbbbb.mp4", media.good(frames=60, fps=15))  # 4 s, untrimmed
    (root / "k400.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,aaaaaaaaaaa,10,20,train\n"
        "zumba,bbbbbbbbbbb,1,3,validate\n"
        "yoga,ccccccccccc,0,10,train\n"
    )
    manifest, samples, quarantine = run(root / "k400.csv", tmp_path / "ds", "fps=15")
    assert manifest.label_map == {"abseiling": 0, "zumba": 1}  # yoga's only row had no file
    assert len(quarantine) == 1 and "ccccccccccc" in json.dumps(quarantine[0])
    metas = {sample_metadata(s)["label"]: sample_metadata(s) for s in samples.values()}
    assert metas["abseiling"]["frames"] == 12 and metas["abseiling"]["split"] == "train"
    cut = metas["zumba"]
    assert (cut["start_s"], cut["end_s"], cut["split"]) == (1.0, 3.0, "val")
    assert cut["frames"] == 30  # 2 s at 15 fps, not the whole 4 s video


def test_ssv2_webm_videos_become_template_classes(ray_session, tmp_path):
    labels, videos = tmp_path / "labels", tmp_path / "videos"
    labels.mkdir()
    (labels / "something-something-v2-labels.json").write_text(json.dumps(
        {"Holding something": "0", "Putting something on a surface": "1"}))
    (labels / "something-something-v2-train.json").write_text(json.dumps([
        {"id": "1", "label": "holding a pen", "template": "Holding [something]", "placeholders": ["a pen"]},
        {"id": "2", "label": "x", "template": "Dancing with [something]", "placeholders": ["x"]},
    ]))
    (labels / "something-something-v2-validation.json").write_text(json.dumps([
        {"id": "3", "label": "putting a cup on a table", "template": "Putting [something] on a surface",
         "placeholders": ["a cup"]},
    ]))
    for video_id in ("1", "2", "3"):
        media.write(videos / f"{video_id}.webm", webm())
    manifest, samples, quarantine = run(
        labels, tmp_path / "ds", f"source_root={videos}", f"labels_file={labels / 'something-something-v2-labels.json'}",
        "fps=0",
    )
    assert manifest.label_map == {"Holding something": 0, "Putting something on a surface": 1}
    assert len(quarantine) == 1 and "Dancing with [something]" in quarantine[0]["reason"]
    by_class = {int(s["cls"]): sample_metadata(s) for s in samples.values()}
    assert by_class[0]["split"] == "train" and by_class[1]["split"] == "val"
    assert by_class[0]["extra"]["placeholders"] == ["a pen"] and by_class[0]["frames"] == 8


def test_ava_chunk_is_cut_from_the_movie_with_its_keyframes(ray_session, tmp_path):
    annotations, videos = tmp_path / "annotations", tmp_path / "videos"
    annotations.mkdir()
    (annotations / "ava_action_list_v2.2.pbtxt").write_text(
        'label { name: "bend/bow (at the waist)" label_id: 1 label_type: PERSON_MOVEMENT }\n'
        'label { name: "stand" label_id: 12 label_type: PERSON_MOVEMENT }\n'
        'label { name: "talk to (e.g., self, a person, a group)" label_id: 79 label_type: PERSON_INTERACTION }\n'
    )
    (annotations / "ava_train_v2.2.csv").write_text(
        "movieAAAAAA,0902,0.1,0.2,0.5,0.9,12,0\n"
        "movieAAAAAA,0902,0.1,0.2,0.5,0.9,79,0\n"
        "movieAAAAAA,0910,0.6,0.1,0.9,0.8,12,1\n"
    )
    # a "movie" whose only frames (2 fps) lie around the first annotated minute; the rest is a gap
    times = [0.0] + [897.0 + 0.5 * i for i in range(132)]
    media.write(videos / "movieAAAAAA.mp4", media.variable_frame_rate(times))
    manifest, samples, quarantine = run(annotations, tmp_path / "ds", f"source_root={videos}", "fps=2")
    assert not quarantine and len(samples) == 1
    (sample,) = samples.values()
    meta = sample_metadata(sample)
    assert (meta["start_s"], meta["end_s"]) == (898.5, 961.5)  # the 900..960 chunk with 1.5 s of context
    assert meta["frames"] == 126  # 63 s at 2 fps
    assert sorted(meta["labels"]) == ["stand", "talk to (e.g., self, a person, a group)"]
    ids = sorted(manifest.label_map[name] for name in meta["labels"])
    assert sample["cls"].decode() == ",".join(map(str, ids))  # multi-label: every class id
    keyframes = {k["t"]: k for k in meta["extra"]["keyframes"]}
    assert set(keyframes) == {902, 910}
    assert keyframes[902]["actions"] == [[12, 79]] and keyframes[902]["boxes"] == [[0.1, 0.2, 0.5, 0.9]]
    assert decode(sample["mp4"]).frames.shape[0] == 126


def test_image_folder_becomes_jpeg_samples(ray_session, tmp_path):
    from PIL import Image

    def jpeg(width: int, height: int, orientation: int = 1) -> bytes:
        array = media.pattern(1, height, width)[0]
        buffer = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(array).save(buffer, format="JPEG", exif=exif.tobytes())
        return buffer.getvalue()

    root = tmp_path / "imagenet"
    media.write(root / "train" / "n01440764" / "a.JPEG", jpeg(96, 64))
    media.write(root / "train" / "n01443537" / "b.jpeg", jpeg(96, 64, orientation=6))  # shown rotated 90 CW
    media.write(root / "val" / "n01440764" / "c.JPEG", jpeg(40, 40))
    media.write(root / "train" / "n01443537" / "broken.JPEG", b"\xff\xd8\xff garbage")
    manifest, samples, quarantine = run(root, tmp_path / "ds")
    assert [q["reason"] for q in quarantine] == ["undecodable image"]
    assert manifest.splits == {"train": 2, "val": 1}
    metas = {Path(sample_metadata(s)["source"]).name: (s, sample_metadata(s)) for s in samples.values()}
    sample, meta = metas["a.JPEG"]
    assert "jpg" in sample and "mp4" not in sample and meta["media"] == "image"
    assert (meta["width"], meta["height"]) == (48, 32)  # short side 32
    assert (metas["b.jpeg"][1]["width"], metas["b.jpeg"][1]["height"]) == (32, 48)  # EXIF orientation applied
    import torch
    from torchvision.io import decode_image

    image = decode_image(torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8))
    assert tuple(image.shape) == (3, 32, 48)
    assert image[0, :, :24].float().mean() > image[0, :, 24:].float().mean() + 80  # bright left half kept
    assert np.unique([int(s["cls"]) for s, _ in metas.values()]).tolist() == [0, 1]


def _cuts_of_a_movie(s3) -> tuple[bytes, list]:
    """Two 1 s cuts of a 20 s movie on S3, after a missing and an empty source (so the movie's reader is
    the one open when the part ends)."""
    from pipelines.data.sources import VideoRecord

    movie = media.good(frames=300, height=120, width=160, seed=3)  # 20 s at 15 fps
    s3.put_object(Bucket="mvit", Key="raw/long/movie.mp4", Body=movie)
    s3.put_object(Bucket="mvit", Key="raw/long/empty.mp4", Body=b"")

    def cut(name: str, start: float):
        return VideoRecord(key=f"{name}_{start:g}s", source=f"s3://mvit/raw/long/{name}.mp4", label="a",
                           split="train", start_s=start, end_s=start + 1.0, size=len(movie) // 20)

    return movie, [cut("gone", 0.0), cut("empty", 0.0), cut("movie", 6.0), cut("movie", 12.0)]


def _process(records, out: Path, stream_min_bytes: int):
    from pipelines.preprocess.plan import Part
    from pipelines.preprocess.worker import process_part

    cfg = load_config(PreprocessConfig, None, ["source=unused", f"output={out}", "short_side=32",
                                              f"stream_min_bytes={stream_min_bytes}"])
    return process_part(Part("train-00000", "train", records), {"a": 0}, cfg, "fingerprint")


def test_time_ranges_of_a_big_s3_file_are_read_by_ranges(s3, tmp_path, monkeypatch):
    """Cuts of a long video (AVA chunks): over `stream_min_bytes` a part seeks and fetches the index and
    its ranges only, and writes the same shard bytes as when it downloads the whole file."""
    from pipelines.data import storage

    movie, records = _cuts_of_a_movie(s3)
    monkeypatch.setattr(storage, "SEEK_BUFFER_BYTES", 32 * 1024)
    whole = _process(records, tmp_path / "whole", 10**12)
    ranged = _process(records, tmp_path / "ranged", 0)
    assert ranged.shards and [s.sha256 for s in ranged.shards] == [s.sha256 for s in whole.shards]
    assert sum(s.num_samples for s in ranged.shards) == 2
    reasons = ["missing file", "empty file"]
    assert [q.reason for q in ranged.quarantine] == [q.reason for q in whole.quarantine] == reasons
    assert whole.bytes_in == len(movie)  # one download for both cuts
    assert 0 < ranged.bytes_in < len(movie) / 2


def test_a_failing_ranged_read_fails_the_part_instead_of_quarantining(s3, tmp_path, monkeypatch):
    """S3 answering 500 to every ranged GET (after botocore's retries) is a storage failure: the part
    raises and records nothing, so a rerun redoes it; the video is not quarantined as bad."""
    import botocore.exceptions

    from pipelines.data import storage
    from pipelines.preprocess.worker import PARTS_DIR

    _, records = _cuts_of_a_movie(s3)
    real_client = storage.s3_client

    class RangedGetsFail:
        def __init__(self, client):
            self._client = client

        def __getattr__(self, name):
            return getattr(self._client, name)

        def get_object(self, **kwargs):
            if "Range" in kwargs:
                error = {"Error": {"Code": "InternalError", "Message": "injected"}, "ResponseMetadata": {"HTTPStatusCode": 500}}
                raise botocore.exceptions.ClientError(error, "GetObject")
            return self._client.get_object(**kwargs)

    monkeypatch.setattr(storage, "s3_client", lambda *a, **k: RangedGetsFail(real_client(*a, **k)))
    with pytest.raises(botocore.exceptions.ClientError, match="injected"):
        _process(records, tmp_path / "ds", 0)
    assert not (tmp_path / "ds" / PARTS_DIR).exists()


def test_seekable_s3_reader_returns_the_asked_bytes(s3):
    from pipelines.data import storage

    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    s3.put_object(Bucket="mvit", Key="raw/blob.bin", Body=data)
    with storage.open_seekable("s3://mvit/raw/blob.bin", buffer_size=4096) as reader:
        reader.seek(700_000)
        assert reader.read(10) == data[700_000:700_010]
        reader.seek(-5, io.SEEK_END)
        assert reader.read() == data[-5:]
        reader.seek(123)
        assert reader.read(9000) == data[123:9123]
        assert reader.raw.bytes_read < 5 * 4096 + 9000
    with pytest.raises(FileNotFoundError, match="gone.bin"):
        storage.open_seekable("s3://mvit/raw/gone.bin")
