"""The ``ext`` fixture: a fresh ext_proc server per test (tests/extproc/protocol.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.extproc.protocol import Ext, running


@pytest.fixture
async def ext() -> AsyncIterator[Ext]:
    async with running() as e:
        yield e
