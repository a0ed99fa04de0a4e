"""Fuzz profiles and the one stack each fuzz module shares.

Two hypothesis profiles: ``fuzz-short`` (a few examples per test; part of
``make test``) and ``fuzz`` (``make fuzz``: many examples, run again and again
with fresh seeds until ``SPENDGATE_FUZZ_SECONDS`` are spent). The example
database is off: a failure prints its example and a reproduction blob.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz import proof

_COMMON = {
    "database": None,
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": list(HealthCheck),
}
settings.register_profile(
    "fuzz-short", max_examples=int(os.environ.get("SPENDGATE_FUZZ_EXAMPLES", "30")), **_COMMON
)
settings.register_profile("fuzz", max_examples=100, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("SPENDGATE_FUZZ_PROFILE", "fuzz-short"))
SECONDS = float(os.environ.get("SPENDGATE_FUZZ_SECONDS", "0"))


def explore(run: Callable[[], None], share: float) -> int:
    """Call the hypothesis test ``run`` once, then again (fresh seeds) until
    ``share`` of SPENDGATE_FUZZ_SECONDS has passed; return how many runs."""
    deadline = time.monotonic() + SECONDS * share
    runs = 0
    while True:
        run()
        runs += 1
        if time.monotonic() >= deadline:
            return runs


@pytest.fixture(scope="module")
def fuzz() -> Iterator[proof.FuzzStack]:
    stack = proof.start()
    yield stack
    proof.stop(stack)
