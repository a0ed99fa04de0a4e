"""Every admin value out of bounds gets INVALID_ARGUMENT and a field violation
naming the field and the bound (issue 13, item 1), through a real gRPC
server: huge descriptions, 1,000 and 3,000 thresholds, a 1 MB id, a negative
page size, week_start=42, control characters in names and targets, forged
page tokens. Answers stay small enough for gRPC's trailers.
"""

from __future__ import annotations

import base64

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from spendgate.domain import limits
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import pricing_pb2 as pp
from spendgate.v1 import pricing_pb2_grpc, webhooks_pb2_grpc
from spendgate.v1 import webhooks_pb2 as wpb
from tests.api.apiserver import ADMIN, READ, Api, bad_fields, create, rpc_error, running_api
from tests.store.builders import policy

MB = 1024 * 1024


def violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(err)
    assert status is not None
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return [(v.field, v.description) for v in detail.field_violations]


def _week_start(n: int) -> pb.BudgetPolicy:
    p = policy()
    p.window.week_start = n  # type: ignore[assignment]
    return p


def _described(text: str) -> pb.BudgetPolicy:
    p = policy()
    p.description = text
    return p


BAD_POLICIES = {
    "4 MB description": (
        _described("d" * 4_000_000),
        ("description", "must be at most 2000 characters (got 4000000)"),
    ),
    "control character in description": (
        _described("line one\nline two\x1b[2J"),
        ("description", "must not contain control characters (found \\x1b)"),
    ),
    "1,000 thresholds": (
        policy(thresholds=tuple(range(1, 1001))),
        ("alert_thresholds", "at most 20 thresholds (got 1000)"),
    ),
    "3,000 thresholds": (
        policy(thresholds=tuple(range(1, 3001))),
        ("alert_thresholds", "at most 20 thresholds (got 3000)"),
    ),
    "week_start 42": (
        _week_start(42),
        (
            "window.week_start",
            "must be 0 (the server's week_start) or 1 (MONDAY) .. 7 (SUNDAY), got 42",
        ),
    ),
    "NUL in name": (
        policy(name="team\x00budget"),
        ("name", "must not contain control characters (found \\x00)"),
    ),
    "ESC in name": (
        policy(name="\x1b[31mred\x1b[0m"),
        ("name", "must not contain control characters (found \\x1b)"),
    ),
    "BEL in name": (
        policy(name="ding\x07"),
        ("name", "must not contain control characters (found \\x07)"),
    ),
    "CR in name": (
        policy(name="a\rb"),
        ("name", "must not contain control characters (found \\x0d)"),
    ),
    "NUL in a model target": (
        policy(scope=pb.SCOPE_MODEL, target="gpt-4o\x00"),
        ("target", "must not contain control characters (found \\x00)"),
    ),
    "ESC in an endpoint target": (
        policy(scope=pb.SCOPE_ENDPOINT, target="openai\x1b]0;pwned\x07"),
        ("target", "must not contain control characters (found \\x1b)"),
    ),
    "control character in a user target": (
        policy(scope=pb.SCOPE_USER, target="al\x00ice"),
        ("target", "user: contains a control character (U+0000), which is not allowed"),
    ),
    "model target over 256 bytes": (
        policy(scope=pb.SCOPE_MODEL, target="m" * 257),
        ("target", "must be at most 256 bytes (UTF-8) (got 257)"),
    ),
    "1 MB timezone": (
        policy(timezone="Z" * MB),
        ("timezone", f"must be an IANA name of at most 64 characters (got {MB})"),
    ),
    "1 MB amount": (
        policy(amount="9" * MB),
        ("amount_usd", "is not a decimal dollar amount"),
    ),
}


@pytest.mark.parametrize("case", BAD_POLICIES)
def test_a_bad_policy_field_gets_one_clear_field_violation(api: Api, case: str) -> None:
    bad, expected = BAD_POLICIES[case]
    e = rpc_error(
        api.budgets.CreateBudgetPolicy, pb.CreateBudgetPolicyRequest(policy=bad), metadata=ADMIN
    )
    assert bad_fields(e) == [expected[0]]
    assert violations(e) == [expected]
    assert e.details() == f"{expected[0]}: {expected[1]}"


def test_an_update_is_checked_like_a_create(api: Api) -> None:
    p = create(api, policy())
    patch = pb.BudgetPolicy(id=p.id, alert_thresholds=range(1, 3001), name="x\x00")
    e = rpc_error(
        api.budgets.UpdateBudgetPolicy,
        pb.UpdateBudgetPolicyRequest(
            policy=patch, update_mask={"paths": ["alert_thresholds", "name"]}
        ),
        metadata=ADMIN,
    )
    assert sorted(bad_fields(e)) == ["alert_thresholds", "name"]


def test_the_thresholds_bound_itself_is_accepted(api: Api) -> None:
    p = create(api, policy(thresholds=tuple(range(5, 101, 5))))
    assert len(p.alert_thresholds) == limits.MAX_THRESHOLDS


def test_a_one_megabyte_id_is_a_field_error_not_a_transport_error(api: Api) -> None:
    """It used to come back as RESOURCE_EXHAUSTED (the NOT_FOUND message
    quoted the id and overflowed gRPC's trailer limit)."""
    huge = "x" * MB
    webhooks = webhooks_pb2_grpc.WebhookServiceStub(api.channel)
    pricing = pricing_pb2_grpc.PricingServiceStub(api.channel)
    calls = [
        (api.budgets.GetBudgetPolicy, pb.GetBudgetPolicyRequest(id=huge), "id"),
        (api.budgets.DeleteBudgetPolicy, pb.DeleteBudgetPolicyRequest(id=huge), "id"),
        (
            api.budgets.UpdateBudgetPolicy,
            pb.UpdateBudgetPolicyRequest(policy=pb.BudgetPolicy(id=huge, name="n")),
            "policy.id",
        ),
        (api.budgets.ListSpend, pb.ListSpendRequest(policy_id=huge), "policy_id"),
        (webhooks.GetWebhook, wpb.GetWebhookRequest(id=huge), "id"),
        (webhooks.DeleteWebhook, wpb.DeleteWebhookRequest(id=huge), "id"),
        (webhooks.ListDeliveries, wpb.ListDeliveriesRequest(event_id=huge), "event_id"),
        (webhooks.ListEvents, wpb.ListEventsRequest(policy_id=huge), "policy_id"),
        (pricing.DeletePriceOverride, pp.DeletePriceOverrideRequest(id=huge), "id"),
    ]
    for method, request, field in calls:
        e = rpc_error(method, request, metadata=ADMIN)
        assert violations(e) == [(field, f"must be at most 64 characters (got {MB})")], field
    e = rpc_error(api.budgets.ListSpend, pb.ListSpendRequest(member=huge), metadata=ADMIN)
    assert violations(e) == [("member", "must be at most 512 characters")]


def test_thousands_of_violations_are_answered_with_the_first_twenty(api: Api) -> None:
    webhooks = webhooks_pb2_grpc.WebhookServiceStub(api.channel)
    hook = wpb.Webhook(
        name="n",
        url="https://hooks.example.com/x",
        format=wpb.WEBHOOK_FORMAT_GENERIC,
        events=["nope" * 100] * 3000,
    )
    e = rpc_error(webhooks.CreateWebhook, wpb.CreateWebhookRequest(webhook=hook), metadata=ADMIN)
    found = violations(e)
    assert len(found) == limits.MAX_VIOLATIONS
    assert found[0][0] == "events[0]"
    assert all(len(d) <= limits.MAX_VIOLATION_CHARS + 20 for _, d in found)
    assert e.details().startswith("events[0]: must be one of ")
    assert e.details().endswith(" more")
    assert len(e.details()) <= limits.MAX_ERROR_MESSAGE_CHARS + 30


def test_a_negative_page_size_says_what_is_wrong(api: Api) -> None:
    webhooks = webhooks_pb2_grpc.WebhookServiceStub(api.channel)
    pricing = pricing_pb2_grpc.PricingServiceStub(api.channel)
    for method, request in (
        (api.budgets.ListBudgetPolicies, pb.ListBudgetPoliciesRequest(page_size=-1)),
        (api.budgets.ListSpend, pb.ListSpendRequest(page_size=-1)),
        (webhooks.ListWebhooks, wpb.ListWebhooksRequest(page_size=-1)),
        (webhooks.ListEvents, wpb.ListEventsRequest(page_size=-1)),
        (pricing.ListPrices, pp.ListPricesRequest(page_size=-1)),
    ):
        e = rpc_error(method, request, metadata=READ)
        [(field, description)] = violations(e)
        assert field == "page_size"
        assert description.startswith("must be 0 (the default, ")
        assert description.endswith(
            ") or a positive number of items (at most 1000 are returned), got -1"
        )


def _list_policies(api: Api, token: str, size: int = 2) -> pb.ListBudgetPoliciesResponse:
    return api.budgets.ListBudgetPolicies(
        pb.ListBudgetPoliciesRequest(page_size=size, page_token=token), metadata=READ, timeout=10
    )


def test_page_tokens_are_signed_and_checked(db_url: str) -> None:
    with running_api(db_url) as api:
        ids = [create(api, policy(f"p{i}")).id for i in range(5)]
        first = _list_policies(api, "")
        assert [p.id for p in first.policies] == ids[:2]
        token = first.next_page_token
        assert ids[1] not in token and "." in token  # opaque and signed
        payload = token.split(".")[0]
        # The unsigned position alone, a re-signed guess, another list's
        # token, junk, and 100,000 characters are all refused.
        forged_body = base64.urlsafe_b64encode(b"policies\x1f" + ids[3].encode()).decode()
        webhooks = webhooks_pb2_grpc.WebhookServiceStub(api.channel)
        for bad in (
            payload,
            forged_body.rstrip("=") + "." + token.split(".")[1],
            "A" * 100_000,
            "not a token!",
            token + "x",
        ):
            e = rpc_error(
                api.budgets.ListBudgetPolicies,
                pb.ListBudgetPoliciesRequest(page_token=bad),
                metadata=READ,
            )
            assert violations(e) == [
                (
                    "page_token",
                    "is not a token this list returned (pass the next_page_token as is)",
                )
            ], bad[:40]
        e = rpc_error(
            webhooks.ListWebhooks, wpb.ListWebhooksRequest(page_token=token), metadata=READ
        )
        assert bad_fields(e) == ["page_token"]
    # The key is the database's: a restarted (or another) control plane on
    # the same database continues the listing.
    with running_api(db_url) as api:
        rest = _list_policies(api, token, size=10)
        assert [p.id for p in rest.policies] == ids[2:]
        assert rest.next_page_token == ""


def test_webhook_and_price_fields_refuse_control_characters_and_long_values(api: Api) -> None:
    webhooks = webhooks_pb2_grpc.WebhookServiceStub(api.channel)
    hook = wpb.Webhook(
        name="ops\x1b[2J",
        description="d" * 2001,
        url="https://hooks.example.com/a\x00b",
        format=wpb.WEBHOOK_FORMAT_GENERIC,
    )
    e = rpc_error(webhooks.CreateWebhook, wpb.CreateWebhookRequest(webhook=hook), metadata=ADMIN)
    assert violations(e) == [
        ("name", "must not contain control characters (found \\x1b)"),
        ("description", "must be at most 2000 characters (got 2001)"),
        ("url", "must not contain control characters"),
    ]
    pricing = pricing_pb2_grpc.PricingServiceStub(api.channel)
    for override, expected in (
        (
            pp.PriceOverride(model="gpt\x07", price=pp.Price(input="1", output="1")),
            [("override.model", "must not contain control characters (found \\x07)")],
        ),
        (
            pp.PriceOverride(model="m" * 257, price=pp.Price(input="1", output="1")),
            [("override.model", "must be at most 256 bytes (UTF-8)")],
        ),
        (
            pp.PriceOverride(
                model="gpt-4o", note="n\x1b" + "n" * 10, price=pp.Price(input="1", output="1")
            ),
            [("override.note", "must not contain control characters (found \\x1b)")],
        ),
        (
            pp.PriceOverride(model="gpt-4o", price=pp.Price(input="1e30", output="1")),
            [
                (
                    "override.price.input",
                    "must be at most 100000 USD per million tokens, got '1e30'",
                )
            ],
        ),
    ):
        e = rpc_error(
            pricing.SetPriceOverride,
            pp.SetPriceOverrideRequest(override=override),
            metadata=ADMIN,
        )
        assert violations(e) == expected


def test_control_characters_in_ids_and_filters_are_field_errors(db_url: str) -> None:
    """PostgreSQL refuses NUL in text: it used to surface as an unknown error."""
    with running_api(db_url) as api:
        webhooks = webhooks_pb2_grpc.WebhookServiceStub(api.channel)
        for method, request, field in (
            (api.budgets.GetBudgetPolicy, pb.GetBudgetPolicyRequest(id="bp_\x00"), "id"),
            (api.budgets.ListSpend, pb.ListSpendRequest(member="al\x00ice"), "member"),
            (webhooks.GetWebhook, wpb.GetWebhookRequest(id="wh_\x00"), "id"),
            (webhooks.ListEvents, wpb.ListEventsRequest(policy_id="\x1b[2J"), "policy_id"),
        ):
            e = rpc_error(method, request, metadata=ADMIN)
            [(found, description)] = violations(e)
            assert found == field
            assert description.startswith("must not contain control characters (found \\x")
