"""`mvit workflow run|status CONFIG [section.key=value ...]`: the Dagster workflow from the command line.

`run` materializes what is not up to date (pipelines/workflow/runner.py says what "up to date" means)
in-process against a persistent Dagster instance (DAGSTER_HOME = workflow.dagster_home, default
<workflow.state_dir>/dagster) and ends with one JSON line. `status` prints, per asset, whether the same
`run` would materialize it and why (with the same overrides, --only and --force).
"""

from __future__ import annotations

import argparse
import json
import sys


def _load(ns):
    from pipelines.config import split_config_args
    from pipelines.workflow.config import load_workflow_config

    path, overrides = split_config_args(ns.args)
    return path, overrides, load_workflow_config(path, overrides)


def run(ns: argparse.Namespace) -> int:
    from pipelines.config import print_effective
    from pipelines.workflow import runner

    path, overrides, cfg = _load(ns)
    print_effective("workflow", cfg.settings)
    if ns.print_config:
        for stage in ("preprocess", "train", "evaluate", "register"):
            print_effective(stage, getattr(cfg, stage))
        return 0
    if ns.action == "status":
        if cfg.settings.source:
            print(f"{'raw_videos':<17} observable source ({cfg.settings.source})")
        for key, why in runner.predict_run(cfg, only=ns.only, force=ns.force).items():
            print(f"{key:<17} {'WILL RUN' if why else 'up to date':<10} {why or ''}".rstrip())
        print(f"# UI: {runner.dagster_dev_hint(cfg.settings, path, overrides)}")
        return 0
    try:
        summary = runner.run_workflow(cfg, only=ns.only, force=ns.force, config_path=path)
    except runner.WorkflowError as exc:
        print(f"mvit workflow: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"# lineage and runs: {runner.dagster_dev_hint(cfg.settings, path, overrides)}", flush=True)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "workflow",
        help="Dagster workflow: raw videos -> dataset -> checkpoint -> evaluation -> registered model",
        description="`run` materializes the assets that are missing or stale (config hash of the stage or an "
        "input's data version changed, or the recorded output is gone), each in its own Dagster run against the "
        "persistent instance under workflow.state_dir; `status` shows what would run. The config is one YAML "
        "with sections workflow/preprocess/train/evaluate/register; overrides are section.key=value.",
    )
    p.add_argument("action", choices=["run", "status"])
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml|section.key=value")
    p.add_argument("--only", action="append", default=None, metavar="STAGE",
                   help="only this asset or stage (repeatable): raw_videos, preprocess|dataset, train|checkpoint, "
                   "evaluate|evaluation, register|registered_model; its inputs must have been materialized")
    p.add_argument("--force", action="store_true", help="materialize the selected assets even if up to date")
    p.add_argument("--print-config", action="store_true", help="print the effective configs and exit")
    p.set_defaults(func=run)
    return p
