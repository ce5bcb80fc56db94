"""`mvit evaluate-ava --groundtruth GT.csv --detections DET.csv --labelmap LABELS.pbtxt [--exclusions EXCL.csv]`:
AVA frame-mAP@0.5 by the official ActivityNet evaluator's rules (pipelines/detection/ava_eval.py).

stdout: one line per label-map class, `<id> <name>: <AP>` (`nan` for a class without groundtruth, which
the mean leaves out), then as the last line the frame-mAP@0.5 as a bare number. Numbers are printed in
full (Python's shortest round-trip form) so that they can be compared exactly. A short summary of what
was read goes to stderr. Exit status 2 with `error: ...` on stderr for unusable input.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

HELP = "AVA frame-mAP@0.5 of a detections CSV, equal to the official ActivityNet evaluator's"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate-ava",
        help=HELP,
        description=HELP + ". Files are local paths or s3:// URIs; CSVs have no header row.",
    )
    p.add_argument("--groundtruth", required=True, metavar="GT.csv",
                   help="video_id,timestamp,x1,y1,x2,y2,action_id[,person_id] (e.g. ava_val_v2.2.csv)")
    p.add_argument("--detections", required=True, metavar="DET.csv",
                   help="video_id,timestamp,x1,y1,x2,y2,action_id,score")
    p.add_argument("--labelmap", required=True, metavar="LABELS.pbtxt",
                   help="the classes to evaluate (e.g. ava_action_list_v2.2_for_activitynet_2019.pbtxt)")
    p.add_argument("--exclusions", default=None, metavar="EXCLUDED.csv",
                   help="video_id,timestamp frames to leave out (e.g. ava_val_excluded_timestamps_v2.2.csv)")
    p.add_argument("--capacity", type=int, default=None, metavar="N",
                   help="detections kept per frame, highest scores first (default: 50, the official script's; "
                        "0: no cap)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.detection import ava_eval

    capacity = ava_eval.OFFICIAL_CAPACITY if args.capacity is None else args.capacity
    try:
        categories, class_ids = ava_eval.read_labelmap(args.labelmap)
        groundtruth = ava_eval.read_groundtruth(args.groundtruth, class_ids)
        detections = ava_eval.read_detections(args.detections, class_ids, capacity)
        exclusions = ava_eval.read_exclusions(args.exclusions)
        result = ava_eval.evaluate(groundtruth, detections, categories, exclusions)
    except ValueError as exc:  # AvaFormatError: names the file, line and field
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if math.isnan(result.mean_ap):
        print(f"error: no groundtruth box of the label map's classes is left in {args.groundtruth} "
              f"(after exclusions); check that {args.labelmap} lists the groundtruth's action ids", file=sys.stderr)
        return 2
    print(f"groundtruth: {sum(c.groundtruth for c in result.classes)} boxes on {len(groundtruth)} frames; "
          f"detections: {sum(c.detections for c in result.classes)} ranked on {len(detections)} frames; "
          f"{len(exclusions)} excluded frames; capacity {capacity or 'none'}", file=sys.stderr)
    for c in result.classes:
        print(f"{c.id} {c.name}: {c.average_precision!r}")
    print(repr(result.mean_ap))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mvit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate-ava", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
