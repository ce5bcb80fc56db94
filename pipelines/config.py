"""Typed stage configs: a YAML file plus `key=value` overrides -> a frozen-in-spirit dataclass.

OmegaConf's structured configs do the merging and the type checks; this module only turns their
errors into messages that name the offending key and the file it came from, and offers the helpers
every stage uses to print and log the effective config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

T = TypeVar("T")

STAGE_SECTIONS = frozenset({"preprocess", "train", "evaluate", "register", "workflow"})


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what to do."""


def _valid_keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _explain(exc: OmegaConfBaseException, cls: type, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parent = getattr(exc, "object_type", None) or cls
        valid = _valid_keys(parent) if dataclasses.is_dataclass(parent) else "see --help"
        return ConfigError(f"{origin}: unknown config key '{key}'. Valid keys here: {valid}")
    if isinstance(exc, MissingMandatoryValue):
        return ConfigError(f"{origin}: config key '{key}' is required; set it in the YAML or pass {key}=...")
    if isinstance(exc, ValidationError):
        first_line = str(exc).splitlines()[0]
        return ConfigError(f"{origin}: config key '{key}' has the wrong type: {first_line}")
    return ConfigError(f"{origin}: invalid config at '{key}': {str(exc).splitlines()[0]}")


def read_yaml_file(path: Path, what: str = "config file") -> Any:
    """The parsed YAML at `path` ({} when empty); a missing file or bad YAML is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, *, section: str | None = None
) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then `key=value` overrides.
    One file can hold every stage's config under stage-named sections (STAGE_SECTIONS): when it does,
    only the `section` mapping is read (a stage without a section gets its defaults)."""
    merged = OmegaConf.structured(cls)
    if path is not None:
        path = Path(path)
        data = read_yaml_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
        if section is not None and set(data) & STAGE_SECTIONS:
            data = data.get(section) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping of config keys")
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as exc:
            raise _explain(exc, cls, f"{path}" + (f" [{section}]" if section else "")) from None
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, cls, "override" if overrides else str(path)) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj  # type: ignore[return-value]


def from_dict(cls: type[T], data: dict[str, Any], origin: str = "stored config") -> T:
    """Rebuild a typed config from a plain dict (e.g. one saved in a checkpoint), with the same checks."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, cls, origin) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def redact(value: Any) -> Any:
    """A URI's password replaced by *** (e.g. mlflow.tracking_uri=postgresql://user:secret@db/mlflow),
    recursively through dicts and lists: what is printed or logged never carries one."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str) and "://" in value and "@" in value:
        parts = urlsplit(value)
        if parts.password:
            host = parts.netloc.rsplit("@", 1)[1]
            return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return value


def to_yaml(cfg: Any) -> str:
    """The config as printed and logged (passwords in URIs redacted)."""
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> string values, the shape MLflow params want (passwords in URIs redacted)."""
    data = redact(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg)
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def print_effective(stage: str, cfg: Any) -> None:
    print(f"# effective {stage} config", flush=True)
    print(to_yaml(cfg), end="", flush=True)


class StageResult:
    """Base of a stage's typed result (a dataclass): the JSON line its command prints, and back."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Rebuild from a result line; keys this version does not know are ignored, missing ones fail
        (unless the field has a default: a result recorded before the field existed)."""
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        names = [f.name for f in fields if f.name in data or f.default is dataclasses.MISSING]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{cls.__name__}: the result lacks {missing}")
        return cls(**{n: data[n] for n in names})


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """Command-line arguments -> (the YAML config file or None, the key=value overrides)."""
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
