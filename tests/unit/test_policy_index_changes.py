"""PolicyIndex.changed (what a policy change costs ext_proc) gives the same
index as a rebuild from scratch, leaves the index it came from untouched,
and PolicySet.change uses it."""

from __future__ import annotations

import random

import pytest

from ext_proc.sync.view import PolicySet
from spendgate.domain.policies import Action, Policy, PolicyIndex, RequestFacts, Scope
from spendgate.domain.windows import WindowSpec, WindowUnit
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp

DAY = WindowSpec(WindowUnit.DAYS, 1)
TARGETS = {
    Scope.GLOBAL: [""],
    Scope.USER: ["alice", "bob", "*", "Alice"],
    Scope.WORKSPACE: ["research", "*"],
    Scope.MODEL: ["gpt-4o-mini", "gpt-4o"],
    Scope.TAG: ["team=search", "team=*", "env=prod", "env=*"],
    Scope.SERVICE: ["*", "spiffe://corp/checkout"],
}
FACTS = [
    RequestFacts(),
    RequestFacts(user="alice", model="gpt-4o-mini", tags={"team": "search"}),
    RequestFacts(user="bob", workspace="research", model="gpt-4o", tags={"env": "prod"}),
    RequestFacts(workspace="other", service="spiffe://corp/checkout", tags={"team": "x"}),
]


def random_policy(rng: random.Random, pid: str) -> Policy:
    scope = rng.choice(list(TARGETS))
    return Policy(
        pid,
        pid,
        rng.randint(1, 10**9),
        DAY,
        rng.choice([Action.REJECT, Action.ALERT]),
        scope,
        rng.choice(TARGETS[scope]),
        enabled=rng.random() < 0.8,
        expose_to_clients=rng.random() < 0.2,
    )


def view(index: PolicyIndex) -> object:
    """Everything matching reads, order-free (see PolicyIndex.changed)."""
    return (
        {k: v for k, v in index.policies.items()},
        index.needs_model,
        index.exposes,
        index.wildcard_tag_keys,
        [sorted((p.id, m) for p, m in index.matches(f)) for f in FACTS],
        [sorted((p.id, why) for p, why in index.unidentified(f)) for f in FACTS],
    )


@pytest.mark.parametrize("seed", range(20))
def test_changes_give_the_index_a_rebuild_gives(seed: int) -> None:
    rng = random.Random(seed)
    valid: dict[str, Policy] = {}
    index = PolicyIndex(())
    for _ in range(60):
        put: dict[str, Policy | None] = {}
        for _ in range(rng.randint(1, 4)):
            pid = f"bp_{rng.randint(0, 15)}"
            put[pid] = None if rng.random() < 0.25 else random_policy(rng, pid)
        for pid, p in put.items():
            if p is None:
                valid.pop(pid, None)
            else:
                valid[pid] = p
        before = view(index)
        changed = index.changed(put)
        assert view(index) == before  # the earlier index is untouched
        assert view(changed) == view(PolicyIndex(valid.values()))
        index = changed


def test_an_update_keeps_its_place_among_the_matches() -> None:
    ps = [Policy(p, p, 10**9, DAY, Action.REJECT, Scope.USER, "alice") for p in ("p0", "p1", "p2")]
    index = PolicyIndex(ps)
    raised = Policy("p1", "p1", 2 * 10**9, DAY, Action.REJECT, Scope.USER, "alice")
    changed = index.changed({"p1": raised})
    rebuilt = PolicyIndex([ps[0], raised, ps[2]])
    facts = RequestFacts(user="alice")
    assert changed.matches(facts) == rebuilt.matches(facts)
    assert [p.amount_nanos for p, _ in changed.matches(facts)] == [10**9, 2 * 10**9, 10**9]
    assert list(changed.policies) == ["p0", "p1", "p2"]


def message(pid: str, version: int, target: str) -> dp.VersionedPolicy:
    return dp.VersionedPolicy(
        version=version,
        policy=pb.BudgetPolicy(
            id=pid,
            name=pid,
            amount_usd="5",
            window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
            action=pb.ACTION_REJECT,
            scope=pb.SCOPE_USER,
            target=target,
            enabled=True,
        ),
    )


def test_policy_set_changes_its_index_without_a_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    ps = PolicySet()
    ps.replace([message("a", 1, "alice"), message("b", 1, "bob")])

    def no_rebuild(self: PolicySet) -> PolicyIndex:
        raise AssertionError("a change rebuilt the whole index")

    monkeypatch.setattr(PolicySet, "index", no_rebuild)
    index = ps.change(
        dp.PolicyChanges(upserts=[message("a", 2, "bob"), message("c", 1, "*")], deleted_ids=["b"])
    )
    assert sorted(index.policies) == ["a", "c"]
    assert [(p.id, m) for p, m in index.matches(RequestFacts(user="bob"))] == [
        ("a", ""),
        ("c", "bob"),
    ]
    # An older version, a deleted id: nothing changes.
    same = ps.change(dp.PolicyChanges(upserts=[message("a", 1, "alice"), message("b", 3, "x")]))
    assert same is index
