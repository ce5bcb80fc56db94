"""Typed stage configs: a YAML file plus `key=value` overrides -> a frozen-in-spirit dataclass.

OmegaConf's structured configs do the merging and the type checks; this module only turns their
errors into messages that name the offending key and the file it came from, and offers the helpers
every stage uses to print and log the effective config.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

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
    where = f"{origin}: " if origin else ""
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parent = getattr(exc, "object_type", None) or cls
        if not dataclasses.is_dataclass(parent):
            return ConfigError(f"{where}unknown config key '{key}' (see --help)")
        names = [f.name for f in dataclasses.fields(parent)]
        close = difflib.get_close_matches(str(key).rsplit(".", 1)[-1], names, n=1)
        hint = f" Did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in str(key) else ''}{close[0]}'?" if close else ""
        return ConfigError(f"{where}unknown config key '{key}'.{hint} Valid keys here: {', '.join(names)}")
    if isinstance(exc, MissingMandatoryValue):
        return ConfigError(f"{where}config key '{key}' is required; set it in the YAML or pass {key}=...")
    if isinstance(exc, ValidationError):
        first_line = str(exc).splitlines()[0]
        return ConfigError(f"{where}config key '{key}' has the wrong type: {first_line}")
    return ConfigError(f"{where}invalid config at '{key}': {str(exc).splitlines()[0]}")


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
    merged = _merged(cls, path, overrides, section)
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, cls, "override" if overrides else (str(path) if path is not None else "")) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj  # type: ignore[return-value]


def effective_yaml(
    cls: type, path: str | Path | None = None, overrides: list[str] | None = None, *, section: str | None = None
) -> str:
    """The effective config as printed (`--print-config`), also when required keys are not set yet (they
    print as ???, listed in a comment), so a recipe can be read and diffed without a dataset. Types and
    unknown keys are checked as by `load_config`; value checks (`validate`) run once nothing is missing."""
    merged = _merged(cls, path, overrides, section)
    data = OmegaConf.to_container(merged, throw_on_missing=False)  # a missing value reads as "???"
    missing = [key for key, value in _leaves(data) if value == "???"]
    if not missing:
        return to_yaml(load_config(cls, path, overrides, section=section))
    note = f"# required, not set: {', '.join(missing)}\n"
    return note + yaml.safe_dump(redact(data), sort_keys=False)


def _leaves(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested dict."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        out += _leaves(value, f"{name}.") if isinstance(value, dict) else [(name, value)]
    return out


def _merged(cls: type, path: str | Path | None, overrides: list[str] | None, section: str | None):
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
        return OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        raise _explain(exc, cls, "override" if overrides else (str(path) if path is not None else "")) from None


def from_dict(cls: type[T], data: dict[str, Any], origin: str = "stored config") -> T:
    """Rebuild a typed config from a plain dict (e.g. one saved in a checkpoint), with the same checks."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, cls, origin) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Query parameters whose values are credentials (tokens, presigned-URL signatures, passwords).
_SECRET_QUERY_KEY = re.compile(r"token|passw|secret|signature|credential|key", re.IGNORECASE)
REDACTED = "***"


def split_credentials(uri: str) -> tuple[str, str, str]:
    """(the URI without `user:password@`, user, password); user and password are "" when it has none.
    Percent-escapes in them are decoded (a password may hold ':' or '@')."""
    if "://" not in uri or "@" not in uri:
        return uri, "", ""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, "", ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=host)), unquote(parts.username or ""), unquote(parts.password or "")


def redact(value: Any) -> Any:
    """Credentials in URIs replaced by *** (a password, e.g. mlflow.tracking_uri=http://user:secret@host, and
    query values named like token/signature/secret/key), recursively through dicts, lists and tuples:
    what is printed, logged or stored (configs, stage results, checkpoints) goes through here."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:  # not a URI after all (e.g. a bad port): nothing of it is a credential we can name
        return value
    changed = False
    if password:
        host = parts.netloc.rsplit("@", 1)[1]
        parts, changed = parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}"), True
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(_SECRET_QUERY_KEY.search(k) for k, _ in pairs):
        hidden = [(k, REDACTED if _SECRET_QUERY_KEY.search(k) else v) for k, v in pairs]
        parts, changed = parts._replace(query=urlencode(hidden, safe="*")), True
    return urlunsplit(parts) if changed else value


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
    """Base of a stage's typed result (a dataclass): the JSON line its command prints, and back.

    A result is printed, written next to checkpoints and kept as Dagster metadata, so it never holds a
    credential: `to_dict` redacts, and results refer to a server by its URI without `user:password@`
    (the credentials are found again where the result is used: see pipelines/tracking.py `connect`)."""

    def to_dict(self) -> dict[str, Any]:
        return redact(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Rebuild from a result line; keys this version does not know are ignored; missing ones fail,
        except fields with a default (added after results of that shape were recorded)."""
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        required = [f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"{cls.__name__}: the result lacks {missing}")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})


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
