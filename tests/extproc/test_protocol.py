"""ext_proc's real grpc.aio server, driven in-process the way Envoy drives it.

Every test opens ExternalProcessor.Process streams on a fresh ExtProcServer and
sends ProcessingRequest messages as Envoy sends them (HeaderMap entries with
``raw_value`` bytes, pseudo-headers, the route name in ``attributes``), one
message at a time, checking the one answer each gets. The control plane address
is unreachable on purpose: ext_proc keeps enforcing from its local state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from ext_proc import envoy_codec as codec
from ext_proc.config import Settings
from ext_proc.meters.base import estimate_tokens_from_chars
from ext_proc.server import ExtProcServer
from ext_proc.state import Increment
from ext_proc.stats import Stats
from spendgate.domain.policies import hash_api_key
from spendgate.domain.pricing import PriceBook, cost_nanos
from spendgate.domain.usage import Usage
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp
from tests.harness import FakeClock

FIXTURES = Path(__file__).parent.parent / "fixtures" / "openai"
NOW = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
DAY_START = int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
DAY_END = int(datetime(2025, 3, 11, tzinfo=UTC).timestamp())
ROUTE = "openai_chat"
API_KEY = "sk-test-0123456789"
CHAT = "/v1/chat/completions"
MINI = "gpt-4o-mini-2024-07-18"
Mode = pm.ProcessingMode
TIMEOUT = 5.0


# ---- Envoy's side of the protocol ----


def header_map(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )


def request_headers(
    method: str = "POST",
    path: str = CHAT,
    headers: dict[str, str] | None = None,
    *,
    route: str = ROUTE,
    end_of_stream: bool = False,
) -> ep.ProcessingRequest:
    all_headers = {
        ":authority": "api.openai.com",
        ":path": path,
        ":method": method,
        ":scheme": "https",
        **(headers or {}),
    }
    attrs = struct_pb2.Struct()
    attrs.update({"xds.route_name": route})
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=header_map(all_headers), end_of_stream=end_of_stream
        ),
        attributes={"envoy.filters.http.ext_proc": attrs},
    )


def request_body(body: bytes, end_of_stream: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=end_of_stream))


def response_headers(
    status: int = 200, content_type: str = "application/json", **extra: str
) -> ep.ProcessingRequest:
    headers = {":status": str(status), "content-type": content_type}
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=header_map(headers)))


def response_body(body: bytes, end_of_stream: bool = False) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=body, end_of_stream=end_of_stream))


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def chat_body(model: str = MINI, **extra: Any) -> bytes:
    return orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Say hello"}], **extra}
    )


def chat_headers(body: bytes | None = None, **extra: str) -> dict[str, str]:
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {API_KEY}",
        "accept-encoding": "gzip, br",
    }
    if body is not None:
        headers["content-length"] = str(len(body))
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


# ---- what ext_proc answers ----

CONTINUE_REQUEST_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse())
CONTINUE_RESPONSE_HEADERS = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
CONTINUE_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
STREAM_RESPONSE_BODY = ep.ProcessingResponse(
    response_headers=ep.HeadersResponse(), mode_override=Mode(response_body_mode=Mode.STREAMED)
)
SKIP_REST = Mode(
    request_body_mode=Mode.NONE,
    response_header_mode=Mode.SKIP,
    response_body_mode=Mode.NONE,
    request_trailer_mode=Mode.SKIP,
    response_trailer_mode=Mode.SKIP,
)


def headers_removed(
    *names: str, mode: pm.ProcessingMode | None = codec.METERED
) -> ep.ProcessingResponse:
    resp = ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(
            response=ep.CommonResponse(
                header_mutation=ep.HeaderMutation(remove_headers=list(names))
            )
        )
    )
    if mode is not None:
        resp.mode_override.CopyFrom(mode)
    return resp


def set_header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def immediate_429(headers: dict[str, str], message: str) -> ep.ProcessingResponse:
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "budget_exceeded",
                "param": None,
                "code": "budget_exceeded",
            }
        }
    )
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
            headers=ep.HeaderMutation(set_headers=[set_header(k, v) for k, v in headers.items()]),
            body=body,
            details="spendgate_budget_exceeded",
        )
    )


def price(usage: Usage, model: str = MINI) -> int:
    found = PriceBook.bundled().lookup(model, "openai")
    assert found is not None, model
    return cost_nanos(usage, found)


# ---- policies ----


def policy(
    pid: str,
    scope: int = pb.SCOPE_GLOBAL,
    target: str = "",
    *,
    amount: str = "10",
    action: int = pb.ACTION_REJECT,
) -> pb.BudgetPolicy:
    return pb.BudgetPolicy(
        id=pid,
        name=f"{pid} budget",
        amount_usd=amount,
        window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
        timezone="UTC",
        action=action,
        scope=scope,
        target=target,
        enabled=True,
    )


def spent(pid: str, nanos: int, member: str = "") -> dp.WindowSpend:
    return dp.WindowSpend(
        policy_id=pid,
        member=member,
        window_start=timestamp(DAY_START),
        window_end=timestamp(DAY_END),
        spent_nanos=nanos,
    )


# ---- the server under test ----


class Stream:
    """One Process call: Envoy's side of one HTTP request."""

    def __init__(self, stub: ExternalProcessorStub) -> None:
        self.call = stub.Process()

    async def send(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse:
        await self.call.write(req)
        resp = await asyncio.wait_for(self.call.read(), TIMEOUT)
        assert isinstance(resp, ep.ProcessingResponse)
        return resp

    async def close(self) -> None:
        """End the stream as Envoy does after the last phase; it must end OK."""
        await self.call.done_writing()
        assert await asyncio.wait_for(self.call.read(), TIMEOUT) is grpc.aio.EOF
        assert await self.call.code() is grpc.StatusCode.OK


@dataclasses.dataclass
class Ext:
    server: ExtProcServer
    clock: FakeClock
    stub: ExternalProcessorStub

    @property
    def stats(self) -> Stats:
        return self.server.ctx.stats

    def stream(self) -> Stream:
        return Stream(self.stub)

    def set_policies(
        self, *policies: pb.BudgetPolicy, spend: Sequence[dp.WindowSpend] = ()
    ) -> None:
        self.server.state.apply_update(
            dp.StateUpdate(
                policies=dp.PolicySnapshot(policies=policies),
                spend=list(spend),
                full_snapshot=True,
            ),
            self.clock(),
        )

    def pending(self) -> dict[tuple[str, str, int], Increment]:
        return dict(self.server.state.pending)

    def stats_changed(self) -> dict[str, int]:
        """Counters that moved, except the always-moving protocol counters."""
        traffic = ("streams", "open_streams", "messages", "admitted_requests")
        return {k: v for k, v in self.stats.as_dict().items() if v and k not in traffic}


@contextlib.asynccontextmanager
async def running(**settings: Any) -> AsyncIterator[Ext]:
    """A started ExtProcServer on a free port, with a client stub and a test clock."""
    clock = FakeClock(NOW)
    server = ExtProcServer(
        Settings(
            **{
                "listen": "127.0.0.1:0",  # the OS picks a free port: server.port
                "control_plane": "127.0.0.1:1",  # nothing listens: enforcement stays local
                "data_plane_token": "x" * 20,
                "data_plane_id": "test-dp",
                "flush_interval_ms": 60_000,  # keep usage in `pending` for the assertions
                "journal_dir": "",  # nothing to keep between tests
                "metrics_listen": "",
                **settings,
            }
        ),
        clock=clock,
    )
    await server.start()
    assert server.port > 0
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Ext(server, clock, ExternalProcessorStub(channel))
    finally:
        await channel.close()
        await server.stop(grace=0.5)


@pytest.fixture
async def ext() -> AsyncIterator[Ext]:
    async with running() as e:
        yield e


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


GLOBAL_KEY = ("global", "", DAY_START)
COMPLETION = (FIXTURES / "chat_basic.json").read_bytes()


# ---- unmetered requests ----


async def test_get_is_answered_once_and_skips_the_rest(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    s = ext.stream()
    resp = await s.send(
        request_headers("GET", "/v1/models", {"x-spendgate-user": "alice"}, end_of_stream=True)
    )
    assert resp == headers_removed("x-spendgate-user", mode=SKIP_REST)
    await s.close()
    assert ext.stats_changed() == {"unmetered_requests": 1}
    assert ext.pending() == {}


async def test_custom_identity_headers_are_read_and_removed() -> None:
    async with running(
        user_header="x-user", workspace_header="x-team", tags_header="x-labels"
    ) as ext:
        ext.set_policies(
            policy("each-user", pb.SCOPE_USER, "*"),
            policy("each-team", pb.SCOPE_WORKSPACE, "*"),
            policy("each-env", pb.SCOPE_TAG, "env=*"),
        )
        body = chat_body()
        headers = chat_headers(
            body, x_user="carol", x_team="ml", x_labels="env=prod", x_spendgate_debug="1"
        )
        s = ext.stream()
        assert await s.send(request_headers(headers=headers)) == headers_removed(
            "x-user", "x-team", "x-labels", "x-spendgate-debug", "accept-encoding"
        )
        await s.send(request_body(body))
        await s.send(response_headers())
        await s.send(response_body(COMPLETION, end_of_stream=True))
        await s.close()
        charged = Increment(price(Usage(19, 0, 10, None, 10)), 1, 0)
        assert ext.pending() == {
            ("each-team", "ml", DAY_START): charged,
            ("each-user", "carol", DAY_START): charged,
            ("each-env", "prod", DAY_START): charged,
        }


async def test_unmetered_post_without_spendgate_headers_has_no_mutation(ext: Ext) -> None:
    s = ext.stream()
    resp = await s.send(request_headers("POST", "/v1/images/generations", chat_headers()))
    expected = ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse()), mode_override=SKIP_REST
    )
    assert resp == expected
    await s.close()


async def test_metered_post_without_body_skips_the_rest(ext: Ext) -> None:
    s = ext.stream()
    resp = await s.send(request_headers(headers=chat_headers(), end_of_stream=True))
    assert resp == ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse()), mode_override=SKIP_REST
    )
    await s.close()
    assert ext.stats_changed() == {}


# ---- metering ----


async def test_chat_completion_is_metered_and_charged(ext: Ext) -> None:
    ext.set_policies(
        policy("global"),
        policy("each-user", pb.SCOPE_USER, "*", action=pb.ACTION_ALERT),
        policy("team", pb.SCOPE_TAG, "team=*"),
        policy("key", pb.SCOPE_API_KEY, hash_api_key(API_KEY)),
        policy("route", pb.SCOPE_ENDPOINT, ROUTE),
        policy("other-route", pb.SCOPE_ENDPOINT, "anthropic"),
    )
    body = chat_body()
    s = ext.stream()
    headers = chat_headers(
        body, x_spendgate_user="alice", x_spendgate_tags="team=search", x_request_id="r1"
    )
    assert await s.send(request_headers(headers=headers)) == headers_removed(
        "x-spendgate-user", "x-spendgate-tags", "accept-encoding"
    )
    assert await s.send(request_body(body)) == CONTINUE_REQUEST_BODY
    assert await s.send(response_headers(200, "application/json")) == STREAM_RESPONSE_BODY
    completion = COMPLETION
    parts = [completion[:7], completion[7:300], completion[300:]]
    for part in parts[:-1]:
        assert await s.send(response_body(part)) == CONTINUE_RESPONSE_BODY
    assert await s.send(response_body(parts[-1], end_of_stream=True)) == CONTINUE_RESPONSE_BODY
    await s.close()

    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert cost > 0
    charged = Increment(cost, 1, 0)
    assert ext.pending() == {
        ("global", "", DAY_START): charged,
        ("route", "", DAY_START): charged,
        ("each-user", "alice", DAY_START): charged,
        ("key", "", DAY_START): charged,
        ("team", "search", DAY_START): charged,
    }
    assert ext.server.state.spent(GLOBAL_KEY) == cost
    assert ext.stats_changed() == {
        "metered_responses": 1,
        "input_tokens": 19,
        "output_tokens": 10,
        "cost_nanos": cost,
    }


async def test_empty_last_chunk_ends_the_response(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    await s.send(response_headers())
    completion = COMPLETION
    assert await s.send(response_body(completion)) == CONTINUE_RESPONSE_BODY
    assert await s.send(response_body(b"", end_of_stream=True)) == CONTINUE_RESPONSE_BODY
    # Charged at end of body, before the stream closes.
    assert ext.pending() == {GLOBAL_KEY: Increment(price(Usage(19, 0, 10, None, 10)), 1, 0)}
    await s.close()
    assert ext.stats.metered_responses == 1


@pytest.mark.parametrize(
    ("extra", "with_length"),
    [
        pytest.param({"stream": True}, True, id="no-stream-options"),
        pytest.param({"stream": True}, False, id="no-content-length"),
        pytest.param(
            {"stream": True, "stream_options": {"include_usage": False}},
            True,
            id="include-usage-false",
        ),
        pytest.param({"stream": True, "stream_options": None}, True, id="stream-options-null"),
    ],
)
async def test_streaming_request_asks_for_usage(
    ext: Ext, extra: dict[str, Any], with_length: bool
) -> None:
    body = chat_body(max_tokens=50, temperature=0.5, **extra)
    s = ext.stream()
    headers = chat_headers(body) if with_length else chat_headers()
    await s.send(request_headers(headers=headers))
    resp = await s.send(request_body(body))
    new = resp.request_body.response.body_mutation.body
    assert orjson.loads(new) == {
        **orjson.loads(body),
        "stream_options": {"include_usage": True},
    }
    set_headers = [set_header("content-length", str(len(new)))] if with_length else []
    expected = ep.ProcessingResponse(
        request_body=ep.BodyResponse(
            response=ep.CommonResponse(
                header_mutation=ep.HeaderMutation(set_headers=set_headers) if with_length else None,
                body_mutation=ep.BodyMutation(body=new),
            )
        )
    )
    assert resp == expected
    await s.close()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"stream": True, "stream_options": {"include_usage": True}}, id="already"),
        pytest.param({"stream": False}, id="not-streaming"),
        pytest.param({"stream": "yes"}, id="stream-not-bool"),
    ],
)
async def test_request_body_left_alone(ext: Ext, extra: dict[str, Any]) -> None:
    body = chat_body(**extra)
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    assert await s.send(request_body(body)) == CONTINUE_REQUEST_BODY
    await s.close()


async def test_sse_response_is_metered(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    await sse_exchange(ext)
    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert ext.pending() == {GLOBAL_KEY: Increment(cost, 1, 0)}
    assert ext.stats_changed() == {
        "metered_responses": 1,
        "input_tokens": 19,
        "output_tokens": 10,
        "cost_nanos": cost,
    }


async def sse_exchange(ext: Ext) -> None:
    """A streaming chat completion with a usage chunk, cut at arbitrary points."""
    body = chat_body(stream=True)
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    resp = await s.send(response_headers(200, "text/event-stream; charset=utf-8"))
    assert resp == STREAM_RESPONSE_BODY
    events = (FIXTURES / "chat_stream_usage.sse").read_bytes()
    for part in chunks(events, 97):  # cuts events and JSON at arbitrary points
        assert await s.send(response_body(part)) == CONTINUE_RESPONSE_BODY
    assert await s.send(response_body(b"", end_of_stream=True)) == CONTINUE_RESPONSE_BODY
    await s.close()


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)


def delta(content: str) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }


async def test_stream_cancelled_by_the_client_is_charged_an_estimate(ext: Ext) -> None:
    ext.set_policies(policy("global"), policy("each-user", pb.SCOPE_USER, "*"))
    body = chat_body("gpt-4o", stream=True)
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body, x_spendgate_user="bob")))
    await s.send(request_body(body))
    await s.send(response_headers(200, "text/event-stream"))
    for text in ("Hello", " there,", " friend"):  # 19 characters generated
        assert await s.send(response_body(sse(delta(text)))) == CONTINUE_RESPONSE_BODY
    assert ext.pending() == {}  # nothing charged while the stream runs
    s.call.cancel()
    await wait_for(lambda: ext.stats.estimated_responses == 1, "the aborted stream's charge")

    usage = Usage(
        input_tokens=estimate_tokens_from_chars(len(body)),
        output_tokens=estimate_tokens_from_chars(19),
        estimated=True,
    )
    assert usage.output_tokens == 5
    cost = price(usage, "gpt-4o-2024-08-06")
    assert cost > 0
    assert ext.pending() == {
        GLOBAL_KEY: Increment(cost, 1, 1),
        ("each-user", "bob", DAY_START): Increment(cost, 1, 1),
    }
    assert ext.stats_changed() == {
        "metered_responses": 1,
        "estimated_responses": 1,
        "input_tokens": usage.input_tokens,
        "output_tokens": 5,
        "cost_nanos": cost,
    }


async def test_stream_half_closed_mid_response_is_charged_an_estimate(ext: Ext) -> None:
    # Envoy ends the ext_proc stream when the downstream client goes away.
    ext.set_policies(policy("global"))
    body = chat_body("gpt-4o", stream=True)
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    await s.send(response_headers(200, "text/event-stream"))
    await s.send(response_body(sse(delta("12345678"))))
    await s.close()
    usage = Usage(estimate_tokens_from_chars(len(body)), output_tokens=2, estimated=True)
    assert ext.pending() == {GLOBAL_KEY: Increment(price(usage, "gpt-4o"), 1, 1)}
    assert ext.stats.estimated_responses == 1


async def test_trailers_each_get_a_trailers_response(ext: Ext) -> None:
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body, end_of_stream=False))
    trailers = header_map({"x-checksum": "abc"})
    assert await s.send(
        ep.ProcessingRequest(request_trailers=ep.HttpTrailers(trailers=trailers))
    ) == ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
    await s.send(response_headers())
    await s.send(response_body(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}'))
    assert await s.send(
        ep.ProcessingRequest(response_trailers=ep.HttpTrailers(trailers=trailers))
    ) == ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
    await s.close()
    assert ext.stats.internal_errors == 0


async def test_non_json_request_body_passes_and_the_next_request_works(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers()))
    for bad in (b"model=gpt-4o", b"\xff\xfe\x00not utf-8", b"[1, 2]", b'{"model": "gpt'):
        assert await s.send(request_body(bad)) == CONTINUE_REQUEST_BODY
    assert await s.send(response_headers(400)) == CONTINUE_RESPONSE_HEADERS
    await s.close()
    assert ext.stats_changed() == {"unparsed_requests": 4}
    assert ext.pending() == {}

    await sse_exchange(ext)
    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert ext.pending() == {GLOBAL_KEY: Increment(cost, 1, 0)}
    assert ext.stats.metered_responses == 1


async def test_2mb_request_body_is_handled(ext: Ext) -> None:
    big = "word " * (2 * 1024 * 1024 // 5)
    body = orjson.dumps({"model": MINI, "messages": [{"role": "user", "content": big}]})
    assert len(body) > 2 * 1024 * 1024
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    assert await s.send(request_body(body)) == CONTINUE_REQUEST_BODY
    await s.close()

    streaming = orjson.dumps({**orjson.loads(body), "stream": True})
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(streaming)))
    resp = await s.send(request_body(streaming))
    new = resp.request_body.response.body_mutation.body
    assert orjson.loads(new)["stream_options"] == {"include_usage": True}
    assert len(new) == len(streaming) + len(b',"stream_options":{"include_usage":true}')
    await s.close()
    assert ext.stats.internal_errors == 0


async def test_request_body_in_chunks_is_joined(ext: Ext) -> None:
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    parts = chunks(body, 10)
    for part in parts[:-1]:
        assert await s.send(request_body(part, end_of_stream=False)) == CONTINUE_REQUEST_BODY
    assert await s.send(request_body(parts[-1])) == CONTINUE_REQUEST_BODY
    await s.close()
    assert ext.stats_changed() == {}


@pytest.mark.parametrize("status", [500, 429, 400, 302, 100])
async def test_error_status_costs_nothing(ext: Ext, status: int) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    assert await s.send(response_headers(status)) == CONTINUE_RESPONSE_HEADERS
    await s.close()
    assert ext.pending() == {}
    assert ext.stats_changed() == {}


async def test_gzip_response_is_decoded_and_metered(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    resp = await s.send(response_headers(200, content_encoding="gzip"))
    assert resp.mode_override.response_body_mode == Mode.STREAMED
    packed = gzip.compress(COMPLETION)
    for part in chunks(packed, 7):
        await s.send(response_body(part))
    await s.send(response_body(b"", end_of_stream=True))
    await s.close()
    assert ext.stats_changed()["metered_responses"] == 1
    assert ext.pending() != {}


async def test_undecodable_encoding_is_counted_unmetered(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    resp = await s.send(response_headers(200, content_encoding="br"))
    assert resp == CONTINUE_RESPONSE_HEADERS
    await s.close()
    assert ext.pending() == {}
    assert ext.stats_changed() == {"unmetered_responses": 1}


# ---- enforcement ----


async def test_exceeded_reject_policy_answers_429_at_request_headers(ext: Ext) -> None:
    ext.set_policies(policy("global", amount="10"), spend=[spent("global", 10 * 10**9)])
    s = ext.stream()
    resp = await s.send(request_headers(headers=chat_headers(x_spendgate_user="alice")))
    message = (
        "Budget exceeded: policy 'global budget' (global) allows $10.00 per 1 day; "
        "$10.00 spent. Requests are rejected until the window resets at 2025-03-11T00:00:00Z."
    )
    assert resp == immediate_429(
        {
            "content-type": "application/json",
            "retry-after": str(11 * 3600 + 30 * 60),
            "x-should-retry": "false",
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
    resp = await s.send(request_headers(headers=chat_headers(x_spendgate_user="alice")))
    message = orjson.loads(resp.immediate_response.body)["error"]["message"]
    assert "for user 'alice'; $5.00 spent" in message
    assert "bob" not in message
    await s.close()
    s = ext.stream()  # bob is below his own budget
    resp = await s.send(request_headers(headers=chat_headers(x_spendgate_user="bob")))
    assert resp.WhichOneof("response") == "request_headers"
    await s.close()


async def test_get_is_never_rejected(ext: Ext) -> None:
    ext.set_policies(policy("global"), spend=[spent("global", 11 * 10**9)])
    s = ext.stream()
    resp = await s.send(request_headers("GET", "/v1/models", end_of_stream=True))
    assert resp == ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse()), mode_override=SKIP_REST
    )
    await s.close()


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
    resp = await s.send(request_headers(headers=chat_headers(body)))
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
    resp = await s.send(request_body(body))
    assert resp == immediate_429(
        {
            "content-type": "application/json",
            "retry-after": str(11 * 3600 + 30 * 60),
            "x-should-retry": "false",
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
    assert await s.send(response_body(completion, end_of_stream=True)) == CONTINUE_RESPONSE_BODY
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
    assert await s.send(response_body(b"", end_of_stream=True)) == CONTINUE_RESPONSE_BODY
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
    assert await s.send(response_body(b"{}", end_of_stream=True)) == CONTINUE_RESPONSE_BODY
    await s.close()
    # The body is still looked at (it carries no usage).
    assert ext.stats_changed() == {"internal_errors": 1, "unmetered_responses": 1}


async def test_messages_out_of_order_are_answered(ext: Ext) -> None:
    s = ext.stream()
    # A request body before any headers: no shape known, the handler fails.
    assert await s.send(request_body(chat_body())) == CONTINUE_REQUEST_BODY
    assert await s.send(response_body(b"x", end_of_stream=True)) == CONTINUE_RESPONSE_BODY
    assert await s.send(response_headers()) == CONTINUE_RESPONSE_HEADERS
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


async def test_response_headers_ending_the_stream_finish_metering(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    req = response_headers()
    req.response_headers.end_of_stream = True
    assert await s.send(req) == CONTINUE_RESPONSE_HEADERS
    await s.close()
    assert ext.pending() == {}
    assert ext.stats_changed() == {"unmetered_responses": 1}
