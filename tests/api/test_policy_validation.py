"""Admin API validation: INVALID_ARGUMENT with BadRequest field violations,
NOT_FOUND, stale etags, and API keys stored only hashed.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from spendgate.domain.policies import hash_api_key
from spendgate.v1 import budget_pb2 as pb
from tests.api.apiserver import (
    ADMIN,
    READ,
    TIMEOUT,
    Api,
    bad_fields,
    create,
    list_all,
    rpc_error,
    running_api,
)
from tests.store.builders import policy

# ---- validation -------------------------------------------------------------


def _without(field: str) -> pb.BudgetPolicy:
    p = policy()
    p.ClearField(field)
    return p


def _window(**kw: int) -> pb.BudgetPolicy:
    p = policy()
    p.window.CopyFrom(pb.BudgetWindow(**kw))
    return p


INVALID_POLICIES = {
    "negative amount": (policy(amount="-5"), ["amount_usd"]),
    "zero amount": (policy(amount="0"), ["amount_usd"]),
    "non-numeric amount": (policy(amount="abc"), ["amount_usd"]),
    "too many decimals": (policy(amount="1.0000000001"), ["amount_usd"]),
    "missing amount": (_without("amount_usd"), ["amount_usd"]),
    "missing name": (policy(name="  "), ["name"]),
    "unknown timezone": (policy(timezone="Mars/Olympus"), ["timezone"]),
    "window count 0": (_window(unit=pb.WINDOW_UNIT_DAYS, count=0), ["window.count"]),
    "window count too large": (_window(unit=pb.WINDOW_UNIT_DAYS, count=10_001), ["window.count"]),
    "missing window unit": (_window(count=1), ["window.unit"]),
    "missing action": (_without("action"), ["action"]),
    "missing scope": (_without("scope"), ["scope"]),
    "tag target without '='": (policy(scope=pb.SCOPE_TAG, target="team"), ["target"]),
    "global with a target": (policy(target="everyone"), ["target"]),
    "user without a target": (policy(scope=pb.SCOPE_USER), ["target"]),
    "threshold 0": (policy(thresholds=(50, 0)), ["alert_thresholds"]),
    "threshold repeated": (policy(thresholds=(50, 50)), ["alert_thresholds"]),
}


@pytest.mark.parametrize("case", list(INVALID_POLICIES))
def test_create_rejects_invalid_policy_naming_the_field(api: Api, case: str) -> None:
    msg, expected = INVALID_POLICIES[case]
    err = rpc_error(
        api.budgets.CreateBudgetPolicy, pb.CreateBudgetPolicyRequest(policy=msg), metadata=ADMIN
    )
    assert bad_fields(err) == expected
    assert list_all(api) == []


def test_create_names_every_bad_field_at_once(api: Api) -> None:
    msg = pb.BudgetPolicy(
        name="",
        amount_usd="abc",
        window=pb.BudgetWindow(count=0),
        timezone="Mars/Olympus",
        scope=pb.SCOPE_TAG,
        target="no-equals-sign",
        alert_thresholds=[0, 2000],
    )
    err = rpc_error(
        api.budgets.CreateBudgetPolicy, pb.CreateBudgetPolicyRequest(policy=msg), metadata=ADMIN
    )
    assert sorted(bad_fields(err)) == sorted(
        [
            "amount_usd",
            "name",
            "alert_thresholds",
            "alert_thresholds",
            "window.unit",
            "window.count",
            "timezone",
            "action",
            "target",
        ]
    )
    assert list_all(api) == []

    err = rpc_error(api.budgets.CreateBudgetPolicy, pb.CreateBudgetPolicyRequest(), metadata=ADMIN)
    assert bad_fields(err) == ["policy"]
    assert list_all(api) == []


def test_update_validation_not_found_and_stale_etag(api: Api) -> None:
    created = create(api, policy("orig"))
    assert created.created_by == "admin" and created.etag == "v1"

    err = rpc_error(
        api.budgets.UpdateBudgetPolicy,
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=created.id, name="x"),
            update_mask=FieldMask(paths=["name", "etag", "no_such_field"]),
        ),
        metadata=ADMIN,
    )
    assert bad_fields(err) == ["update_mask"]
    assert "etag" in err.details() and "no_such_field" in err.details()

    err = rpc_error(
        api.budgets.UpdateBudgetPolicy,
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=created.id, timezone="Mars/Olympus"),
            update_mask=FieldMask(paths=["timezone"]),
        ),
        metadata=ADMIN,
    )
    assert bad_fields(err) == ["timezone"]

    err = rpc_error(
        api.budgets.UpdateBudgetPolicy,
        pb.UpdateBudgetPolicyRequest(policy=pb.BudgetPolicy(name="x")),
        metadata=ADMIN,
    )
    assert bad_fields(err) == ["policy.id"]

    # A good update bumps the etag ...
    updated = api.budgets.UpdateBudgetPolicy(
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=created.id, amount_usd="25", etag=created.etag),
            update_mask=FieldMask(paths=["amount_usd"]),
        ),
        metadata=ADMIN,
        timeout=TIMEOUT,
    )
    assert (updated.amount_usd, updated.etag, updated.name) == ("25.00", "v2", "orig")

    # ... so the first etag is now stale: ABORTED, for update and delete.
    err = rpc_error(
        api.budgets.UpdateBudgetPolicy,
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=created.id, amount_usd="1", etag=created.etag),
            update_mask=FieldMask(paths=["amount_usd"]),
        ),
        metadata=ADMIN,
    )
    assert err.code() == grpc.StatusCode.ABORTED
    err = rpc_error(
        api.budgets.DeleteBudgetPolicy,
        pb.DeleteBudgetPolicyRequest(id=created.id, etag=created.etag),
        metadata=ADMIN,
    )
    assert err.code() == grpc.StatusCode.ABORTED
    assert list_all(api) == [updated]

    for call, req in (
        (api.budgets.GetBudgetPolicy, pb.GetBudgetPolicyRequest(id="bp_unknown")),
        (api.budgets.DeleteBudgetPolicy, pb.DeleteBudgetPolicyRequest(id="bp_unknown")),
        (
            api.budgets.UpdateBudgetPolicy,
            pb.UpdateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(id="bp_unknown", name="x"),
                update_mask=FieldMask(paths=["name"]),
            ),
        ),
        (api.budgets.ListSpend, pb.ListSpendRequest(policy_id="bp_unknown")),
    ):
        err = rpc_error(call, req, metadata=ADMIN)
        assert err.code() == grpc.StatusCode.NOT_FOUND, call
        assert "bp_unknown" in err.details()

    err = rpc_error(api.budgets.GetBudgetPolicy, pb.GetBudgetPolicyRequest(), metadata=ADMIN)
    assert bad_fields(err) == ["id"]
    err = rpc_error(
        api.budgets.ListBudgetPolicies,
        pb.ListBudgetPoliciesRequest(page_token="bogus!"),
        metadata=ADMIN,
    )
    assert bad_fields(err) == ["page_token"]

    api.budgets.DeleteBudgetPolicy(
        pb.DeleteBudgetPolicyRequest(id=created.id, etag="v2"), metadata=ADMIN, timeout=TIMEOUT
    )
    assert list_all(api) == []


def test_api_key_is_only_ever_stored_hashed(api: Api, capfd: pytest.CaptureFixture[str]) -> None:
    raw = "sk-live-THIS-IS-A-RAW-KEY-5f3a9c"
    hashed = hash_api_key(raw)
    created = create(api, policy("key budget", scope=pb.SCOPE_API_KEY, target=raw))
    assert created.target == hashed
    assert hashed.startswith("sha256:") and len(hashed) == len("sha256:") + 64
    got = api.budgets.GetBudgetPolicy(
        pb.GetBudgetPolicyRequest(id=created.id), metadata=READ, timeout=TIMEOUT
    )
    assert got == created
    assert list_all(api) == [created]

    # An update that sets the key again hashes it too.
    raw2 = "sk-live-ANOTHER-RAW-KEY-77e1d0"
    updated = api.budgets.UpdateBudgetPolicy(
        pb.UpdateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(id=created.id, target=raw2),
            update_mask=FieldMask(paths=["target"]),
        ),
        metadata=ADMIN,
        timeout=TIMEOUT,
    )
    assert updated.target == hash_api_key(raw2)
    # The hashed form is accepted as is.
    already = create(api, policy("hashed", scope=pb.SCOPE_API_KEY, target=hashed))
    assert already.target == hashed

    assert api.db_path is not None
    files = sorted(api.db_path.parent.glob(api.db_path.name + "*"))  # db, -wal, -shm
    assert api.db_path in files
    stored = b"".join(f.read_bytes() for f in files)
    assert hashed.encode() in stored  # the bytes searched do hold the policies
    assert hash_api_key(raw2).encode() in stored
    assert raw.encode() not in stored
    assert raw2.encode() not in stored
    # ... nor in the server's logs.
    out, err = capfd.readouterr()
    assert "policy created" in out + err
    assert raw not in out + err and raw2 not in out + err


# ---- identity scopes: SERVICE, canonical targets (both databases) ----------


def test_identity_targets_are_stored_canonical_on_both_databases(db_url: str) -> None:
    with running_api(db_url) as api:
        service = create(
            api,
            policy("checkout", scope=pb.SCOPE_SERVICE, target="spiffe://Corp/ns/Shop/sa/checkout"),
        )
        user = create(api, policy("alice", scope=pb.SCOPE_USER, target="\uff21lice"))
        tag = create(api, policy("team", scope=pb.SCOPE_TAG, target="Team=Red"))
        assert (service.scope, service.target) == (
            pb.SCOPE_SERVICE,
            "spiffe://corp/ns/shop/sa/checkout",
        )
        assert user.target == "alice" and tag.target == "team=red"
        stored = api.budgets.GetBudgetPolicy(
            pb.GetBudgetPolicyRequest(id=service.id), metadata=ADMIN, timeout=TIMEOUT
        )
        assert stored == service
        err = rpc_error(
            api.budgets.CreateBudgetPolicy,
            pb.CreateBudgetPolicyRequest(
                policy=policy("look-alike", scope=pb.SCOPE_USER, target="\u0430lice")
            ),
            metadata=ADMIN,
        )
        assert bad_fields(err) == ["target"]
        assert "mixes letters of scripts" in (err.details() or "")
        assert len(list_all(api)) == 3
