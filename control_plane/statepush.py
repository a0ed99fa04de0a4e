"""What the state stream carries, cut to size.

gRPC refuses messages over 4 MB by default, and a data plane's state (every
policy, price override and open window) has no upper bound. So nothing on
the stream is ever "the whole state" in one message: changes go down as
increments, and a full resync as pages (control_plane/resync.py), each filled
up to PAGE_BYTES. A single item is bounded by validation (a policy reaches
the data plane without its unbounded description), so it always fits a page.

Pure: protobuf messages in, protobuf messages out.
"""

from __future__ import annotations

from collections.abc import Iterable

from control_plane import convert
from control_plane.store.models import PolicyRow
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp

# A page is filled up to this many bytes (a quarter of gRPC's 4 MB default).
PAGE_BYTES = 1 << 20
# Room for a page's own fields (seq, resync, server_time, the wrappers).
_PAGE_OVERHEAD = 64
# What a repeated element costs besides its own bytes: field tag and length.
_ITEM_OVERHEAD = 6


def dataplane_policy(row: PolicyRow) -> dp.VersionedPolicy:
    """A policy as data planes need it: the description (free text of any
    length) and the authors are of no use for enforcement and stay home."""
    msg = convert.policy_message(row)
    msg.ClearField("description")
    msg.ClearField("created_by")
    msg.ClearField("updated_by")
    return dp.VersionedPolicy(policy=msg, version=row.version)


class Pager:
    """Fills StateUpdate messages with items up to ``limit`` bytes each.

    ``take`` hands over the pages filled so far; ``finish`` the rest, always
    at least one page (possibly empty), which is therefore the last one.
    """

    def __init__(self, limit: int = PAGE_BYTES) -> None:
        self.limit = limit - _PAGE_OVERHEAD
        self._page = dp.StateUpdate()
        self._size = 0
        self._full: list[dp.StateUpdate] = []

    def _room(self, size: int) -> dp.StateUpdate:
        cost = size + _ITEM_OVERHEAD
        if self._size and self._size + cost > self.limit:
            self._full.append(self._page)
            self._page = dp.StateUpdate()
            self._size = 0
        self._size += cost
        return self._page

    def policy(self, p: dp.VersionedPolicy) -> None:
        self._room(p.ByteSize()).policy_changes.upserts.append(p)

    def deleted_policy(self, policy_id: str) -> None:
        self._room(len(policy_id.encode())).policy_changes.deleted_ids.append(policy_id)

    def override(self, o: pp.PriceOverride) -> None:
        self._room(o.ByteSize()).price_changes.upserts.append(o)

    def deleted_override(self, override_id: str) -> None:
        self._room(len(override_id.encode())).price_changes.deleted_ids.append(override_id)

    def spend(self, ws: dp.WindowSpend) -> None:
        self._room(ws.ByteSize()).spend.append(ws)

    def take(self) -> list[dp.StateUpdate]:
        full, self._full = self._full, []
        return full

    def finish(self) -> list[dp.StateUpdate]:
        pages = [*self.take(), self._page]
        self._page, self._size = dp.StateUpdate(), 0
        return pages


def split(update: dp.StateUpdate, limit: int = PAGE_BYTES) -> list[dp.StateUpdate]:
    """An increment as messages of at most ``limit`` bytes (itself when it fits).

    Only increments are split (policy_changes, price_changes, spend): the
    whole-set fields of streams of earlier releases cannot be cut.
    ``applied`` and ``applied_batches`` go on the last piece: a data plane
    stops counting its batch as unsent only once every total that includes
    it has arrived.
    """
    if update.ByteSize() <= limit - _PAGE_OVERHEAD:
        return [update]
    marks = dp.StateUpdate(applied=update.applied, applied_batches=update.applied_batches)
    pager = Pager(limit - marks.ByteSize() - _ITEM_OVERHEAD)
    add_all(
        pager,
        update.policy_changes.upserts,
        update.policy_changes.deleted_ids,
        update.price_changes.upserts,
        update.price_changes.deleted_ids,
        update.spend,
    )
    pieces = [p for p in pager.finish() if p.ByteSize()]
    if pieces:
        if update.HasField("applied"):
            pieces[-1].applied.CopyFrom(update.applied)
        pieces[-1].applied_batches.extend(update.applied_batches)
    return pieces


def add_all(
    pager: Pager,
    policies: Iterable[dp.VersionedPolicy] = (),
    deleted_policies: Iterable[str] = (),
    overrides: Iterable[pp.PriceOverride] = (),
    deleted_overrides: Iterable[str] = (),
    spend: Iterable[dp.WindowSpend] = (),
) -> None:
    for p in policies:
        pager.policy(p)
    for i in deleted_policies:
        pager.deleted_policy(i)
    for o in overrides:
        pager.override(o)
    for i in deleted_overrides:
        pager.deleted_override(i)
    for ws in spend:
        pager.spend(ws)
