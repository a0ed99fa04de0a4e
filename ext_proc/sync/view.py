"""The policies and price overrides a data plane has from the control plane.

Both arrive as increments (set / deleted, by id) on top of a full set from a
resync, possibly out of order across paths: a policy's version and an
override's update_time decide which of two messages is newer, and a deleted
id stays deleted (ids are never reused). Deleted ids are remembered until
the resync after the next one: a change published late, after a resync that
no longer saw the policy, cannot bring it back. Whole sets (from control
planes and saved snapshots of earlier releases) replace everything.

Single-threaded, like ext_proc/sync/state.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from spendgate.domain.policies import Policy, PolicyIndex
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from spendgate.wire import policy_from_message

log = structlog.get_logger("spendgate.ext_proc")


@dataclass(slots=True)
class Tombstones:
    """Deleted ids of this resync generation and the one before."""

    now: set[str] = field(default_factory=set)
    before: set[str] = field(default_factory=set)

    def __contains__(self, item: str) -> bool:
        return item in self.now or item in self.before

    def add(self, item: str) -> None:
        self.now.add(item)

    def next_generation(self) -> None:
        self.before, self.now = self.now, set()


@dataclass(slots=True)
class PolicySet:
    msgs: dict[str, dp.VersionedPolicy] = field(default_factory=dict)
    valid: dict[str, Policy] = field(default_factory=dict)
    deleted: Tombstones = field(default_factory=Tombstones)
    # The index of ``valid``: rebuilt by replace, changed in place by change
    # (a change costs the policies it touches, not all of them).
    current: PolicyIndex = field(default_factory=lambda: PolicyIndex(()))

    def replace(self, policies: Iterable[dp.VersionedPolicy]) -> PolicyIndex:
        self.msgs, self.valid = {}, {}
        self.deleted.next_generation()
        for p in policies:
            self._put(p)
        self.current = self.index()
        return self.current

    def change(self, changes: dp.PolicyChanges) -> PolicyIndex:
        put: dict[str, Policy | None] = {}
        for p in changes.upserts:
            old = self.msgs.get(p.policy.id)
            if p.policy.id not in self.deleted and (old is None or p.version >= old.version):
                self._put(p)
                put[p.policy.id] = self.valid.get(p.policy.id)
        for policy_id in changes.deleted_ids:
            self.deleted.add(policy_id)
            self.msgs.pop(policy_id, None)
            self.valid.pop(policy_id, None)
            put[policy_id] = None
        if put:
            self.current = self.current.changed(put)
        return self.current

    def _put(self, p: dp.VersionedPolicy) -> None:
        self.msgs[p.policy.id] = p
        try:
            self.valid[p.policy.id] = policy_from_message(p.policy)
        except (KeyError, ValueError) as e:
            self.valid.pop(p.policy.id, None)
            log.error("ignoring policy the control plane sent", policy_id=p.policy.id, error=str(e))

    def index(self) -> PolicyIndex:
        return PolicyIndex(self.valid.values())


@dataclass(slots=True)
class OverrideSet:
    msgs: dict[str, pp.PriceOverride] = field(default_factory=dict)
    deleted: Tombstones = field(default_factory=Tombstones)
    # Counts changes, so a caller can tell that prices must be re-applied.
    version: int = 0

    def replace(self, overrides: Iterable[pp.PriceOverride]) -> None:
        self.deleted.next_generation()
        self.msgs = {o.id: o for o in overrides}
        self.version += 1

    def change(self, changes: dp.PriceOverrideChanges) -> None:
        for o in changes.upserts:
            old = self.msgs.get(o.id)
            if o.id not in self.deleted and (old is None or _time(o) >= _time(old)):
                self.msgs[o.id] = o
        for override_id in changes.deleted_ids:
            self.deleted.add(override_id)
            self.msgs.pop(override_id, None)
        self.version += 1

    def message(self) -> dp.PriceOverrides:
        return dp.PriceOverrides(overrides=self.msgs.values())


def _time(o: pp.PriceOverride) -> tuple[int, int]:
    return (o.update_time.seconds, o.update_time.nanos)
