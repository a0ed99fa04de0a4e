"""Fixtures of the store tests (each runs on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from control_plane.hub import StateHub
from control_plane.service import ControlPlane
from control_plane.store.db import create_db_engine, migrate
from tests.harness import FakeClock
from tests.store.builders import T0


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated database of the kind ``db_url`` names."""
    e = create_db_engine(db_url)
    migrate(e)
    yield e
    e.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def cp(engine: Engine, clock: FakeClock) -> Iterator[ControlPlane]:
    c = ControlPlane(engine, StateHub(), clock=clock)
    yield c
    c.close()
