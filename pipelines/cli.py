"""`mvit`: one command, one subcommand per stage. Stages take `[CONFIG.yaml] [key=value ...]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from pipelines.config import ConfigError, load_config, print_effective

STAGE_HELP = (
    "Arguments: an optional YAML config file followed by key=value overrides "
    "(nested keys with dots, e.g. ray.address=auto). Unknown keys and wrong types are errors."
)


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    path = None
    overrides = []
    for item in items:
        if "=" not in item and path is None and item.endswith((".yaml", ".yml")):
            path = item
        elif "=" not in item:
            raise ConfigError(f"argument '{item}' is neither a .yaml config file nor a key=value override")
        else:
            overrides.append(item)
    return path, overrides


def _stage(sub, name: str, help_text: str, config_cls_path: str, runner: Callable):
    parser = sub.add_parser(name, help=help_text, description=f"{help_text}. {STAGE_HELP}")
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml|key=value")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")

    def run(ns) -> int:
        module_name, cls_name = config_cls_path.rsplit(":", 1)
        module = __import__(module_name, fromlist=[cls_name])
        cfg = load_config(getattr(module, cls_name), *split_config_args(ns.args), section=name)
        print_effective(name, cfg)
        if ns.print_config:
            return 0
        result = runner(cfg)
        print(json.dumps(result, sort_keys=True), flush=True)
        return 0

    parser.set_defaults(func=run)


def _preprocess(cfg) -> dict:
    from pipelines.preprocess.job import run

    manifest = run(cfg)
    return {
        "output": cfg.output,
        "num_samples": manifest.num_samples,
        "quarantined": manifest.quarantined,
        "shards": len(manifest.shards),
    }


def _train(cfg) -> dict:
    from pipelines.train.job import run

    return run(cfg).as_dict()


def _evaluate(cfg) -> dict:
    from pipelines.evaluate.job import run

    return run(cfg)


def _register(cfg) -> dict:
    from pipelines.register.job import run

    return run(cfg)


# What each stage command runs on its typed config; the result is the JSON line it prints. The workflow's
# in-process stages (pipelines/workflow/stages.py) run the same functions, so both give one result shape.
STAGE_RUNNERS: dict[str, Callable[[object], dict]] = {
    "preprocess": _preprocess, "train": _train, "evaluate": _evaluate, "register": _register,
}


def _demo_data(ns) -> int:
    from pipelines.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(
        classes=ns.classes, videos_per_class=ns.videos_per_class, frames=ns.frames, size=ns.size, seed=ns.seed
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


PLUGIN_COMMANDS = (
    "pipelines.commands.flops",
    "pipelines.commands.convert",
    "pipelines.commands.shards",
    "pipelines.commands.submit",
    "pipelines.commands.jobs",
    "pipelines.commands.workflow",
    "pipelines.commands.predict",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvit", description="MViT video training system")
    sub = parser.add_subparsers(dest="command", required=True)
    _stage(sub, "preprocess", "raw videos -> WebDataset shards + manifest", "pipelines.preprocess.job:PreprocessConfig", _preprocess)
    _stage(sub, "train", "distributed training with Ray Train, tracked in MLflow", "pipelines.train.config:TrainConfig", _train)
    _stage(sub, "evaluate", "multi-view top-1/top-5 of a checkpoint on a split", "pipelines.evaluate.job:EvaluateConfig", _evaluate)
    _stage(sub, "register", "log the model to MLflow, register it, move @champion if better", "pipelines.register.job:RegisterConfig", _register)

    data = sub.add_parser("demo-data", help="write a synthetic motion-classification video set (H.264 .mp4)")
    data.add_argument("out", type=Path)
    data.add_argument("--classes", type=int, default=8)
    data.add_argument("--videos-per-class", type=int, default=100)
    data.add_argument("--frames", type=int, default=16)
    data.add_argument("--size", type=int, default=64)
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

    # Subcommands that live in their own modules: each has add_parser(subparsers) setting `func`.
    for module in PLUGIN_COMMANDS:
        try:
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
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
