"""Gemini and Bedrock requests (the model in the path) over the real protocol:
the request body's size from content-length (or from the body when chunked),
Bedrock InvokeModel metered with its response headers, and streams cut by the
client or the provider charged the input the request carried."""

from __future__ import annotations

import orjson
import pytest

from ext_proc.metering.meters.base import estimate_tokens_from_chars
from ext_proc.protocol import envoy_codec as codec
from ext_proc.sync.state import Increment
from spendgate.domain.pricing import PriceBook, cost_nanos
from spendgate.domain.usage import Usage
from tests.extproc.protocol import (
    CONTINUE_REQUEST_BODY,
    CONTINUE_RESPONSE_BODY,
    CONTINUE_RESPONSE_HEADERS,
    ENDED,
    GLOBAL_KEY,
    STREAM_RESPONSE_BODY,
    Ext,
    headers_removed,
    policy,
    request_body,
    request_headers,
    response_body,
    response_headers,
)
from tests.fixtures.bedrock.invoke import LLAMA_STREAM, MISTRAL_BODY, MISTRAL_HEADERS
from tests.fixtures.bedrock.streams import BASIC

PRICES = PriceBook.bundled()
LLAMA = "meta.llama3-3-70b-instruct-v1:0"
MISTRAL = "mistral.mistral-7b-instruct-v0:2"
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
FLASH = "gemini-2.5-flash"
PROMPT = orjson.dumps({"messages": [{"role": "user", "content": [{"text": "x" * 395}]}]})


def cost(usage: Usage, model: str, provider: str = "bedrock") -> int:
    found = PRICES.lookup(model, provider)
    assert found is not None, model
    return cost_nanos(usage, found)


def json_headers(body: bytes | None) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept-encoding": "gzip"}
    if body is not None:
        headers["content-length"] = str(len(body))
    return headers


INPUT_ESTIMATE = estimate_tokens_from_chars(len(PROMPT))


async def test_invoke_is_metered_from_its_response_headers(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    s = ext.stream()
    path = f"/model/{MISTRAL}/invoke"
    resp = await s.send(request_headers("POST", path, json_headers(PROMPT), route="bedrock"))
    assert resp == headers_removed(
        "accept-encoding", mode=codec.METERED_NO_REQUEST_BODY_WITH_RESPONSE_HEADERS
    )
    resp = await s.send(response_headers(200, "application/json", **MISTRAL_HEADERS))
    assert resp == STREAM_RESPONSE_BODY
    assert await s.send(response_body(orjson.dumps(MISTRAL_BODY), end_of_stream=True)) is ENDED
    await s.close()
    usage = Usage(15, output_tokens=9)
    assert ext.pending() == {GLOBAL_KEY: Increment(cost(usage, MISTRAL), 1, 0)}
    assert ext.stats.metered[("bedrock", "bedrock_invoke", MISTRAL)].input_tokens == 15


async def test_invoke_error_status_costs_nothing(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    s = ext.stream()
    path = f"/model/{MISTRAL}/invoke"
    await s.send(request_headers("POST", path, json_headers(PROMPT), route="bedrock"))
    assert await s.send(response_headers(400, "application/json")) == CONTINUE_RESPONSE_HEADERS
    await s.close()
    assert ext.pending() == {}
    assert ext.stats_changed() == {}


async def test_invoke_stream_is_metered_by_its_content_type(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    s = ext.stream()
    path = f"/model/{LLAMA}/invoke-with-response-stream"
    await s.send(request_headers("POST", path, json_headers(PROMPT), route="bedrock"))
    await s.send(response_headers(200, "application/vnd.amazon.eventstream"))
    for event in LLAMA_STREAM[:-1]:
        assert await s.send(response_body(event)) == CONTINUE_RESPONSE_BODY
    assert await s.send(response_body(LLAMA_STREAM[-1], end_of_stream=True)) is ENDED
    await s.close()
    usage = Usage(21, output_tokens=12)
    assert ext.pending() == {GLOBAL_KEY: Increment(cost(usage, LLAMA), 1, 0)}


@pytest.mark.parametrize("cut_by", ["client", "provider"])
async def test_cut_bedrock_stream_charges_input_from_content_length(ext: Ext, cut_by: str) -> None:
    """Cut before the usage report: the input is estimated from the request's
    size (content-length; the body is never read), output from the text."""
    ext.set_policies(policy("global"))
    s = ext.stream()
    path = f"/model/{HAIKU}/converse-stream"
    resp = await s.send(request_headers("POST", path, json_headers(PROMPT), route="bedrock"))
    assert resp == headers_removed("accept-encoding", mode=codec.METERED_NO_REQUEST_BODY)
    for event in BASIC[:3]:  # messageStart, "Hello", "! How"
        assert await s.send(response_body(event)) == CONTINUE_RESPONSE_BODY
    # Envoy closes the ext_proc stream either way: a client that hangs up and
    # a provider that drops the connection look the same to ext_proc.
    await s.close()
    usage = Usage(INPUT_ESTIMATE, output_tokens=estimate_tokens_from_chars(10), estimated=True)
    assert ext.pending() == {GLOBAL_KEY: Increment(cost(usage, HAIKU), 1, 1)}
    assert ext.stats.estimated_responses == 1


async def test_stream_cut_before_any_text_still_charges_input(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    s = ext.stream()
    path = f"/model/{HAIKU}/converse-stream"
    await s.send(request_headers("POST", path, json_headers(PROMPT), route="bedrock"))
    assert await s.send(response_body(BASIC[0])) == CONTINUE_RESPONSE_BODY  # messageStart only
    await s.close()
    usage = Usage(INPUT_ESTIMATE, output_tokens=0, estimated=True)
    assert ext.pending() == {GLOBAL_KEY: Increment(cost(usage, HAIKU), 1, 1)}


async def test_chunked_request_body_is_read_for_its_size(ext: Ext) -> None:
    """No content-length (a chunked request): the body is buffered, only to
    learn its size, and a cut Gemini stream is charged that input."""
    ext.set_policies(policy("global"))
    s = ext.stream()
    path = f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse"
    resp = await s.send(request_headers("POST", path, json_headers(None), route="gemini"))
    assert resp == headers_removed("accept-encoding", mode=codec.METERED)
    assert await s.send(request_body(PROMPT)) == CONTINUE_REQUEST_BODY
    chunk = {"candidates": [{"content": {"parts": [{"text": "abcdefgh"}], "role": "model"}}]}
    data = b"data: " + orjson.dumps(chunk) + b"\r\n\r\n"
    assert await s.send(response_body(data)) == CONTINUE_RESPONSE_BODY
    await s.close()
    usage = Usage(INPUT_ESTIMATE, output_tokens=2, estimated=True)
    assert ext.pending() == {GLOBAL_KEY: Increment(cost(usage, FLASH, "google"), 1, 1)}


async def test_cut_gemini_stream_keeps_the_reported_input(ext: Ext) -> None:
    """A partial report names the prompt: it wins over the size estimate."""
    ext.set_policies(policy("global"))
    s = ext.stream()
    path = f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse"
    await s.send(request_headers("POST", path, json_headers(PROMPT), route="gemini"))
    chunk = {
        "candidates": [{"content": {"parts": [{"text": "abcdefgh"}], "role": "model"}}],
        "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
        "modelVersion": FLASH,
    }
    await s.send(response_body(b"data: " + orjson.dumps(chunk) + b"\r\n\r\n"))
    await s.close()
    usage = Usage(7, output_tokens=2, estimated=True)
    assert ext.pending() == {GLOBAL_KEY: Increment(cost(usage, FLASH, "google"), 1, 1)}


@pytest.mark.parametrize("length", ["-1", "1e3", "12abc", "99999999999999999999", "\uff11"])
async def test_implausible_content_length_reads_the_body(ext: Ext, length: str) -> None:
    s = ext.stream()
    path = f"/model/{HAIKU}/converse"
    headers = {**json_headers(None), "content-length": length}
    resp = await s.send(request_headers("POST", path, headers, route="bedrock"))
    assert resp == headers_removed("accept-encoding", mode=codec.METERED)
    await s.close()
