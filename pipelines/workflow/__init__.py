"""Dagster definitions over the stages (see assets.py); `dagster dev -m pipelines.workflow` shows them.

The definitions are built from a workflow YAML ($MVIT_WORKFLOW_CONFIG, else configs/workflow.yaml) and the
`section.key=value` overrides in $MVIT_WORKFLOW_OVERRIDES (space separated, shell quoting). Use the same
DAGSTER_HOME, config and overrides as `mvit workflow run` (it prints the command) to see its runs and lineage.
"""

from __future__ import annotations

import os
import shlex

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    from pipelines.workflow.assets import build_definitions
    from pipelines.workflow.config import DEFAULT_CONFIG, load_workflow_config

    path = os.environ.get("MVIT_WORKFLOW_CONFIG") or DEFAULT_CONFIG
    overrides = shlex.split(os.environ.get("MVIT_WORKFLOW_OVERRIDES", ""))
    return build_definitions(load_workflow_config(path, overrides))
