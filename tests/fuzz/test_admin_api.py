"""Every admin request type with generated values — huge, tiny, negative,
non-numeric, unicode, control characters, 1 MB and 5 MB strings, unknown and
duplicated fields — gets OK or a clean status with a message (a BadRequest
naming the field for INVALID_ARGUMENT), never UNKNOWN/INTERNAL; and after
each example spendgate is proven whole (tests/fuzz/proof.py)."""

from __future__ import annotations

import grpc
import openai
import pytest
from google.protobuf import message_factory
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import given

from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import pricing_pb2 as pp
from spendgate.v1 import pricing_pb2_grpc, webhooks_pb2_grpc
from spendgate.v1 import webhooks_pb2 as wpb
from tests.fuzz import admin
from tests.fuzz.conftest import PROFILE, explore
from tests.fuzz.proof import FuzzStack
from tests.harness import wait_until

pytestmark = pytest.mark.e2e
C = grpc.StatusCode
CLEAN = {
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.ALREADY_EXISTS,
    C.FAILED_PRECONDITION,
    C.ABORTED,
    C.OUT_OF_RANGE,
}
# The server's gRPC receive limit: a larger request is refused by gRPC itself.
MAX_RECEIVE = 4 * 1024 * 1024


def check_error(e: grpc.RpcError, request_bytes: int) -> None:
    code, message = e.code(), e.details() or ""
    if code == C.RESOURCE_EXHAUSTED and request_bytes > MAX_RECEIVE:
        assert "larger than max" in message, message
        return
    assert code in CLEAN, f"{code.name}: {message[:500]}"
    assert message.strip(), f"{code.name} with an empty message"
    if code == C.INVALID_ARGUMENT:
        status = rpc_status.from_call(e)  # type: ignore[arg-type]
        assert status is not None, f"INVALID_ARGUMENT without details: {message[:300]}"
        violations = []
        for detail in status.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                violations += list(bad.field_violations)
        assert violations, f"INVALID_ARGUMENT without a field violation: {message[:300]}"
        for v in violations:
            assert v.field and v.description, f"a field violation without field/text: {v}"


def invoke(fuzz: FuzzStack, c: admin.Call, pool: admin.Pool) -> None:
    request = admin.build(c.method.input_type, c.spec, pool).SerializeToString()
    raw = (request + request if c.twice else request) + c.unknown
    path = f"/{c.method.containing_service.full_name}/{c.method.name}"
    rpc = fuzz.cp_channel.unary_unary(path)
    try:
        out = rpc(raw, metadata=fuzz.stack.admin, timeout=60)
    except grpc.RpcError as e:
        fuzz.outcomes[f"{c.method.name}: {e.code().name}"] += 1
        check_error(e, len(raw))
        return
    fuzz.outcomes[f"{c.method.name}: OK"] += 1
    response = message_factory.GetMessageClass(c.method.output_type).FromString(out)
    pool.remember(response)


def traffic(fuzz: FuzzStack) -> None:
    """One request while the example's policies and prices are in force: it
    passes, or gets the OpenAI-shaped 429 of a budget the example made."""
    wait_until(lambda: fuzz.stack.ext.sync.backlog is False, message="usage delivered")
    try:
        fuzz.sdk.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-spendgate-user": "fuzz-traffic"},
        )
    except openai.RateLimitError as e:
        assert "budget" in str(e.message).lower(), e.message


def cleanup(fuzz: FuzzStack) -> None:
    """Delete whatever the example left (policies, webhooks, price overrides)
    and wait until ext_proc has forgotten it: the proof must see only the
    canary policy and the catalog's prices."""
    channel = grpc.insecure_channel(
        f"127.0.0.1:{fuzz.stack.cp.port}",
        options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)],
    )
    meta = fuzz.stack.admin
    try:
        budgets = fuzz.stack.budgets.__class__(channel)
        webhooks = webhooks_pb2_grpc.WebhookServiceStub(channel)
        pricing = pricing_pb2_grpc.PricingServiceStub(channel)
        while True:
            listed = budgets.ListBudgetPolicies(
                pb.ListBudgetPoliciesRequest(page_size=5), metadata=meta, timeout=60
            )
            doomed = [p.id for p in listed.policies if p.id != fuzz.canary_policy]
            if not doomed and not listed.next_page_token:
                break
            for pid in doomed:
                budgets.DeleteBudgetPolicy(
                    pb.DeleteBudgetPolicyRequest(id=pid), metadata=meta, timeout=60
                )
            if not doomed:  # only the canary on this page; the rest after it
                token = listed.next_page_token
                listed = budgets.ListBudgetPolicies(
                    pb.ListBudgetPoliciesRequest(page_size=5, page_token=token),
                    metadata=meta,
                    timeout=60,
                )
                for p in listed.policies:
                    budgets.DeleteBudgetPolicy(
                        pb.DeleteBudgetPolicyRequest(id=p.id), metadata=meta, timeout=60
                    )
        while hooks := webhooks.ListWebhooks(
            wpb.ListWebhooksRequest(page_size=5), metadata=meta, timeout=60
        ).webhooks:
            for w in hooks:
                webhooks.DeleteWebhook(wpb.DeleteWebhookRequest(id=w.id), metadata=meta)
        for o in pricing.ListPriceOverrides(
            pp.ListPriceOverridesRequest(), metadata=meta, timeout=60
        ).overrides:
            pricing.DeletePriceOverride(pp.DeletePriceOverrideRequest(id=o.id), metadata=meta)
    finally:
        channel.close()
    state, prices = fuzz.stack.ext.state, fuzz.stack.ext.ctx.prices
    wait_until(
        lambda: set(state.index.policies) == {fuzz.canary_policy} and not prices._overrides,
        timeout=30,
        message="ext_proc forgets the example's policies and prices",
    )


def test_admin_requests_get_ok_or_a_clean_error(fuzz: FuzzStack) -> None:
    @PROFILE
    @given(admin.calls())
    def run(calls: list[admin.Call]) -> None:
        pool = admin.Pool([])
        try:
            for c in calls:
                invoke(fuzz, c, pool)
            traffic(fuzz)
        finally:
            cleanup(fuzz)
        fuzz.prove()

    explore(run, share=0.3)
