"""Dataset adapters on tiny fake layouts (a few bytes per file: adapters never decode media)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipelines.data import storage
from pipelines.data.sources import (
    FORMATS,
    SourceError,
    VideoRecord,
    ava,
    detect_format,
    image_folder,
    kinetics_csv,
    load_records,
    read_action_list,
    ssv2_json,
)
from pipelines.data.sources.ava import parse_action_list


def touch(root: Path, rel: str, data: bytes = b"x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def by_source(records):
    return {Path(r.source).name if not r.source.startswith("s3://") else r.source: r for r in records}


# --- VideoRecord -------------------------------------------------------------------------------------


def test_record_fills_labels_and_survives_a_json_round_trip():
    single = VideoRecord("k", "/v.mp4", "cat")
    assert single.labels == ("cat",) and single.media == "video" and single.extra == {}
    multi = VideoRecord("m", "/a.mkv", "", "train", 898.5, 961.5, 10, ("sit", "stand"),
                        extra={"keyframes": [{"t": 902, "boxes": [[0.1, 0.2, 0.3, 0.4]]}]})
    for record in (single, multi):
        again = VideoRecord(**json.loads(json.dumps(dataclasses.asdict(record))))  # what the job's parts do
        assert again == record and isinstance(again.labels, tuple)
    assert hash(multi) == hash(dataclasses.replace(multi, extra={}))  # extra is not hashed (a dict)


@pytest.mark.parametrize("kwargs, message", [
    ({"label": "cat", "labels": ("cat", "dog")}, "multi-label record sets label=''"),
    ({"label": "cat", "media": "audio"}, "media 'audio'"),
])
def test_record_rejects_inconsistent_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VideoRecord("k", "/v", **kwargs)


# --- Kinetics ----------------------------------------------------------------------------------------

KINETICS_HEADER = "label,youtube_id,time_start,time_end,split,is_cc\n"


def kinetics_layout(tmp_path: Path) -> Path:
    videos = tmp_path / "k400"
    touch(videos, "train/abseiling/aaaaaaaaaaa_000010_000020.mp4", b"xx")  # <split>/<label>/
    touch(videos, "validate/bbbbbbbbbbb_000005_000015.mp4")  # <split>/ (split spelled as in the CSV)
    touch(videos, "ccccccccccc_000001_000011.mkv")  # flat, other container
    touch(videos, "raw/dddddddddd-.mp4", b"full video")  # the full untrimmed video: two rows cut it
    touch(videos, "playing cello/eeeeeeeeeee_000000_000010.mp4")  # <label>/, label with a space
    # the same clip name twice: the copy inside the row's split folder wins
    touch(videos, "test/fffffffffff_000030_000040.mp4")
    touch(videos, "train/fffffffffff_000030_000040.mp4")
    csv_path = tmp_path / "kinetics_400.csv"
    csv_path.write_text(
        KINETICS_HEADER
        + "abseiling,aaaaaaaaaaa,10,20,train,0\n"                  # 2
        + "air drumming,bbbbbbbbbbb,5,15,validate,0\n"             # 3
        + '"passing American football (in game)",ccccccccccc,1,11,train,0\n'  # 4
        + "zumba,dddddddddd-,30,40,train,0\n"                      # 5 full video, segment 30..40
        + "zumba,dddddddddd-,50,60,val,0\n"                        # 6 same full video, other segment
        + "playing cello,eeeeeeeeeee,0.0,10,test,1\n"              # 7
        + "yoga,fffffffffff,30,40,test,0\n"                        # 8
        + "yoga,ggggggggggg,0,10,train,0\n"                        # 9 no such file
        + ",hhhhhhhhhhh,0,10,train,0\n"                            # 10 empty label
        + "yoga,../../etc,0,10,train,0\n"                          # 11 would leave the root
        + "yoga,iiiiiiiiiii,20,10,train,0\n"                       # 12 end before start
        + "yoga,jjjjjjjjjjj,ten,20,train,0\n"                      # 13 not a number
        + "yoga,aaaaaaaaaaa,10,20,holdout,0\n"                     # 14 unknown split
    )
    return csv_path


def test_kinetics_finds_files_in_every_layout_and_rejects_bad_rows(tmp_path):
    csv_path = kinetics_layout(tmp_path)
    records, rejected = kinetics_csv(str(csv_path), str(tmp_path / "k400"))
    assert len(records) + len(rejected) == 13  # every row accounted for
    got = {(Path(r.source).relative_to(tmp_path / "k400").as_posix(), r.start_s): r for r in records}
    assert sorted(got) == sorted([
        ("train/abseiling/aaaaaaaaaaa_000010_000020.mp4", None),
        ("validate/bbbbbbbbbbb_000005_000015.mp4", None),
        ("ccccccccccc_000001_000011.mkv", None),
        ("raw/dddddddddd-.mp4", 30.0),
        ("raw/dddddddddd-.mp4", 50.0),
        ("playing cello/eeeeeeeeeee_000000_000010.mp4", None),
        ("test/fffffffffff_000030_000040.mp4", None),
    ])
    trimmed = got[("train/abseiling/aaaaaaaaaaa_000010_000020.mp4", None)]
    assert (trimmed.label, trimmed.split, trimmed.end_s, trimmed.size) == ("abseiling", "train", None, 2)
    assert got[("validate/bbbbbbbbbbb_000005_000015.mp4", None)].split == "val"
    assert got[("ccccccccccc_000001_000011.mkv", None)].label == "passing American football (in game)"
    full = got[("raw/dddddddddd-.mp4", 30.0)]
    assert (full.start_s, full.end_s, full.label) == (30.0, 40.0, "zumba")
    assert full.key != got[("raw/dddddddddd-.mp4", 50.0)].key  # two segments of one file: two samples
    assert len({r.key for r in records}) == len(records)

    reasons = {r.source.rsplit(":", 1)[-1] if ".csv:" in r.source else Path(r.source).name: r.reason for r in rejected}
    assert reasons["ggggggggggg_000000_000010.mp4"].startswith(f"missing file ({csv_path}:9)")
    assert reasons["10"] == "row without a label"
    assert reasons["11"].startswith("malformed youtube_id '../../etc'")
    assert reasons["12"].startswith("bad time range '20'..'10'")
    assert reasons["13"].startswith("bad time range 'ten'..'20'")
    assert reasons["14"].startswith("unknown split 'holdout'")


def test_kinetics_csv_without_the_columns_names_the_file(tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("youtube_id,start,end\nabc,1,2\n")
    touch(tmp_path, "abc.mp4")
    with pytest.raises(SourceError, match=r"train\.csv: missing column\(s\) \['label', 'time_start', 'time_end'\]"):
        kinetics_csv(str(bad))
    with pytest.raises(SourceError, match="Kinetics annotation CSV .*nope.csv does not exist"):
        kinetics_csv(str(tmp_path / "nope.csv"))
    good = tmp_path / "ok.csv"
    good.write_text(KINETICS_HEADER + "yoga,abc,1,2,train,0\n")
    with pytest.raises(SourceError, match="video folder .*empty is empty or does not exist"):
        kinetics_csv(str(good), str(tmp_path / "empty"))


# --- Something-Something v2 --------------------------------------------------------------------------


def ssv2_layout(tmp_path: Path) -> tuple[Path, Path]:
    labels_dir, videos = tmp_path / "labels", tmp_path / "20bn-something-something-v2"
    labels_dir.mkdir(parents=True)
    (labels_dir / "something-something-v2-labels.json").write_text(json.dumps({
        "Holding something": "16", "Putting something on a surface": "104",
        "Pretending to put something next to something": "60",
    }))
    (labels_dir / "something-something-v2-train.json").write_text(json.dumps([
        {"id": "1", "label": "holding a pen", "template": "Holding [something]", "placeholders": ["a pen"]},
        {"id": "2", "label": "putting a cup on a table", "template": "Putting [something] on a surface",
         "placeholders": ["a cup"]},
        {"id": "3", "label": "x", "template": "Dancing with [something]", "placeholders": ["x"]},  # unknown
        {"id": "4", "label": "holding a mug", "template": "Holding [something]", "placeholders": ["a mug"]},  # no file
        {"id": "../5", "template": "Holding [something]"},  # would leave the root
        "not an object",
    ]))
    (labels_dir / "something-something-v2-validation.json").write_text(json.dumps([
        {"id": "10", "label": "pretending to put a pen next to a cup",
         "template": "Pretending to put [something] next to [something]", "placeholders": ["a pen", "a cup"]},
    ]))
    for video_id in ("1", "2", "3", "10"):
        touch(videos, f"{video_id}.webm")
    return labels_dir, videos


def test_ssv2_classes_are_templates_without_brackets(tmp_path):
    labels_dir, videos = ssv2_layout(tmp_path)
    for source in (labels_dir, labels_dir / "something-something-v2-labels.json"):
        records, rejected = ssv2_json(str(source), str(videos))
        assert len(records) + len(rejected) == 7
        got = {Path(r.source).name: (r.label, r.split) for r in records}
        assert got == {
            "1.webm": ("Holding something", "train"),
            "2.webm": ("Putting something on a surface", "train"),
            "10.webm": ("Pretending to put something next to something", "val"),
        }
        assert by_source(records)["10.webm"].extra == {
            "caption": "pretending to put a pen next to a cup", "placeholders": ["a pen", "a cup"]}
        train = labels_dir / "something-something-v2-train.json"
        reasons = {r.source: r.reason for r in rejected}
        assert reasons[f"{train}[entry 2]"] == f"unknown template 'Dancing with [something]' (not in {labels_dir / 'something-something-v2-labels.json'})"
        assert reasons[str(videos / "4.webm")] == f"missing file ({train}[entry 3])"
        assert reasons[f"{train}[entry 4]"] == "malformed video id '../5'"
        assert reasons[f"{train}[entry 5]"].startswith("entry is not an object")


def test_ssv2_bad_annotation_files_raise_naming_the_file(tmp_path):
    labels_dir, videos = ssv2_layout(tmp_path)
    (labels_dir / "something-something-v2-train.json").write_text('[{"id": "1",')
    with pytest.raises(SourceError, match=r"something-something-v2-train\.json is not valid JSON \(line 1"):
        ssv2_json(str(labels_dir), str(videos))
    (labels_dir / "something-something-v2-train.json").unlink()
    (labels_dir / "something-something-v2-validation.json").unlink()
    with pytest.raises(SourceError, match="no Something-Something v2 list next to"):
        ssv2_json(str(labels_dir), str(videos))
    (labels_dir / "something-something-v2-labels.json").unlink()
    with pytest.raises(SourceError, match="labels file .*something-something-v2-labels.json does not exist"):
        ssv2_json(str(labels_dir), str(videos))


# --- AVA ---------------------------------------------------------------------------------------------

AVA_ACTIONS = """# a comment
label {
  name: "bend/bow (at the waist)"
  label_id: 1
  label_type: PERSON_MOVEMENT
}
label {
  name: "stand"
  label_id: 12
  label_type: PERSON_MOVEMENT
}
label { name: "talk to (e.g., self, a person, a group)" label_id: 79 label_type: PERSON_INTERACTION }
"""


def ava_layout(tmp_path: Path) -> tuple[Path, Path]:
    annotations, videos = tmp_path / "annotations", tmp_path / "videos"
    annotations.mkdir(parents=True)
    (annotations / "ava_action_list_v2.2.pbtxt").write_text(AVA_ACTIONS)
    (annotations / "ava_train_v2.2.csv").write_text(
        "movieAAAAAA,0902,0.1,0.2,0.5,0.9,12,0\n"        # 1: person 0 stands and talks (2 rows, one box)
        "movieAAAAAA,0902,0.1,0.2,0.5,0.9,79,0\n"        # 2
        "movieAAAAAA,0902,0.6,0.1,0.9,0.8,1,1\n"         # 3: person 1 bends
        "movieAAAAAA,0961,0.1,0.2,0.5,0.9,12,0\n"        # 4: next chunk (960..1020)
        "movieAAAAAA,1798,0.0,0.0,1.0,1.0,12,0\n"        # 5: last keyframe, last chunk
        "\n"                                             # 6: blank line, ignored
        "movieAAAAAA,0903,0.1,0.2,0.5,0.9,55,0\n"        # 7: unknown action
        "movieAAAAAA,0300,0.1,0.2,0.5,0.9,12,0\n"        # 8: outside the annotated window
        "movieAAAAAA,0904,0.5,0.2,0.1,0.9,12,0\n"        # 9: x2 < x1
        "movieAAAAAA,0904,0.1,0.2\n"                     # 10: too few columns
        "movieAAAAAA,09o4,0.1,0.2,0.5,0.9,12,0\n"        # 11: not a number
        "missingMOVIE,0902,0.1,0.2,0.5,0.9,12,0\n"       # 12: no video file (2 chunks)
        "missingMOVIE,1000,0.1,0.2,0.5,0.9,12,0\n"       # 13
    )
    (annotations / "ava_val_v2.2.csv").write_text("movieBBBBBB,1500,0.2,0.2,0.4,0.4,1,3\n")
    touch(videos, "trainval/movieAAAAAA.mkv", b"m" * 18000)
    touch(videos, "trainval/movieBBBBBB.mp4")
    return annotations, videos


def test_ava_parses_the_action_list_in_both_spellings():
    assert parse_action_list(AVA_ACTIONS, "a.pbtxt") == {
        1: "bend/bow (at the waist)", 12: "stand", 79: "talk to (e.g., self, a person, a group)"}
    items = 'item {\n  name: "say \\"hi\\""\n  id: 3\n}\nitem { name: "run" id: 4 }\n'
    assert parse_action_list(items, "b.pbtxt") == {3: 'say "hi"', 4: "run"}
    with pytest.raises(SourceError, match=r"c.pbtxt:2: expected ':', found '\{'"):
        parse_action_list('label { name: "x" label_id: 1\nlabel {', "c.pbtxt")
    with pytest.raises(SourceError, match=r"c.pbtxt:1: expected '\}', found 'end of file'"):
        parse_action_list('label { name: "x" label_id: 1', "c.pbtxt")
    with pytest.raises(SourceError, match="d.pbtxt: action 'y' / id 1 is listed twice"):
        parse_action_list('label { name: "x" label_id: 1 } label { name: "y" label_id: 1 }', "d.pbtxt")
    with pytest.raises(SourceError, match="e.pbtxt: block .* needs a name and an integer label_id"):
        parse_action_list('label { name: "x" }', "e.pbtxt")


def test_ava_chunks_carry_keyframe_boxes_and_actions(tmp_path):
    annotations, videos = ava_layout(tmp_path)
    records, rejected = ava(str(annotations), str(videos), chunk_s=60, context_s=1.5)
    movie = str(videos / "trainval" / "movieAAAAAA.mkv")
    assert [(r.source, r.split, r.start_s, r.end_s) for r in records] == [
        (movie, "train", 898.5, 961.5),
        (movie, "train", 958.5, 1021.5),
        (movie, "train", 1738.5, 1801.5),
        (str(videos / "trainval" / "movieBBBBBB.mp4"), "val", 1498.5, 1561.5),
    ]
    first = records[0]
    assert first.label == "" and first.labels == ("bend/bow (at the waist)", "stand", "talk to (e.g., self, a person, a group)")
    assert first.extra == {"video_id": "movieAAAAAA", "keyframes": [
        {"t": 902, "boxes": [[0.1, 0.2, 0.5, 0.9], [0.6, 0.1, 0.9, 0.8]], "actions": [[12, 79], [1]], "person_ids": [0, 1]},
    ]}
    assert records[1].labels == ("stand",) and [k["t"] for k in records[1].extra["keyframes"]] == [961]
    assert first.size == round(18000 * 63 / 1800)  # the chunk's share of the movie, not the whole file
    assert len({r.key for r in records}) == 4

    train_csv = annotations / "ava_train_v2.2.csv"
    # Rows: one quarantine line each, the reason a category (what `mvit shards stats` counts), the specifics in detail.
    rows = {r.source: (r.reason, r.detail) for r in rejected if r.source.startswith(f"{train_csv}:")}
    assert rows == {
        f"{train_csv}:7": ("unknown action_id", "55 is not in the action list"),
        f"{train_csv}:8": ("timestamp outside the annotated window",
                           "300 outside 900..1800 s (AVA: 900..1800; option window_s)"),
        f"{train_csv}:9": ("inverted box (x1 > x2 or y1 > y2)", "box [0.5, 0.2, 0.1, 0.9]: columns are x1,y1,x2,y2"),
        f"{train_csv}:10": ("malformed row", "expected video_id,timestamp,x1,y1,x2,y2,action_id,person_id (4 columns)"),
        f"{train_csv}:11": ("non-numeric field", "invalid literal for int() with base 10: '09o4'"),
    }
    assert all(r.keyframes == 0 for r in rejected if r.source in rows)
    # Keyframes: those left without a usable row (0903, 0300, 0904: rows 7-10; row 11 names no readable time)
    # and those of the missing movie, each counted once, so every keyframe a row names is accounted for.
    lost = sorted((r.reason, r.detail, r.keyframes) for r in rejected if r.source not in rows)
    assert lost == [
        ("keyframe without a usable row", "movieAAAAAA,0300: its 1 row(s) were rejected", 1),
        ("keyframe without a usable row", "movieAAAAAA,0903: its 1 row(s) were rejected", 1),
        ("keyframe without a usable row", "movieAAAAAA,0904: its 2 row(s) were rejected", 1),
        ("missing file", f"no missingMOVIE.mp4/.mkv/.webm under {videos} (2 annotated keyframes in 2 chunks of "
                         f"{train_csv})", 2),
    ]
    kept = sum(len(r.extra["keyframes"]) for r in records)
    named = {(row.split(",")[0], row.split(",")[1]) for row in train_csv.read_text().splitlines()
             if row and row.split(",")[1].isdigit()} | {("movieBBBBBB", "1500")}
    assert kept + sum(r.keyframes for r in rejected) == len(named) == 9


def test_ava_proposals_and_excluded_timestamps(tmp_path):
    annotations, videos = ava_layout(tmp_path)
    (annotations / "ava_train_excluded_timestamps_v2.2.csv").write_text("movieAAAAAA,0961\nbroken row\n")
    (annotations / "props_train.csv").write_text(
        "movieAAAAAA,0902,0.11,0.2,0.5,0.9,0.97\n"      # 1: near person 0 (our 7-column layout)
        "movieAAAAAA,0902,0.6,0.1,0.9,0.8,,0.85\n"      # 2: SlowFast's 8 columns (empty label)
        "movieAAAAAA,0905,0.3,0.3,0.4,0.4,0.9\n"        # 3: a keyframe without groundtruth: listed, no boxes
        "movieAAAAAA,0961,0.1,0.2,0.5,0.9,0.9\n"        # 4: excluded keyframe: dropped
        "movieAAAAAA,0906,1.3,0.3,0.4,0.4,0.9\n"        # 5: box outside [0, 1]
        "otherMOVIE,0902,0.1,0.1,0.2,0.2,0.9\n"         # 6: a video without groundtruth in this split: unused
    )
    (annotations / "props_val.csv").write_text("")
    records, rejected = ava(str(annotations), str(videos), proposals="props_{split}.csv")
    first = records[0]
    assert [(k["t"], k["proposals"], len(k["boxes"])) for k in first.extra["keyframes"]] == [
        (902, [[0.11, 0.2, 0.5, 0.9, 0.97], [0.6, 0.1, 0.9, 0.8, 0.85]], 2), (905, [[0.3, 0.3, 0.4, 0.4, 0.9]], 0)]
    # the excluded keyframe's groundtruth row is rejected as such, and so its chunk (960..1020) has no record
    assert [r.start_s for r in records if r.split == "train"] == [898.5, 1738.5]
    reasons = {r.source: r.reason for r in rejected}
    csv_uri = str(annotations / "ava_train_v2.2.csv")
    assert reasons[f"{csv_uri}:4"] == "excluded timestamp"
    assert reasons[f"{annotations / 'ava_train_excluded_timestamps_v2.2.csv'}:2"] == "malformed row"
    assert reasons[f"{annotations / 'props_train.csv'}:5"] == "box outside [0, 1]"
    with pytest.raises(SourceError, match="must contain \\{split\\}"):
        ava(str(annotations), str(videos), proposals="props.csv")
    with pytest.raises(SourceError, match="person-proposals CSV .*nope_train.csv does not exist"):
        ava(str(annotations), str(videos), proposals="nope_{split}.csv")


def test_ava_one_record_per_movie_and_options_through_load_records(tmp_path):
    annotations, videos = ava_layout(tmp_path)
    records, _ = load_records(str(annotations), "auto", str(videos), chunk_s=900, context_s=0)
    assert [(Path(r.source).name, r.start_s, r.end_s, len(r.extra["keyframes"])) for r in records] == [
        ("movieAAAAAA.mkv", 900.0, 1800.0, 3), ("movieBBBBBB.mp4", 900.0, 1800.0, 1)]
    assert read_action_list(str(annotations))[79].startswith("talk to")
    with pytest.raises(SourceError, match=r"source_format 'csv' takes no option\(s\) \['chunk_s'\]"):
        load_records(str(tmp_path / "x.csv"), "csv", chunk_s=5)
    with pytest.raises(SourceError, match="chunk_s must be > 0"):
        ava(str(annotations), str(videos), chunk_s=0)
    (annotations / "ava_train_v2.2.csv").unlink()
    (annotations / "ava_val_v2.2.csv").unlink()
    with pytest.raises(SourceError, match="no AVA annotation CSV in .*annotations: expected ava_train_v2.2.csv"):
        ava(str(annotations), str(videos))


# --- image folders -----------------------------------------------------------------------------------


def test_image_folder_reads_imagenet_layout(tmp_path):
    touch(tmp_path, "train/n01440764/n01440764_10026.JPEG", b"jpg")
    touch(tmp_path, "train/n01443537/n01443537_1.jpeg")
    touch(tmp_path, "val/n01440764/ILSVRC2012_val_00000293.JPEG")
    touch(tmp_path, "val/ILSVRC2012_val_00000001.JPEG")  # raw flat val: no class folder
    touch(tmp_path, "train/n01440764/notes.txt")  # not an image: ignored
    records, rejected = image_folder(str(tmp_path))
    assert sorted((r.split, r.label, Path(r.source).name) for r in records) == [
        ("train", "n01440764", "n01440764_10026.JPEG"),
        ("train", "n01443537", "n01443537_1.jpeg"),
        ("val", "n01440764", "ILSVRC2012_val_00000293.JPEG"),
    ]
    assert all(r.media == "image" for r in records)
    assert [Path(r.source).name for r in rejected] == ["ILSVRC2012_val_00000001.JPEG"]
    assert rejected[0].reason == "not in a <label>/ folder (expected depth 3)"


# --- auto detection and dispatch ---------------------------------------------------------------------


def test_auto_detects_every_format(tmp_path):
    kinetics = kinetics_layout(tmp_path / "k")
    labels_dir, _ = ssv2_layout(tmp_path / "s")
    annotations, _ = ava_layout(tmp_path / "a")
    touch(tmp_path, "imgs/train/n1/a.JPEG")
    touch(tmp_path, "vids/cat/a.mp4")
    (tmp_path / "list.csv").write_text("path,label\nvids/cat/a.mp4,cat\n")
    assert detect_format(str(kinetics)) == "kinetics"
    assert detect_format(str(tmp_path / "list.csv")) == "csv"
    assert detect_format(str(labels_dir)) == "ssv2"
    assert detect_format(str(labels_dir / "something-something-v2-labels.json")) == "ssv2"
    assert detect_format(str(annotations)) == "ava"
    assert detect_format(str(annotations / "ava_train_v2.2.csv")) == "ava"
    assert detect_format(str(tmp_path / "imgs")) == "imagefolder"
    assert detect_format(str(tmp_path / "vids")) == "folder"
    records, _ = load_records(str(kinetics), root=str(tmp_path / "k" / "k400"))
    assert len(records) == 7
    records, _ = load_records(str(tmp_path / "imgs"))
    assert [r.media for r in records] == ["image"]


def test_bad_sources_fail_with_a_clear_error(tmp_path):
    with pytest.raises(SourceError) as info:
        load_records(str(tmp_path), "youtube8m")
    assert "unknown source_format 'youtube8m'" in str(info.value)
    assert all(name in str(info.value) for name in FORMATS)
    (tmp_path / "other.csv").write_text("file,class\n")
    with pytest.raises(SourceError, match="other.csv: cannot tell the CSV format from its header"):
        load_records(str(tmp_path / "other.csv"))
    with pytest.raises(SourceError, match="source .*missing does not exist"):
        load_records(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="cannot tell the format of .*notes.txt; set source_format"):
        load_records(str(tmp_path / "notes.txt"))
    with pytest.raises(SourceError, match="needs a folder"):
        load_records(str(tmp_path / "notes.txt"), "imagefolder")


# --- where the files lie ----------------------------------------------------------------------------


def flatten(tree: Path, into: Path) -> None:
    """The same videos downloaded in another layout: every file directly under `into`."""
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        touch(into, path.name, path.read_bytes())


def identities(records) -> dict:
    return {r.key: (r.label, r.labels, r.split, r.start_s, r.end_s) for r in records}


def test_annotation_sources_key_samples_by_their_ids_whatever_the_layout(tmp_path):
    csv_path = kinetics_layout(tmp_path / "k")
    flatten(tmp_path / "k" / "k400", tmp_path / "k_flat")
    ssv2_labels, ssv2_videos = ssv2_layout(tmp_path / "s")
    flatten(ssv2_videos, tmp_path / "s_nested" / "downloads" / "webm")
    ava_annotations, ava_videos = ava_layout(tmp_path / "a")
    flatten(ava_videos, tmp_path / "a_flat")
    pairs = {
        "kinetics": (kinetics_csv(str(csv_path), str(tmp_path / "k" / "k400")),
                     kinetics_csv(str(csv_path), str(tmp_path / "k_flat"))),
        "ssv2": (ssv2_json(str(ssv2_labels), str(ssv2_videos)),
                 ssv2_json(str(ssv2_labels), str(tmp_path / "s_nested"))),
        "ava": (ava(str(ava_annotations), str(ava_videos)), ava(str(ava_annotations), str(tmp_path / "a_flat"))),
    }
    for name, ((records, _), (moved, _)) in pairs.items():
        assert identities(records) == identities(moved), name
        assert {r.path for r in records} != {r.path for r in moved}, name  # the paths did change
    kinetics_keys = {r.key.rsplit("-", 1)[0] for r in pairs["kinetics"][0][0]}
    assert {"aaaaaaaaaaa_000010_000020", "dddddddddd-_000030_000040", "dddddddddd-_000050_000060"} <= kinetics_keys
    assert sorted(r.key.rsplit("-", 1)[0] for r in pairs["ssv2"][0][0]) == ["1", "10", "2"]
    assert [r.key.rsplit("-", 1)[0] for r in pairs["ava"][0][0]] == [
        "movieAAAAAA_900-960s", "movieAAAAAA_960-1020s", "movieAAAAAA_1740-1800s", "movieBBBBBB_1500-1560s"]


def test_every_adapter_names_the_file_by_its_path_under_the_root(tmp_path):
    csv_path = kinetics_layout(tmp_path / "k")
    ssv2_labels, ssv2_videos = ssv2_layout(tmp_path / "s")
    ava_annotations, ava_videos = ava_layout(tmp_path / "a")
    touch(tmp_path / "f", "cat/a b.mp4")
    (tmp_path / "f" / "labels.csv").write_text("path,label\ncat/a b.mp4,cat\n")
    touch(tmp_path / "i", "train/n01/x.JPEG")
    sources = [
        (kinetics_csv(str(csv_path), str(tmp_path / "k" / "k400")), tmp_path / "k" / "k400"),
        (ssv2_json(str(ssv2_labels), str(ssv2_videos)), ssv2_videos),
        (ava(str(ava_annotations), str(ava_videos)), ava_videos),
        (load_records(str(tmp_path / "f"), "folder"), tmp_path / "f"),
        (load_records(str(tmp_path / "f" / "labels.csv"), "csv"), tmp_path / "f"),
        (image_folder(str(tmp_path / "i")), tmp_path / "i"),
    ]
    for (records, _), root in sources:
        assert records and all(r.path == Path(r.source).relative_to(root).as_posix() for r in records), root


# --- s3:// -------------------------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch):
    from moto import mock_aws

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage._client.cache_clear()  # a client made for another endpoint must not be reused
    with mock_aws():
        storage.s3_client().create_bucket(Bucket="data")
        yield
    storage._client.cache_clear()


def upload(tree: Path, prefix: str) -> None:
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        storage.write_bytes(f"{prefix}/{path.relative_to(tree).as_posix()}", path.read_bytes())


def test_adapters_read_s3_sources(tmp_path, s3):
    kinetics_layout(tmp_path / "k")
    upload(tmp_path / "k", "s3://data/k")
    records, rejected = load_records("s3://data/k/kinetics_400.csv", "auto", "s3://data/k/k400")
    assert len(records) == 7 and len(rejected) == 6
    assert "s3://data/k/k400/raw/dddddddddd-.mp4" in {r.source for r in records}
    assert all(r.source.startswith("s3://data/k/k400/") for r in records)
    assert {r.size for r in records if r.source.endswith("aaaaaaaaaaa_000010_000020.mp4")} == {2}

    annotations, videos = ava_layout(tmp_path / "a")
    upload(tmp_path / "a", "s3://data/a")
    records, rejected = load_records("s3://data/a/annotations", "auto", "s3://data/a/videos")
    assert [r.source for r in records] == ["s3://data/a/videos/trainval/movieAAAAAA.mkv"] * 3 + [
        "s3://data/a/videos/trainval/movieBBBBBB.mp4"]
    local_records, _ = ava(str(annotations), str(videos))
    assert [r.extra for r in records] == [r.extra for r in local_records]

    ssv2_layout(tmp_path / "s")
    upload(tmp_path / "s", "s3://data/s")
    records, rejected = load_records("s3://data/s/labels", root="s3://data/s/20bn-something-something-v2")
    assert sorted(r.source.rsplit("/", 1)[1] for r in records) == ["1.webm", "10.webm", "2.webm"]
    assert len(rejected) == 4
