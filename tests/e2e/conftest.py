"""End-to-end tests drive the providers' official SDKs, whose HTTP clients
(httpx, urllib3 pools inside boto3) may be garbage-collected with a keep-alive
socket still open. That is the SDKs' housekeeping, not spendgate's, so here
(and only here) an unclosed socket is not turned into a test error."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.filterwarnings("ignore::ResourceWarning"))
            item.add_marker(
                pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
            )


@pytest.fixture(autouse=True, scope="module")
def _collect_sdk_clients() -> object:
    """Collect the SDK clients of this module before leaving it, so a leftover
    socket is not reported during some other folder's test."""
    import gc
    import warnings

    yield None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()
