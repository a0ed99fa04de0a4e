"""What every use case of the control plane runs on: the store, one
transaction per call, the hub that pushes to data planes, the clock.

Blocking database work runs on a thread pool (one thread for SQLite, whose
single writer would otherwise make threads queue on its lock); callers on the
event loop await it. Every successful change is published to the StateHub
after its transaction commits, never before.

The use cases themselves live one module per concern (policies.py, usage.py,
spend_list.py, holds.py, adjustments.py, quarantine.py, reports.py,
resync.py, maintenance.py); control_plane/service.py composes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TypeVar

import structlog
from sqlalchemy import Engine, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from control_plane.errors import InvalidArgument, Unavailable
from control_plane.hub import StateHub
from control_plane.metrics import ControlPlaneMetrics
from control_plane.page_tokens import PageTokens, load_key
from control_plane.webhooks.outbox import KnownEvents, OutboxResult
from spendgate.domain.forecast import DEFAULT_HORIZON_S
from spendgate.domain.limits import MAX_PAGE_SIZE

log = structlog.get_logger("spendgate.control_plane")

T = TypeVar("T")
Clock = Callable[[], datetime]
# Called inside a use case's transaction with what changed ("policies" or
# "prices" with their ids, or "spend" with window keys);
# control_plane.replicas tells the other replicas through it.
ChangeKeys = Sequence[tuple[str, str, int]] | Sequence[str]
ChangeHook = Callable[[Session, str, ChangeKeys], None]
# A list page stops short of page_size at about this many bytes (at least one
# item per page), far below the 4 MB a gRPC client accepts by default:
# descriptions are free text of any length.
LIST_PAGE_BYTES = 1 << 20


def utc_now() -> datetime:
    return datetime.now(UTC)


class Runtime:
    """The store, hub, clock and settings the use cases share."""

    def __init__(
        self,
        engine: Engine,
        hub: StateHub,
        *,
        clock: Clock = utc_now,
        default_week_start: int = 0,
        hold_ttl_s: int = 30,
        forecast_horizon_s: float = DEFAULT_HORIZON_S,
    ) -> None:
        self.engine = engine
        self.hub = hub
        self.clock = clock
        self.default_week_start = default_week_start
        self.hold_ttl_s = hold_ttl_s
        self.forecast_horizon_s = forecast_horizon_s
        workers = 1 if engine.dialect.name == "sqlite" else 8
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="store")
        # Set after a transaction that wrote webhook deliveries commits; the
        # dispatcher waits on it besides polling.
        self.deliveries_ready = asyncio.Event()
        self.known_events = KnownEvents()
        self.on_change: ChangeHook | None = None
        self.metrics = ControlPlaneMetrics()
        self._page_tokens: PageTokens | None = None
        # Tag sets of usage rollups stored (committed): not written again.
        self.known_tag_sets: set[str] = set()

    def changed(self, session: Session, kind: str, keys: ChangeKeys = ()) -> None:
        """Record, in ``session``'s transaction, that data-plane state changed."""
        if self.on_change is not None:
            self.on_change(session, kind, keys)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.dispose()

    async def run(
        self, fn: Callable[[Session], T], on_commit: Callable[[T], None] | None = None
    ) -> T:
        """``fn(session)`` in one transaction on the store's thread pool;
        Unavailable when the database cannot be reached.

        ``on_commit(result)`` runs on the event loop once the transaction has
        committed, also when the caller was cancelled meanwhile (a deadline
        that expired while the thread committed): what counts committed work
        (metrics, log lines) then still agrees with the database.
        """

        def in_transaction() -> T:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                return fn(session)

        started = time.perf_counter_ns()
        failed = False
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, in_transaction)
            if on_commit is None:
                return await future
            try:
                result = await asyncio.shield(future)
            except asyncio.CancelledError:
                future.add_done_callback(
                    lambda f: None if f.cancelled() or f.exception() else on_commit(f.result())
                )
                raise
            on_commit(result)
            return result
        except (OperationalError, InterfaceError) as e:
            failed = True
            log.error("database unavailable", error=str(e.orig or e).splitlines()[0])
            raise Unavailable("database unavailable") from e
        finally:
            self.metrics.store_operation(fn, time.perf_counter_ns() - started, failed=failed)

    async def page_tokens(self) -> PageTokens:
        """Signs and checks page tokens (the key is read, or created, once)."""
        if self._page_tokens is None:
            now = self.clock()
            key = await self.run(lambda s: load_key(s, now))
            self._page_tokens = PageTokens(key)
        return self._page_tokens

    async def ping(self) -> None:
        await self.run(lambda s: s.execute(select(1)).scalar_one())


def clamp_page_size(requested: int, *, default: int) -> int:
    """The page size to serve: ``default`` for 0, at most MAX_PAGE_SIZE."""
    if requested < 0:
        raise InvalidArgument.one(
            "page_size",
            f"must be 0 (the default, {default}) or a positive number of items "
            f"(at most {MAX_PAGE_SIZE} are returned), got {requested}",
        )
    return min(requested or default, MAX_PAGE_SIZE)


def log_recorded(outbox: OutboxResult, **context: str) -> None:
    """One line per budget event a committed transaction recorded."""
    for e in outbox.recorded:
        log.info(
            "budget event recorded",
            event_id=e.event_id,
            event_type=e.kind,
            policy_id=e.policy_id,
            member=e.member or None,
            threshold_percent=e.threshold or None,
            spent_usd=e.spent_usd,
            amount_usd=e.amount_usd,
            deliveries=e.deliveries,
            **context,
        )
