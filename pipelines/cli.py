"""`mvit`: one command, one subcommand per stage. Stages take `[CONFIG.yaml] [key=value ...]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipelines.commands import convert, evaluate_ava, flops, jobs, predict, shards, submit, workflow
from pipelines.config import ConfigError, effective_yaml, load_config, print_effective, split_config_args
from pipelines.stages import STAGES, Stage

STAGE_HELP = (
    "Arguments: an optional YAML config file followed by key=value overrides "
    "(nested keys with dots, e.g. ray.address=auto). Unknown keys and wrong types are errors."
)


def _stage(sub, stage: Stage) -> None:
    parser = sub.add_parser(stage.name, help=stage.help, description=f"{stage.help}. {STAGE_HELP}")
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml|key=value")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")

    def run(ns) -> int:
        path, overrides = split_config_args(ns.args)
        if ns.print_config:  # also without the required keys: a recipe can be read and diffed on its own
            text = effective_yaml(stage.config, path, overrides, section=stage.name)
            print(f"# effective {stage.name} config\n{text}", end="", flush=True)
            return 0
        cfg = load_config(stage.config, path, overrides, section=stage.name)
        print_effective(stage.name, cfg)
        result = stage.run(cfg)
        print(json.dumps(result.to_dict(), sort_keys=True), flush=True)
        return 0

    parser.set_defaults(func=run)


def _demo_data(ns) -> int:
    if ns.format == "ava":
        from pipelines.data.synthetic_ava import SyntheticAvaSpec
        from pipelines.data.synthetic_ava import generate as generate_ava

        ava = generate_ava(ns.out, SyntheticAvaSpec(train_videos=ns.train_videos, val_videos=ns.val_videos,
                                                     duration_s=ns.duration_s, fps=ns.fps or 10, width=ns.width,
                                                     height=ns.height, seed=ns.seed))
        print(json.dumps({"out": str(ns.out), "format": "ava", "videos": len(ava.videos),
                          "window_s": list(ava.window_s), "proposals": "person_proposals_{split}.csv"}))
        return 0
    from pipelines.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(
        classes=ns.classes, videos_per_class=ns.videos_per_class, frames=ns.frames, size=ns.size, seed=ns.seed,
        **({"fps": ns.fps} if ns.fps else {}),
    )
    csv_path = generate(ns.out, spec)
    print(json.dumps({"out": str(ns.out), "csv": str(csv_path), "videos": spec.classes * spec.videos_per_class}))
    return 0


def _stack(ns) -> int:
    from pipelines import stack

    state = Path(ns.state_dir)
    if ns.action == "up":
        info = stack.up(state, artifacts=ns.artifacts)
        print(stack.export_lines(info))
    elif ns.action == "down":
        stopped = stack.down(state)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    else:
        info = stack.status(state)
        if info is None:
            print(f"no stack running under {state}")
            return 1
        print(stack.export_lines(info))
    return 0


def _demo(ns) -> int:
    from pipelines.demo import run_demo

    result = run_demo(Path(ns.workdir), fast=ns.fast)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


# Subcommands that live in their own modules: each has add_parser(subparsers) setting `func`.
COMMAND_MODULES = (flops, convert, shards, submit, jobs, workflow, predict, evaluate_ava)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvit", description="MViT video training system")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES.values():
        _stage(sub, stage)

    data = sub.add_parser("demo-data", help="write a synthetic video set: motion classification (H.264 .mp4 + "
                          "labels.csv), or --format ava: action detection in the AVA v2.2 layout",
                          description="--format motion (default): classes of motion direction; --format ava: "
                          "moving rectangles (persons) whose multi-label actions follow their motion, with the AVA "
                          "CSVs, action list, excluded timestamps and person proposals (pipelines/data/synthetic_ava.py); "
                          "preprocess it with source_format=ava ava.window_s=[0,DURATION] "
                          "'ava.proposals=person_proposals_{split}.csv' (configs/ava_synthetic.yaml)")
    data.add_argument("out", type=Path)
    data.add_argument("--format", choices=["motion", "ava"], default="motion")
    data.add_argument("--classes", type=int, default=8, help="motion")
    data.add_argument("--videos-per-class", type=int, default=100, help="motion")
    data.add_argument("--frames", type=int, default=16, help="motion")
    data.add_argument("--size", type=int, default=64, help="motion")
    data.add_argument("--train-videos", type=int, default=24, help="ava")
    data.add_argument("--val-videos", type=int, default=8, help="ava")
    data.add_argument("--duration-s", type=int, default=6, help="ava: seconds per video (keyframes at 1..duration-1)")
    data.add_argument("--width", type=int, default=128, help="ava")
    data.add_argument("--height", type=int, default=96, help="ava")
    data.add_argument("--fps", type=int, default=0, help="frames per second (default: motion 15, ava 10)")
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=_demo_data)

    stack_p = sub.add_parser("stack", help="local S3 (moto) + MLflow servers on 127.0.0.1 for dev and tests")
    stack_p.add_argument("action", choices=["up", "down", "status"])
    stack_p.add_argument("--state-dir", default=os.environ.get("MVIT_STACK_DIR", ".state/stack"))
    stack_p.add_argument("--artifacts", choices=["s3", "local"], default="s3", help="where MLflow stores artifacts")
    stack_p.set_defaults(func=_stack)

    demo = sub.add_parser("demo", help="the whole workflow on a synthetic set, locally; ends with one JSON line")
    demo.add_argument("--workdir", default="demo-out")
    demo.add_argument("--fast", action="store_true", help="a smaller set and fewer epochs (smoke test)")
    demo.set_defaults(func=_demo)

    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except ConfigError as exc:
        print(f"mvit {ns.command}: config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"mvit {ns.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
