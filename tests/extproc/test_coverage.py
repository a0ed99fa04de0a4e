"""Requests of no metered API shape, and methods that are never billable, over
the real protocol: counted (admission-checked, one log line per path) or
refused with ``unmetered_requests: reject``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
import structlog.testing
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from tests.extproc.protocol import (
    ROUTE,
    SKIP_REST,
    Ext,
    chat_headers,
    headers_removed,
    policy,
    request_headers,
    running,
    spent,
)

UNMETERED = [
    "/v1/images/generations",
    "/v1/audio/speech",
    "/v1/batches",
    "/v1/messages/batches",
    "/v1/files",
]


@pytest.mark.parametrize("path", UNMETERED)
async def test_unmetered_request_is_counted_by_route_and_method(ext: Ext, path: str) -> None:
    ext.set_policies(policy("global"))
    s = ext.stream()
    resp = await s.answer_and_end(
        request_headers("POST", path, chat_headers(x_spendgate_user="alice"))
    )
    assert resp == headers_removed("x-spendgate-user", mode=SKIP_REST)
    await s.close()
    assert ext.stats.unmetered == {(ROUTE, "POST"): 1}
    assert ext.stats_changed() == {"unmetered_requests": 1}
    assert ext.pending() == {}


async def test_each_path_is_logged_once(ext: Ext) -> None:
    paths = ["/v1/batches/batch_6a1f0c3e9b2d4e5f", "/v1/batches/batch_0b9e8d7c6a5f4e3d"]
    for path in [*paths, "/v1/images/generations"]:
        s = ext.stream()
        await s.answer_and_end(request_headers("GET", path, end_of_stream=True))
        await s.close()
    assert ext.stats.unmetered == {(ROUTE, "GET"): 3}
    seen = ext.server.ctx.unmetered_paths
    # Both batch ids share one template: a second line would say nothing new.
    assert not seen.first_time(ROUTE, "GET", "/v1/batches/{id}")
    assert not seen.first_time(ROUTE, "GET", "/v1/images/generations")
    assert seen.first_time(ROUTE, "POST", "/v1/images/generations")


@pytest.mark.parametrize(
    ("path", "message_of"),
    [
        ("/v1/images/generations", lambda body: body["error"]["message"]),
        ("/v1/messages/batches", lambda body: body["error"]["message"]),  # Anthropic shape
        ("/model/m/async-invoke", lambda body: body["message"]),  # AWS shape
        ("/v1beta/models/gemini-2.5-flash:countTokens", lambda body: body["error"]["message"]),
    ],
)
async def test_unmetered_request_meets_a_spent_budget(
    ext: Ext, path: str, message_of: Callable[[Any], str]
) -> None:
    ext.set_policies(policy("global"), spend=[spent("global", 11 * 10**9)])
    s = ext.stream()
    resp = await s.answer_and_end(request_headers("POST", path, chat_headers()))
    assert resp.immediate_response.status.code == 429
    body = orjson.loads(resp.immediate_response.body)
    assert message_of(body).startswith("Budget exceeded: policy")
    await s.close()
    assert ext.stats_changed() == {"rejected_requests": 1}


@pytest.mark.parametrize(
    ("path", "dialect_check"),
    [
        (
            "/v1/images/generations?size=1024x1024",
            lambda body: body["error"]["code"] == "unmetered_request",
        ),
        (
            "/v1/messages/batches",
            lambda body: body["type"] == "error" and body["error"]["type"] == "permission_error",
        ),
        ("/model/m/async-invoke", lambda body: set(body) == {"message"}),
        (
            "/v1beta/models/gemini-2.5-flash:countTokens",
            lambda body: body["error"]["status"] == "PERMISSION_DENIED",
        ),
    ],
)
async def test_reject_refuses_unmetered_requests_naming_the_path(
    path: str, dialect_check: Callable[[Any], bool]
) -> None:
    async with running(unmetered_requests="reject") as ext:
        s = ext.stream()
        resp = await s.answer_and_end(request_headers("POST", path, chat_headers()))
        immediate = resp.immediate_response
        assert immediate.status.code == 403
        assert immediate.details == "spendgate_unmetered_request"
        headers = {h.header.key: h.header.raw_value for h in immediate.headers.set_headers}
        assert headers["x-spendgate-error"] == b"unmetered_request"
        body = orjson.loads(immediate.body)
        assert dialect_check(body)
        text = orjson.dumps(body).decode()
        assert f"POST {path.split('?')[0]}" in text and "unmetered_requests: reject" in text
        assert "size=" not in text  # the query (keys may ride in it) is never echoed
        await s.close()
        assert ext.stats.rejections == {("", "unmetered_request"): 1}
        assert ext.stats.unmetered == {}


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS"])
async def test_reject_lets_never_billable_methods_through(method: str) -> None:
    async with running(unmetered_requests="reject") as ext:
        s = ext.stream()
        resp = await s.answer_and_end(request_headers(method, "/v1/models", end_of_stream=True))
        assert resp == ep.ProcessingResponse(
            request_headers=ep.HeadersResponse(response=ep.CommonResponse()),
            mode_override=SKIP_REST,
        )
        await s.close()
        assert ext.stats_changed() == {}


async def test_reject_leaves_metered_shapes_alone() -> None:
    async with running(unmetered_requests="reject") as ext:
        s = ext.stream()
        resp = await s.send(request_headers(headers=chat_headers()))
        assert resp == headers_removed("accept-encoding")
        await s.close()
        assert ext.stats.rejections == {}


async def test_one_log_line_per_path(ext: Ext) -> None:
    paths = [
        "/v1/batches/batch_6a1f0c3e9b2d4e5f",
        "/v1/batches/batch_0b9e8d7c6a5f4e3d",
        "/v1/files",
    ]
    with structlog.testing.capture_logs() as logs:
        for path in paths:
            s = ext.stream()
            await s.answer_and_end(request_headers("POST", path, chat_headers()))
            await s.close()
    lines = [e for e in logs if e["event"].startswith("request of no metered API")]
    assert [(e["route"], e["method"], e["path"]) for e in lines] == [
        (ROUTE, "POST", "/v1/batches/{id}"),
        (ROUTE, "POST", "/v1/files"),
    ]
    assert all(e["log_level"] == "warning" for e in lines)
