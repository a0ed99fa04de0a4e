"""ext_proc over the real protocol: admission, 429s and unpriced models
(tests/extproc/protocol.py drives it as Envoy does)."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc.sync.state import Increment
from spendgate.domain.usage import Usage
from spendgate.v1 import budget_pb2 as pb
from tests.extproc.protocol import (
    COMPLETION,
    CONTINUE_REQUEST_BODY,
    DAY_START,
    ENDED,
    GLOBAL_KEY,
    MINI,
    SKIP_REST,
    STREAM_RESPONSE_BODY,
    Ext,
    chat_body,
    chat_headers,
    headers_removed,
    immediate_429,
    policy,
    price,
    request_body,
    request_headers,
    response_body,
    response_headers,
    running,
    spent,
)

# ---- enforcement ----


async def test_exceeded_reject_policy_answers_429_at_request_headers(ext: Ext) -> None:
    ext.set_policies(policy("global", amount="10"), spend=[spent("global", 10 * 10**9)])
    s = ext.stream()
    resp = await s.answer_and_end(request_headers(headers=chat_headers(x_spendgate_user="alice")))
    message = (
        "Budget exceeded: policy 'global budget' (global) allows $10.00 per 1 day; "
        "$10.00 spent. Requests are rejected until the window resets at 2025-03-11T00:00:00Z."
    )
    assert resp == immediate_429(
        {
            "content-type": "application/json",
            "retry-after": str(11 * 3600 + 30 * 60),
            "x-should-retry": "false",
            "x-spendgate-error": "budget_exceeded",
            "x-spendgate-policy": "global",
            "x-spendgate-reset": "2025-03-11T00:00:00Z",
        },
        message,
    )
    await s.close()
    assert ext.stats_changed() == {"rejected_requests": 1}


async def test_wildcard_member_rejection_names_the_member_only(ext: Ext) -> None:
    ext.set_policies(
        policy("each-user", pb.SCOPE_USER, "*", amount="5"),
        spend=[spent("each-user", 5 * 10**9, "alice"), spent("each-user", 10**9, "bob")],
    )
    s = ext.stream()
    resp = await s.answer_and_end(request_headers(headers=chat_headers(x_spendgate_user="alice")))
    message = orjson.loads(resp.immediate_response.body)["error"]["message"]
    assert "for user 'alice'; $5.00 spent" in message
    assert "bob" not in message
    await s.close()
    s = ext.stream()  # bob is below his own budget
    resp = await s.send(request_headers(headers=chat_headers(x_spendgate_user="bob")))
    assert resp.WhichOneof("response") == "request_headers"
    await s.close()


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS"])
async def test_only_never_billable_methods_skip_admission(ext: Ext, method: str) -> None:
    ext.set_policies(policy("global"), spend=[spent("global", 11 * 10**9)])
    s = ext.stream()
    resp = await s.answer_and_end(request_headers(method, "/v1/models", end_of_stream=True))
    assert resp == ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse()), mode_override=SKIP_REST
    )
    await s.close()
    assert ext.stats_changed() == {}  # neither rejected nor counted as unmetered


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", "/v1/realtime?model=gpt-4o-realtime-preview"),
        ("DELETE", "/v1/files/file-abc123"),
        ("PUT", "/v1/chat/completions"),
    ],
)
async def test_every_other_method_is_admission_checked(ext: Ext, method: str, path: str) -> None:
    ext.set_policies(policy("global"), spend=[spent("global", 11 * 10**9)])
    s = ext.stream()
    resp = await s.answer_and_end(request_headers(method, path, end_of_stream=True))
    assert resp.immediate_response.status.code == 429
    assert orjson.loads(resp.immediate_response.body)["error"]["code"] == "budget_exceeded"
    await s.close()
    assert ext.stats_changed() == {"rejected_requests": 1}


async def test_the_request_that_crosses_completes_the_next_is_rejected(ext: Ext) -> None:
    # $0.000008 is less than one gpt-4o-mini completion: the one that crosses
    # completes, the next is rejected.
    ext.set_policies(policy("global", amount="0.000008"))
    body = chat_body()
    completion = COMPLETION
    s = ext.stream()
    assert (await s.send(request_headers(headers=chat_headers(body)))).HasField("request_headers")
    await s.send(request_body(body))
    await s.send(response_headers())
    await s.send(response_body(completion, end_of_stream=True))
    await s.close()
    assert ext.server.state.spent(GLOBAL_KEY) == price(Usage(19, 0, 10, None, 10)) > 8_000

    s = ext.stream()
    resp = await s.answer_and_end(request_headers(headers=chat_headers(body)))
    assert resp.immediate_response.status.code == 429
    await s.close()

    # A new day: admitted again.
    ext.clock.advance(timedelta(days=1))
    s = ext.stream()
    resp = await s.send(request_headers(headers=chat_headers(body)))
    assert resp.HasField("request_headers")
    await s.close()


async def test_model_policy_rejects_at_request_body(ext: Ext) -> None:
    ext.set_policies(policy("mini", pb.SCOPE_MODEL, MINI, amount="1"), spend=[spent("mini", 10**9)])
    body = chat_body(MINI.upper())  # model names are case-insensitive
    s = ext.stream()
    # The model is unknown at request headers: admitted there.
    resp = await s.send(request_headers(headers=chat_headers(body)))
    assert resp == headers_removed("accept-encoding")
    resp = await s.answer_and_end(request_body(body))
    assert resp == immediate_429(
        {
            "content-type": "application/json",
            "retry-after": str(11 * 3600 + 30 * 60),
            "x-should-retry": "false",
            "x-spendgate-error": "budget_exceeded",
            "x-spendgate-policy": "mini",
            "x-spendgate-reset": "2025-03-11T00:00:00Z",
        },
        "Budget exceeded: policy 'mini budget' (mini) allows $1.00 per 1 day; $1.00 spent. "
        "Requests are rejected until the window resets at 2025-03-11T00:00:00Z.",
    )
    await s.close()
    assert ext.stats_changed() == {"rejected_requests": 1}

    other = chat_body("gpt-4o")
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(other)))
    assert await s.send(request_body(other)) == CONTINUE_REQUEST_BODY
    await s.close()


async def test_model_policy_is_charged(ext: Ext) -> None:
    ext.set_policies(policy("each-model", pb.SCOPE_MODEL, "*", action=pb.ACTION_ALERT))
    body = chat_body("GPT-4o-Mini-2024-07-18")
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    await s.send(response_headers())
    await s.send(response_body(COMPLETION, end_of_stream=True))
    await s.close()
    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert ext.pending() == {("each-model", MINI, DAY_START): Increment(cost, 1, 0)}


async def test_alert_policy_never_rejects(ext: Ext) -> None:
    ext.set_policies(
        policy("alert", action=pb.ACTION_ALERT, amount="1"),
        policy("model-alert", pb.SCOPE_MODEL, MINI, action=pb.ACTION_ALERT, amount="1"),
        spend=[spent("alert", 50 * 10**9), spent("model-alert", 50 * 10**9)],
    )
    body = chat_body()
    s = ext.stream()
    assert await s.send(request_headers(headers=chat_headers(body))) == headers_removed(
        "accept-encoding"
    )
    assert await s.send(request_body(body)) == CONTINUE_REQUEST_BODY
    assert await s.send(response_headers()) == STREAM_RESPONSE_BODY
    completion = COMPLETION
    assert await s.send(response_body(completion, end_of_stream=True)) is ENDED
    await s.close()
    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert ext.server.state.spent(("alert", "", DAY_START)) == 50 * 10**9 + cost
    assert ext.stats.rejected_requests == 0


async def test_raising_the_limit_admits_at_once(ext: Ext) -> None:
    ext.set_policies(policy("global", amount="10"), spend=[spent("global", 10 * 10**9)])
    s = ext.stream()
    assert (await s.send(request_headers(headers=chat_headers()))).HasField("immediate_response")
    await s.close()
    ext.set_policies(policy("global", amount="20"), spend=[spent("global", 10 * 10**9)])
    s = ext.stream()
    assert (await s.send(request_headers(headers=chat_headers()))).HasField("request_headers")
    await s.close()


UNPRICED_COMPLETION = orjson.dumps(
    {"model": "my-local-llm", "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
)


async def _send_unpriced(ext: Ext, times: int) -> list[ep.ProcessingResponse]:
    answers = []
    for _ in range(times):
        body = chat_body("my-local-llm")
        s = ext.stream()
        await s.send(request_headers(headers=chat_headers(body)))
        answers.append(await s.send(request_body(body)))
        if not answers[-1].HasField("immediate_response"):
            await s.send(response_headers())
            await s.send(response_body(UNPRICED_COMPLETION, end_of_stream=True))
        await s.close()
    return answers


async def test_unpriced_model_is_charged_the_default_price_by_default(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    await _send_unpriced(ext, 2)
    # $15 / $75 per million tokens: 5 x 15000 + 7 x 75000 nanos per request.
    assert ext.pending() == {GLOBAL_KEY: Increment(2 * (5 * 15_000 + 7 * 75_000), 2, 0)}
    assert ext.stats_changed()["unpriced_responses"] == 2
    assert ext.server.ctx.warned_models == {"my-local-llm"}


async def test_unpriced_model_counts_the_request_at_zero_when_free() -> None:
    async with running(unpriced_models="free") as ext:
        ext.set_policies(policy("global"))
        await _send_unpriced(ext, 2)
        assert ext.pending() == {GLOBAL_KEY: Increment(0, 2, 0)}
        assert ext.stats_changed() == {
            "metered_responses": 2,
            "unpriced_responses": 2,
            "input_tokens": 10,
            "output_tokens": 14,
        }


async def test_unpriced_model_is_refused_before_the_provider_when_reject() -> None:
    async with running(unpriced_models="reject") as ext:
        [answer] = await _send_unpriced(ext, 1)
        reply = answer.immediate_response
        assert reply.status.code == 403
        assert orjson.loads(reply.body)["error"]["code"] == "model_not_priced"
        assert ext.pending() == {}
