"""What the deployment tests share: where things are, what `spendgate up`
runs, how a deployment's command line and environment become settings, and
Envoy's own validation of a config."""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from spendgate import envoy_config
from spendgate.settings import env_keys
from tests.harness import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
EVERY_INTERFACE = ("0.0.0.0", "", "::", "[::]")
# Modules whose settings live in <module>.config (spendgate.settings sections).
SECTIONS = {"control_plane": "control_plane", "ext_proc": "ext_proc"}


class _Started(Exception):
    """Raised by the fake Envoy child: everything before it has been started."""


def spendgate_up_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Run ``spendgate up --demo [extra]`` with fake child processes and return
    the argv of each child by its name ("control-plane", "ext_proc", ...)."""
    from spendgate.cli import up

    started: dict[str, list[str]] = {}

    class FakeChild:
        def __init__(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
            started[name] = list(argv)
            if name == "envoy":
                raise _Started

        def alive(self) -> bool:
            return True

        def stop(self) -> None:
            pass

    monkeypatch.setattr(up, "Child", FakeChild)
    monkeypatch.setattr(up, "_wait", lambda *args, **kwargs: None)
    monkeypatch.setattr(up.signal, "signal", lambda *args: None)
    # Nothing is bound here: whatever else holds the default ports on this
    # machine (another stack, a test) must not change the commands.
    monkeypatch.setattr(up.ports, "in_use", lambda *args, **kwargs: False)
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    with pytest.raises(_Started):
        up.run_up(parser.parse_args(["--demo", "--state-dir", str(tmp_path), *extra]))
    return started


def spendgate_up_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The Python module of each child `spendgate up --demo` starts with
    ``python -m``: {"control-plane": "control_plane", "ext_proc": ..., ...}."""
    commands = spendgate_up_commands(tmp_path, monkeypatch)
    return {name: module_of(argv) for name, argv in commands.items() if "-m" in argv}


def module_of(argv: list[str]) -> str:
    """``python -m MODULE ...`` -> MODULE."""
    assert "-m" in argv, argv
    return argv[argv.index("-m") + 1]


def flags_of(argv: list[str]) -> dict[str, str]:
    """The ``--flag value`` pairs after the module (every spendgate flag takes a value)."""
    rest = argv[argv.index("-m") + 2 :]
    assert len(rest) % 2 == 0 and all(a.startswith("--") for a in rest[::2]), rest
    return dict(zip(rest[::2], rest[1::2], strict=True))


def accepted_flags(module: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The --help text of ``python -m module``."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"no module {module}"
    is_package = spec.submodule_search_locations is not None
    mod = importlib.import_module(f"{module}.__main__" if is_package else module)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        mod.main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def config_module(module: str) -> Any:
    """control_plane.config for control_plane and control_plane.migrate, etc."""
    return importlib.import_module(f"{module.split('.')[0]}.config")


def section_of(module: str) -> str:
    return SECTIONS[module.split(".")[0]]


def unknown_env_names(module: str, env: Mapping[str, str]) -> list[str]:
    """The SPENDGATE_* names in ``env`` that set no setting of ``module``."""
    cfg = config_module(module)
    known = {key for f in fields(cfg.Settings) for key in env_keys(section_of(module), f.name)}
    return sorted(k for k in env if k.startswith("SPENDGATE_") and k not in known)


def effective_settings(module: str, argv: list[str], env: Mapping[str, str]) -> Any:
    """The settings a process started as ``argv`` with ``env`` would run with
    (flags are the settings of the same name, e.g. --database-url; --config
    is the settings file)."""
    cfg = config_module(module)
    names = {f.name for f in fields(cfg.Settings)}
    overrides = {}
    flags = flags_of(argv)
    file = flags.pop("--config", None)
    for flag, value in flags.items():
        name = flag.removeprefix("--").replace("-", "_")
        assert name in names, f"{flag} of {module} is not a setting"
        overrides[name] = value
    return cfg.load_settings(env=env, file=file, **overrides)


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def dockerfile_env() -> dict[str, str]:
    """ENV KEY=VALUE lines of the Dockerfile (every container of the image has them)."""
    env = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            for pair in line.removeprefix("ENV ").split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def local_ext_proc_filter(name: str = "envoy.filters.http.ext_proc") -> dict[str, Any]:
    """An ext_proc filter's typed_config in envoy/envoy.yaml: the admission
    filter, or (spendgate.metering) the metering one."""
    listener = envoy_config.load()["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (f,) = [f for f in hcm["http_filters"] if f["name"] == name]
    return copy.deepcopy(f["typed_config"])


def local_buffer_limit() -> int:
    listener = envoy_config.load()["static_resources"]["listeners"][0]
    return int(listener["per_connection_buffer_limit_bytes"])


def envoy_validate(path: Path) -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"configuration '{path}' OK" in output


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
