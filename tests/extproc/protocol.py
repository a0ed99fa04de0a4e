"""Envoy's side of the ext_proc protocol, for the tests in this directory:
ext_proc's real grpc.aio server, driven in-process the way Envoy drives it.

Tests open ExternalProcessor.Process streams on a fresh ExtProcServer and send
ProcessingRequest messages as Envoy sends them (HeaderMap entries with
``raw_value`` bytes, pseudo-headers, the route name in ``attributes``), one
message at a time, checking the one answer each gets. The control plane address
is unreachable on purpose: ext_proc keeps enforcing from its local state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from ext_proc.config import Settings
from ext_proc.protocol import envoy_codec as codec
from ext_proc.server import ExtProcServer
from ext_proc.stats import Stats
from ext_proc.sync.state import Increment
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
    source: str = "127.0.0.1:40000",
    attributes: dict[str, str] | None = None,
) -> ep.ProcessingRequest:
    all_headers = {
        ":authority": "api.openai.com",
        ":path": path,
        ":method": method,
        ":scheme": "https",
        **(headers or {}),
    }
    attrs = struct_pb2.Struct()
    # Envoy's request_attributes (envoy/envoy.yaml): the route, and the direct
    # peer's address (identity headers count only from trusted sources).
    attrs.update({"xds.route_name": route, "source.address": source, **(attributes or {})})
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
        self.ended = False

    async def send(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse | Ended:
        """ext_proc's answer, or ENDED when it ended the call (status OK)
        instead: Envoy then goes on unchanged, as after a plain continue."""
        assert not self.ended, "message sent after ext_proc ended the stream"
        await self.call.write(req)
        resp = await asyncio.wait_for(self.call.read(), TIMEOUT)
        if resp is grpc.aio.EOF:
            assert await self.call.code() is grpc.StatusCode.OK
            self.ended = True
            return ENDED
        assert isinstance(resp, ep.ProcessingResponse)
        return resp

    async def answer_and_end(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse:
        """The answer to the last message Envoy will send; ext_proc then ends
        the call itself (status OK)."""
        resp = await self.send(req)
        assert isinstance(resp, ep.ProcessingResponse)
        assert await asyncio.wait_for(self.call.read(), TIMEOUT) is grpc.aio.EOF
        assert await self.call.code() is grpc.StatusCode.OK
        self.ended = True
        return resp

    async def close(self) -> None:
        """End the stream as Envoy does after the last phase; it must end OK."""
        if not self.ended:
            await self.call.done_writing()
            assert await asyncio.wait_for(self.call.read(), TIMEOUT) is grpc.aio.EOF
        assert await self.call.code() is grpc.StatusCode.OK


class Ended:
    """ext_proc closed the stream cleanly instead of answering."""

    def __repr__(self) -> str:
        return "ENDED"


ENDED = Ended()


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
                # Requests come from 127.0.0.1 (request_headers' source).
                "trusted_header_sources": "127.0.0.1/32",
                # One stream per request, as most tests here drive it; the
                # metering stream of observe has tests of its own
                # (test_observe.py) and the e2e suites run it through Envoy.
                "response_metering": "inline",
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


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


GLOBAL_KEY = ("global", "", DAY_START)
COMPLETION = (FIXTURES / "chat_basic.json").read_bytes()
