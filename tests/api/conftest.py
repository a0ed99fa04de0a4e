"""The ``api`` fixture: a control plane server on SQLite (tests/api/apiserver.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.apiserver import Api, running_api


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    db = tmp_path / "spendgate.db"
    with running_api(f"sqlite:///{db}", db) as a:
        yield a
