"""Fixtures of the fault-injection tests: two Envoy + ext_proc pairs on two
control plane replicas (tests/faults/topology.py), on the shared PostgreSQL
server or on a private cluster a test may stop and start."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.faults.pgcluster import PrivateCluster, unavailable_reason
from tests.faults.topology import TwoPairs, remove_workdir, start_two_pairs

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.failed:  # type: ignore[attr-defined]
        item.stash[_FAILED] = True
    return report


def keep_or_remove(request: pytest.FixtureRequest, pairs: TwoPairs) -> None:
    """Logs of every process stay on disk when the test failed."""
    if request.node.stash.get(_FAILED, False) or os.environ.get("SPENDGATE_TEST_KEEP_LOGS"):
        print(f"\nprocess logs kept in {pairs.workdir}")
    else:
        remove_workdir(pairs.workdir)


@pytest.fixture
def pairs(request: pytest.FixtureRequest, pg_url: str) -> Iterator[TwoPairs]:
    """Two pairs on a fresh database of the shared PostgreSQL server."""
    with start_two_pairs(pg_url) as p:
        yield p
    keep_or_remove(request, p)


@pytest.fixture
def private_pg() -> Iterator[PrivateCluster]:
    """A PostgreSQL cluster of this test's own (stopped and removed afterwards,
    also on failure). Missing binaries skip locally and fail in CI."""
    problem = unavailable_reason()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"a private PostgreSQL cluster is required in CI: {problem}")
        pytest.skip(f"cannot start a private PostgreSQL cluster: {problem}")
    cluster = PrivateCluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pairs_on_private_pg(
    request: pytest.FixtureRequest, private_pg: PrivateCluster
) -> Iterator[TwoPairs]:
    with start_two_pairs(private_pg.url) as p:
        yield p
    keep_or_remove(request, p)
