"""Settings loading shared by both planes.

Sources, later wins: defaults < YAML file < environment
(``SPENDGATE_<SECTION>_<KEY>``, then ``SPENDGATE_<KEY>``) < command-line
overrides. Read once at start-up into a frozen dataclass and passed down; a
bad value fails start-up naming its key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def load(
    cls: type[T],
    *,
    section: str,
    env: Mapping[str, str] | None = None,
    file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` (a dataclass) from the sources above.

    In the YAML file, settings may sit at the top level or under ``section``
    (e.g. ``control_plane:``), so one file can configure every process.
    """
    env = os.environ if env is None else env
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    raw: dict[str, Any] = {}
    if file:
        try:
            loaded = yaml.safe_load(Path(file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {file}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file}: must be a mapping of settings")
        section_values = loaded.get(section)
        if section_values is None:  # absent, or an empty ``section:``
            section_values = {}
        if not isinstance(section_values, dict):
            raise ConfigError(f"config file {file}: {section} must be a mapping")
        # A top-level mapping is another process's section (ext_proc has a
        # ``control_plane`` setting *and* the file a ``control_plane:`` section).
        # An empty YAML value (``key:``) means "not set", not the text "None".
        raw.update(
            {k: v for k, v in loaded.items() if k in names and not isinstance(v, dict | None)}
        )
        unknown = set(section_values) - set(names)
        if unknown:
            raise ConfigError(f"unknown setting(s) in {section}: {', '.join(sorted(unknown))}")
        raw.update({k: v for k, v in section_values.items() if v is not None})
    for name in names:
        # SPENDGATE_EXT_PROC_LISTEN beats SPENDGATE_LISTEN, so one environment
        # can configure both planes.
        value = env.get(f"SPENDGATE_{section.upper()}_{name.upper()}")
        if value is None:
            value = env.get(f"SPENDGATE_{name.upper()}")
        if value is not None:
            raw[name] = value
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(raw) - set(names)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        values[name] = _coerce(name, names[name].default, value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def _coerce(name: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, not {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{name} must be an integer, not {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, not {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, not {value!r}") from None
    if isinstance(value, dict | list):
        raise ConfigError(f"{name} must be a string, not {value!r}")
    return str(value)
