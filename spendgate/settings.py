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
        for key in env_keys(section, name):
            value = env.get(key)
            if value is not None:
                raw[name] = value
                break
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


def env_keys(section: str, name: str) -> tuple[str, str]:
    """The environment variables that set ``name``, the one that wins first.

    SPENDGATE_EXT_PROC_LISTEN beats SPENDGATE_LISTEN, so one environment can
    configure both planes.
    """
    return f"SPENDGATE_{section.upper()}_{name.upper()}", f"SPENDGATE_{name.upper()}"


def parse_host_port(value: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:9464"``) -> (host, port); an empty
    host (``":9464"``) means every interface. ValueError says what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError(f"must be host:port, not {value!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"bad IPv6 address in {value!r} (write it as [::1]:9464)")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:9464, not {value!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, not {port_text!r}")
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    """The inverse of parse_host_port: IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_listen(name: str, value: str, *, allow_empty: bool = False) -> None:
    """ConfigError naming ``name`` unless ``value`` is host:port (or "" when allowed)."""
    if allow_empty and value == "":
        return
    try:
        parse_host_port(value)
    except ValueError as e:
        hint = ' (or "" to disable)' if allow_empty else ""
        raise ConfigError(f"{name}: {e}{hint}") from None


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
