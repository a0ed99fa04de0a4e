"""ext_proc over the real protocol: garbage, errors, disorder and load never
break a stream (tests/extproc/protocol.py drives it as Envoy does)."""

from __future__ import annotations

import asyncio

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc.sync.state import Increment
from spendgate.domain.policies import hash_api_key
from spendgate.domain.usage import Usage
from spendgate.v1 import budget_pb2 as pb
from tests.extproc.protocol import (
    API_KEY,
    COMPLETION,
    CONTINUE_REQUEST_BODY,
    CONTINUE_RESPONSE_BODY,
    CONTINUE_RESPONSE_HEADERS,
    DAY_START,
    ENDED,
    GLOBAL_KEY,
    Ext,
    chat_body,
    chat_headers,
    header_map,
    policy,
    price,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

# ---- robustness ----


async def test_garbage_response_body_is_still_answered(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    await s.send(response_headers())
    for junk in (b"\x00\xff\xfe garbage", b"<html>", b"}}}}"):
        assert await s.send(response_body(junk)) == CONTINUE_RESPONSE_BODY
    assert await s.send(response_body(b"", end_of_stream=True)) is ENDED
    await s.close()
    assert ext.pending() == {}
    assert ext.stats_changed() == {"unmetered_responses": 1}


async def test_internal_error_answers_continue_and_the_stream_goes_on(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    # A :status that is not a number makes the handler raise.
    bad = ep.ProcessingRequest(
        response_headers=ep.HttpHeaders(headers=header_map({":status": "two hundred"}))
    )
    assert await s.send(bad) == CONTINUE_RESPONSE_HEADERS
    assert await s.send(response_body(b"{}", end_of_stream=True)) is ENDED
    await s.close()
    # The body is still looked at (it carries no usage).
    assert ext.stats_changed() == {"internal_errors": 1, "unmetered_responses": 1}


async def test_messages_out_of_order_are_answered(ext: Ext) -> None:
    s = ext.stream()
    # A request body before any headers: no shape known, the handler fails.
    assert await s.send(request_body(chat_body())) == CONTINUE_REQUEST_BODY
    assert await s.send(response_headers()) == CONTINUE_RESPONSE_HEADERS
    assert await s.send(response_body(b"x", end_of_stream=True)) is ENDED
    await s.close()
    assert ext.stats_changed() == {"internal_errors": 1}


async def test_many_concurrent_streams(ext: Ext) -> None:
    ext.set_policies(policy("global", amount="1000"))
    completion = COMPLETION

    async def one() -> None:
        body = chat_body()
        s = ext.stream()
        await s.send(request_headers(headers=chat_headers(body)))
        await s.send(request_body(body))
        await s.send(response_headers())
        await s.send(response_body(completion[:50]))
        await s.send(response_body(completion[50:], end_of_stream=True))
        await s.close()

    await asyncio.gather(*(one() for _ in range(20)))
    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert ext.pending() == {GLOBAL_KEY: Increment(20 * cost, 20, 0)}


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"authorization": f"bearer  {API_KEY} "}, id="bearer-lower-case"),
        pytest.param({"x-api-key": API_KEY}, id="x-api-key"),
        pytest.param({"api-key": API_KEY}, id="azure-api-key"),
        pytest.param({"x-goog-api-key": API_KEY}, id="x-goog-api-key"),
    ],
)
async def test_api_key_is_read_from_any_provider_header(ext: Ext, headers: dict[str, str]) -> None:
    ext.set_policies(policy("key", pb.SCOPE_API_KEY, hash_api_key(API_KEY)))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers={"content-type": "application/json", **headers}))
    await s.send(request_body(body))
    await s.send(response_headers())
    await s.send(response_body(COMPLETION, end_of_stream=True))
    await s.close()
    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert ext.pending() == {("key", "", DAY_START): Increment(cost, 1, 0)}
