"""One WatchState stream, message by message, applied to the LocalState.

The control plane sends a full resync as numbered pages (collected here and
applied in one step with the last page, so a resync cut short leaves the
previous view in force), then changes, each numbered one more than the
previous one (``seq``). A page out of order, a change before the first
resync is complete, a missing change number, or an update that cannot be
applied raise StreamBroken: the caller ends the stream and opens a new one,
which starts with a resync. A control plane of an earlier release sends one
whole snapshot instead (``full_snapshot``) and unnumbered changes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ext_proc.sync.state import LocalState
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp


class StreamBroken(Exception):
    """The stream cannot be followed further; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Received(enum.Enum):
    PAGE = "page"  # a page of a resync still under way
    SYNCED = "synced"  # a resync (or a whole snapshot) took effect
    CHANGE = "change"  # a change was applied


@dataclass(slots=True)
class _Resync:
    next_page: int = 0
    policies: list[dp.VersionedPolicy] = field(default_factory=list)
    overrides: list[pp.PriceOverride] = field(default_factory=list)
    spend: list[dp.WindowSpend] = field(default_factory=list)


@dataclass(slots=True)
class StreamStats:
    """Counts for the metrics (ext_proc/metrics.py), kept by ext_proc/sync/client.py."""

    resyncs: int = 0
    # reason -> how often the state stream broke: "stream" (gRPC error or
    # end), "gap", "protocol", "apply" (see StateStream).
    failures: dict[str, int] = field(default_factory=dict)

    def failed(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


class StateStream:
    def __init__(self, state: LocalState, clock: Callable[[], datetime]) -> None:
        self.state = state
        self.clock = clock
        self._resync: _Resync | None = None
        self._next_seq: int | None = None  # None until the first resync completes
        self._whole_sets = False  # a control plane of an earlier release
        self.pages = 0  # pages of the last completed resync
        self.received = 0  # messages received on this stream

    def receive(self, update: dp.StateUpdate) -> Received:
        self.received += 1
        if update.HasField("resync"):
            return self._page(update)
        if update.full_snapshot:
            self._whole_sets = True
            self._apply(update)
            return Received.SYNCED
        if not self._whole_sets:
            if self._next_seq is None:
                raise StreamBroken("protocol", "a change arrived before the first resync ended")
            if update.seq != self._next_seq:
                raise StreamBroken(
                    "gap", f"expected change {self._next_seq}, received change {update.seq}"
                )
            self._next_seq += 1
        self._apply(update)
        return Received.CHANGE

    def _page(self, update: dp.StateUpdate) -> Received:
        page = update.resync.page
        if page == 0:
            self._resync = _Resync()
        elif self._resync is None or page != self._resync.next_page:
            expected = self._resync.next_page if self._resync else 0
            raise StreamBroken("protocol", f"resync page {page} arrived, expected {expected}")
        r = self._resync
        assert r is not None
        r.next_page += 1
        r.policies.extend(update.policy_changes.upserts)
        r.overrides.extend(update.price_changes.upserts)
        r.spend.extend(update.spend)
        if not update.resync.last:
            return Received.PAGE
        self._resync = None
        try:
            self.state.replace_view(r.policies, r.overrides, r.spend, self.clock())
        except Exception as e:  # a bug or a message no control plane sends
            raise StreamBroken("apply", f"{type(e).__name__}: {e}") from e
        self._next_seq = update.seq + 1
        self.pages = r.next_page
        return Received.SYNCED

    def _apply(self, update: dp.StateUpdate) -> None:
        try:
            self.state.apply_update(update, self.clock())
        except Exception as e:
            raise StreamBroken("apply", f"{type(e).__name__}: {e}") from e
