"""SHADOW policies in admission: they never refuse, never ask for an
identity, and say which of their windows would refuse; the would-reject
counts travel with the usage (and the journal) like spend."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from ext_proc.admission.decide import decide, shadowed
from ext_proc.sync.state import Batch, LocalState
from spendgate.domain.policies import Action, Policy, PolicyIndex, RequestFacts, Scope
from spendgate.domain.windows import WindowSpec, WindowUnit
from spendgate.v1 import budget_pb2 as pb
from spendgate.wire import policy_from_message

USD = 10**9
NOW = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
DAY_START = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
ENFORCED = Policy("enf", "enforced", 10 * USD, WindowSpec(WindowUnit.DAYS), Action.REJECT,
                  Scope.GLOBAL)  # fmt: skip
SHADOW = dataclasses.replace(ENFORCED, id="sh", name="shadow", shadow=True)
ALERT = dataclasses.replace(ENFORCED, id="al", action=Action.ALERT)


@pytest.mark.parametrize(
    ("spent_usd", "refused_by", "would_reject"),
    [
        pytest.param(9, None, [], id="under-the-limit"),
        pytest.param(10, "enf", ["sh"], id="at-the-limit"),
        pytest.param(11, "enf", ["sh"], id="over-the-limit"),
    ],
)
def test_shadow_twin_would_refuse_exactly_when_the_enforced_one_does(
    spent_usd: int, refused_by: str | None, would_reject: list[str]
) -> None:
    matches = [(ENFORCED, ""), (SHADOW, ""), (ALERT, "")]

    def spent(key: tuple[str, str, int]) -> int:
        return spent_usd * USD

    r = decide(matches, spent, NOW)
    assert (r.policy.id if r else None) == refused_by
    assert shadowed(matches, spent, NOW) == [(p, "", DAY_START) for p in would_reject]
    # Alone, the shadow policy admits.
    assert decide([(SHADOW, "")], spent, NOW) is None


def test_shadow_wildcard_policy_refuses_no_unnamed_caller() -> None:
    each = dataclasses.replace(SHADOW, scope=Scope.USER, target="*")
    assert PolicyIndex([each]).unidentified(RequestFacts()) == []
    enforced = dataclasses.replace(each, shadow=False)
    assert PolicyIndex([enforced]).unidentified(RequestFacts()) == [(enforced, "user")]


def test_would_reject_counts_are_batched_and_survive_the_journal_format() -> None:
    state = LocalState()
    key = ("sh", "", DAY_START)
    state.count_would_reject([key])
    state.count_would_reject([key])
    state.charge([(SHADOW, "")], 5, NOW, estimated=False)
    batch = state.take_batch()
    assert batch is not None
    [inc] = batch.message("dp").increments
    assert (inc.cost_nanos, inc.request_count, inc.would_reject_count) == (5, 1, 2)
    again = Batch.from_message(batch.message("dp"))
    assert again.increments[key].would_reject == 2
    # Counting costs nothing: spend as the data plane sees it is unchanged.
    assert state.spent(key) == 5


def test_policies_from_the_control_plane_carry_enforcement_and_exposure() -> None:
    msg = pb.BudgetPolicy(
        id="p", name="n", amount_usd="1", window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
        action=pb.ACTION_REJECT, scope=pb.SCOPE_GLOBAL, enabled=True,
        enforcement=pb.ENFORCEMENT_SHADOW, expose_to_clients=True,
    )  # fmt: skip
    p = policy_from_message(msg)
    assert p.shadow and p.expose_to_clients and not p.enforces
    msg.enforcement = pb.ENFORCEMENT_UNSPECIFIED
    assert policy_from_message(msg).enforces
