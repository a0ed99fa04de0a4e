"""What every request processor of one ext_proc process shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeAlias

from ext_proc.admission import identity
from ext_proc.admission.decide import SpendKey
from ext_proc.admission.estimate import OutputEstimator
from ext_proc.config import Settings
from ext_proc.metering.coverage import UnmeteredPaths
from ext_proc.metering.pricing import PriceTable
from ext_proc.stats import Stats
from ext_proc.sync.state import LocalState
from spendgate.v1.dataplane_pb2 import ReserveVerdict

MAX_WARNED_MODELS = 1000
# A request's holds: what it holds on each of its REJECT windows.
Holds: TypeAlias = "list[tuple[SpendKey, int]]"
Arbiter = Callable[[Holds], Awaitable[ReserveVerdict | None]]


@dataclasses.dataclass(slots=True)
class Context:
    """Everything a processor shares with the others in this process."""

    settings: Settings
    state: LocalState
    prices: PriceTable
    clock: Callable[[], datetime]
    stats: Stats = dataclasses.field(default_factory=Stats)
    warned_models: set[str] = dataclasses.field(default_factory=set)
    # Paths of unmetered requests already logged (bounded).
    unmetered_paths: UnmeteredPaths = dataclasses.field(default_factory=UnmeteredPaths)
    # Asks the control plane to admit a request near a budget's line (see
    # ext_proc.sync.client.ControlPlaneSync.reserve); None keeps decisions local.
    arbiter: Arbiter | None = None
    # Set once the first ignored identity header has been logged.
    warned_untrusted: bool = False
    # Who is the caller, read the way the settings say (built once).
    callers: identity.IdentityReader = dataclasses.field(init=False)
    # Recent output tokens per (model, route): what a reservation assumes.
    estimator: OutputEstimator | None = None

    def __post_init__(self) -> None:
        self.callers = identity.IdentityReader(self.settings)
        if self.estimator is None:
            self.estimator = OutputEstimator(
                self.settings.reservation_output_tokens, self.settings.reservation_percentile
            )
