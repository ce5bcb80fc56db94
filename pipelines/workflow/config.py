"""The workflow's typed config: one YAML with a `workflow:` section and the stage sections.

```yaml
workflow:            # WorkflowSettings: where state lives, where the raw videos come from, where stages run
  state_dir: .state/workflow
  synthetic: {classes: 8, videos_per_class: 20}
preprocess: {...}    # PreprocessConfig  (same keys as `mvit preprocess`)
train: {...}         # TrainConfig
evaluate: {...}      # EvaluateConfig
register: {...}      # RegisterConfig
```

Overrides on the command line name the section first: `train.epochs=2`, `workflow.state_dir=/tmp/s`.
The keys that connect one stage to the next (a stage's input is the upstream asset's output) are set by
the workflow, never by the user: setting one is an error that says which workflow key to use instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import STAGE_SECTIONS, ConfigError, load_config, read_yaml_file
from pipelines.data import storage
from pipelines.data.synthetic import SyntheticSpec
from pipelines.data.synthetic_ava import SyntheticAvaSpec
from pipelines.evaluate.job import EvaluateConfig
from pipelines.preprocess.config import PreprocessConfig
from pipelines.register.job import RegisterConfig
from pipelines.stages import STAGES
from pipelines.train.config import TrainConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "workflow.yaml"

# Placeholder for keys whose value only exists once the upstream asset is materialized (checkpoint URI,
# MLflow run id): the asset fills them in before its stage runs.
FROM_UPSTREAM = "<set by the workflow from the upstream asset>"
SYNTHETIC_FORMATS = ("motion", "ava")


@dataclass
class WorkflowSettings:
    state_dir: str = ".state/workflow"  # Dagster home (<state_dir>/dagster) and default data locations
    dagster_home: str = ""  # "" = <state_dir>/dagster
    source: str = ""  # raw videos (folder or annotation file, local or s3://); "" = generate the synthetic set
    # the synthetic motion set generated when `source` is empty; smaller than the demo's by default
    synthetic: SyntheticSpec = field(default_factory=lambda: SyntheticSpec(videos_per_class=20, size=48))
    # which synthetic set: "motion" (classification, `synthetic`) or "ava" (action detection in the AVA layout,
    # `synthetic_ava`; preprocess it with source_format: ava, see configs/ava_synthetic.yaml)
    synthetic_format: str = "motion"
    synthetic_ava: SyntheticAvaSpec = field(default_factory=SyntheticAvaSpec)
    raw_dir: str = ""  # where the synthetic set is written (local or s3://); "" = <state_dir>/raw
    # preprocessed dataset prefix (preprocess.output); "" = <state_dir>/datasets/<hash of the raw set and the
    # preprocess config>, so a changed preprocess key writes a new dataset beside the old one
    dataset: str = ""
    storage_path: str = ""  # checkpoints (train.storage_path); "" = <state_dir>/runs
    ray_address: str = ""  # "" = every stage in this process (embedded Ray); http://HEAD:8265 = each as a Ray job
    working_dir: str = "."  # uploaded with each Ray job (cluster mode only)
    job_timeout_s: int = 0  # cluster mode: give up waiting for a job after this long (0 = wait as long as it runs)

    def resolved_dagster_home(self) -> Path:
        return Path(self.dagster_home or Path(self.state_dir) / "dagster").absolute()

    def _under_state(self, value: str, name: str) -> str:
        if value:
            return value
        return str(Path(self.state_dir).absolute() / name)

    def resolved_raw_dir(self) -> str:
        return self._under_state(self.raw_dir, "raw")

    def resolved_dataset(self, preprocess: PreprocessConfig) -> str:
        if self.dataset:
            return self.dataset
        identity = {"preprocess": stage_hash("preprocess", preprocess), "source": self.source_uri(),
                    "synthetic": None if self.source else dataclasses.asdict(self.synthetic)}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return self._under_state("", f"datasets/{digest}")

    def resolved_storage_path(self) -> str:
        return self._under_state(self.storage_path, "runs")

    def source_uri(self) -> str:
        """The annotation file or folder preprocess reads: the configured source, the synthetic CSV, or the
        synthetic AVA set's folder."""
        if self.source:
            return self.source
        if self.synthetic_format == "ava":
            return self.resolved_raw_dir()
        return storage.join(self.resolved_raw_dir(), "labels.csv")

    def validate(self) -> None:
        if self.synthetic_format not in SYNTHETIC_FORMATS:
            raise ValueError(f"config key 'workflow.synthetic_format' must be one of {SYNTHETIC_FORMATS}, "
                             f"got {self.synthetic_format!r}")


@dataclass
class WorkflowConfig:
    settings: WorkflowSettings
    preprocess: PreprocessConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    register: RegisterConfig


def _read_sections(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    data = read_yaml_file(path, "workflow config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(sorted(STAGE_SECTIONS))})")
    unknown = set(data) - STAGE_SECTIONS
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {sorted(unknown)}; a workflow config holds the sections "
            f"{sorted(STAGE_SECTIONS)} (stage keys go inside their stage's section)"
        )
    return data


def _split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    by_section: dict[str, list[str]] = {name: [] for name in STAGE_SECTIONS}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, rest = key.partition(".")
        if not sep or not dot or not rest:
            raise ConfigError(f"override '{item}' must look like <section>.<key>=<value>, e.g. train.epochs=2")
        if section not in STAGE_SECTIONS:
            raise ConfigError(f"override '{item}': unknown section '{section}'; use one of {sorted(STAGE_SECTIONS)}")
        by_section[section].append(f"{rest}={value}")
    return by_section


def _refuse_wired(stage: str, section: dict, overrides: list[str], origin: str) -> None:
    for key, instead in STAGES[stage].wired.items():
        given = key in (section or {}) or any(o.split("=", 1)[0] == key for o in overrides)
        if given:
            hint = f"set {instead} instead" if instead else "it is the output of the upstream asset"
            raise ConfigError(f"{origin}: {stage}.{key} is set by the workflow ({hint}); remove it")


def load_workflow_config(path: str | Path | None = None, overrides: list[str] | None = None) -> WorkflowConfig:
    """Every section of one YAML plus `<section>.<key>=value` overrides -> a WorkflowConfig."""
    path = Path(path) if path is not None else None
    sections = _read_sections(path)
    by_section = _split_overrides(list(overrides or []))
    origin = str(path) if path else "overrides"
    # An empty section object keeps load_config on the section path even for a file with no sections.
    settings = load_config(WorkflowSettings, path, by_section["workflow"], section="workflow")
    stages = {}
    for stage in STAGES.values():
        _refuse_wired(stage.name, sections.get(stage.name) or {}, by_section[stage.name], origin)
    # preprocess first: where the dataset goes depends on its config (WorkflowSettings.resolved_dataset)
    preprocess = load_config(PreprocessConfig, path, [*by_section["preprocess"],
                             f"source={json.dumps(settings.source_uri())}", f"output={json.dumps('-')}"],
                             section="preprocess")
    dataset = settings.resolved_dataset(preprocess)
    wired = {
        "preprocess": {"source": settings.source_uri(), "output": dataset},
        "train": {"dataset": dataset, "storage_path": settings.resolved_storage_path()},
        "evaluate": {"dataset": dataset, "checkpoint": FROM_UPSTREAM, "mlflow_run_id": FROM_UPSTREAM},
        "register": {"dataset": dataset, "checkpoint": FROM_UPSTREAM, "mlflow_run_id": FROM_UPSTREAM},
    }
    for stage in STAGES.values():
        fill = [f"{key}={json.dumps(value)}" for key, value in wired[stage.name].items()]
        stages[stage.name] = load_config(stage.config, path, [*by_section[stage.name], *fill], section=stage.name)
    return WorkflowConfig(settings=settings, **stages)


# What decides "unchanged" for a stage is the hash of its config without the keys the workflow wires in
# (those are covered by the upstream asset's data version) and without the keys that change how it runs,
# not what it produces (the stage table's `not_affecting_output`). STAGE_LOGIC_VERSION is bumped by
# hand when a stage's code changes what it produces, so that existing outputs are recomputed.
STAGE_LOGIC_VERSION = {"raw_videos": 1, "preprocess": 1, "train": 1, "evaluate": 1, "register": 1}


def stage_hash(stage: str, cfg: Any) -> str:
    data = dataclasses.asdict(cfg)
    for key in (*STAGES[stage].wired, *STAGES[stage].not_affecting_output):
        data.pop(key, None)
    payload = json.dumps({"stage": stage, "logic": STAGE_LOGIC_VERSION[stage], "config": data}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def source_hash(settings: WorkflowSettings) -> str:
    """Config hash of the synthetic-set generator (where it writes and what it draws)."""
    spec = settings.synthetic_ava if settings.synthetic_format == "ava" else settings.synthetic
    payload = json.dumps({"logic": STAGE_LOGIC_VERSION["raw_videos"], "raw_dir": settings.resolved_raw_dir(),
                          "spec": dataclasses.asdict(spec),
                          **({"format": "ava"} if settings.synthetic_format == "ava" else {})}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
