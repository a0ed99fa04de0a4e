"""API keys over the real protocol: Envoy hands a duplicated header over as
two entries, the route name decides which headers count, and an ambiguous
request is answered 400 at the request headers and its stream ended."""

from __future__ import annotations

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc.sync.state import Increment
from spendgate.domain.policies import hash_api_key
from spendgate.domain.usage import Usage
from spendgate.v1 import budget_pb2 as pb
from tests.extproc.protocol import (
    COMPLETION,
    DAY_START,
    Ext,
    chat_body,
    policy,
    price,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

BLOCKED = "sk-ant-blocked-0123"


def with_entries(req: ep.ProcessingRequest, *entries: tuple[str, str]) -> ep.ProcessingRequest:
    """``req`` with more header entries, repeated names included (as Envoy sends them)."""
    req.request_headers.headers.headers.extend(
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in entries
    )
    return req


async def test_a_repeated_key_header_is_refused_in_the_routes_error_shape(ext: Ext) -> None:
    ext.set_policies(policy("key", pb.SCOPE_API_KEY, hash_api_key(BLOCKED)))
    req = with_entries(
        request_headers(path="/v1/models", method="GET", headers={}, route="anthropic"),
        ("x-api-key", BLOCKED),
        ("x-api-key", BLOCKED),
    )
    s = ext.stream()
    resp = await s.answer_and_end(req)
    reply = resp.immediate_response
    assert reply.status.code == 400
    assert reply.details == "spendgate_ambiguous_api_key"
    assert orjson.loads(reply.body) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "spendgate refused the request: the x-api-key header is sent more "
            "than once.",
        },
    }
    headers = {h.header.key: h.header.raw_value.decode() for h in reply.headers.set_headers}
    assert headers["x-spendgate-error"] == "ambiguous_api_key"
    await s.close()
    assert ext.stats.rejections == {("", "ambiguous_api_key"): 1}
    assert ext.pending() == {}


async def test_the_route_decides_which_header_is_the_key(ext: Ext) -> None:
    """On the gemini route the key is x-goog-api-key; on the openai route that
    header is another provider's key and is never forwarded."""
    ext.set_policies(policy("key", pb.SCOPE_API_KEY, hash_api_key(BLOCKED), amount="1000"))
    body = chat_body()
    s = ext.stream()
    headers = {"content-type": "application/json", "x-goog-api-key": BLOCKED}
    await s.send(request_headers(headers=headers, route="gemini"))
    await s.send(request_body(body))
    await s.send(response_headers())
    await s.send(response_body(COMPLETION, end_of_stream=True))
    await s.close()
    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert ext.pending() == {("key", "", DAY_START): Increment(cost, 1, 0)}

    s = ext.stream()
    resp = await s.answer_and_end(request_headers(headers=headers, route="openai"))
    error = orjson.loads(resp.immediate_response.body)["error"]
    assert error["code"] == "ambiguous_api_key"
    assert "x-goog-api-key header is not how the openai provider reads" in error["message"]
    await s.close()
