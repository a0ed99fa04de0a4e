"""response_metering: observe over the real protocol. The admission stream
hands an admitted request to its metering stream (Envoy's observing filter),
which meters the response without answering anything: on the same process,
or, from the handoff's metadata, on another one (ext_proc/protocol/handoff.py).
tests/e2e/test_envoy_observe.py pins what the real Envoy sends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc.config import ConfigError
from ext_proc.protocol import envoy_codec as codec
from ext_proc.protocol.handoff import KEY_ENV, NAMESPACE, sibling_address
from ext_proc.protocol.processor import METER_HEADER
from ext_proc.sync.state import Increment
from spendgate.domain.usage import Usage
from tests.extproc.protocol import (
    COMPLETION,
    ENDED,
    GLOBAL_KEY,
    TIMEOUT,
    Ext,
    chat_body,
    chat_headers,
    policy,
    price,
    request_body,
    request_headers,
    response_body,
    response_headers,
    running,
    spent,
    wait_for,
)

OBSERVE = {"response_metering": "observe"}
COST = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))


async def admit(ext: Ext) -> ep.ProcessingResponse:
    """The admission stream of one streaming chat request: its answers, the
    last of which (the body's) turns the metering filter on, carries the
    handoff and ends the stream (Envoy then sends it nothing of the response)."""
    body = chat_body(stream=True)
    s = ext.stream()
    first = await s.send(request_headers(headers=chat_headers(body, x_request_id="r1")))
    assert isinstance(first, ep.ProcessingResponse)
    mode = first.mode_override
    assert mode.request_body_mode == codec.Mode.BUFFERED
    # Whether it streams is in the body: a JSON answer is metered here.
    assert mode.response_body_mode == codec.Mode.STREAMED
    assert mode.response_header_mode == codec.Mode.SKIP
    last = await s.answer_and_end(request_body(body))
    assert last.WhichOneof("response") == "request_body"
    mutation = last.request_body.response.header_mutation
    assert {(h.header.key, h.header.raw_value) for h in mutation.set_headers} >= {
        (METER_HEADER, b"observe")
    }
    await s.close()
    return last


def observed(req: ep.ProcessingRequest, handoff: ep.ProcessingResponse | None) -> Any:
    """``req`` as the observing filter sends it: with the admission answer's
    dynamic metadata (Envoy forwards the namespace "spendgate")."""
    req.observability_mode = True
    if handoff is not None:
        ns = handoff.dynamic_metadata.fields[NAMESPACE].struct_value
        req.metadata_context.filter_metadata[NAMESPACE].CopyFrom(ns)
    return req


async def meter(
    ext: Ext, messages: list[ep.ProcessingRequest], *, envoy_closes: bool = False
) -> None:
    """A metering stream: ext_proc answers nothing and ends it itself once
    the response is charged (or at once when there is nothing to meter)."""
    call = ext.stub.Process()
    for m in messages:
        await call.write(m)
    if envoy_closes:  # deferred_close_timeout after a request that ended early
        await call.done_writing()
    assert await asyncio.wait_for(call.read(), TIMEOUT) is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK


def response(handoff: ep.ProcessingResponse | None, *, cut: bool = False) -> list[Any]:
    parts = [response_headers(200), response_body(COMPLETION[:100])]
    if not cut:
        parts.append(response_body(COMPLETION[100:], end_of_stream=True))
    return [observed(request_headers(headers=chat_headers()), handoff)] + [
        observed(p, handoff) for p in parts
    ]


async def test_the_metering_stream_charges_what_the_admission_stream_let_through() -> None:
    async with running(**OBSERVE) as ext:
        ext.set_policies(policy("global"))
        handoff = await admit(ext)
        ns = handoff.dynamic_metadata.fields[NAMESPACE].struct_value
        assert ns.fields["token"].string_value.startswith(
            ext.server.processor.handoffs.prefix + "."
        )
        assert ext.server.state.held(GLOBAL_KEY)[0] > 0  # the hold waits for the response
        assert ext.stats.handoffs["parked"] == 1

        await meter(ext, response(handoff))
        assert ext.pending() == {GLOBAL_KEY: Increment(COST, 1, 0)}
        assert ext.server.state.held(GLOBAL_KEY) == (0, 0)
        assert ext.stats.handoffs == {
            "parked": 1,
            "claimed": 1,
            "restored": 0,
            "expired": 0,
            "unreadable": 0,
            "taken_elsewhere": 0,
            "ended_elsewhere": 0,
            "charged_for_sibling": 0,
            "untold": 0,
        }
        assert ext.stats.metered_responses == 1
        assert len(ext.server.processor.handoffs) == 0


async def test_a_response_cut_short_is_charged_when_envoy_closes_the_metering_stream() -> None:
    async with running(**OBSERVE) as ext:
        ext.set_policies(policy("global"))
        handoff = await admit(ext)
        await meter(ext, response(handoff, cut=True), envoy_closes=True)
        assert ext.stats.estimated_responses == 1
        [(key, charged)] = ext.pending().items()
        assert key == GLOBAL_KEY and charged.cost_nanos > 0
        assert ext.server.state.held(GLOBAL_KEY) == (0, 0)


async def test_a_request_that_never_got_an_answer_is_charged_its_prompt() -> None:
    """The client gave up before the provider answered: Envoy closes the
    metering stream after its request headers; the prompt is charged."""
    async with running(**OBSERVE) as ext:
        ext.set_policies(policy("global"))
        handoff = await admit(ext)
        await meter(
            ext, [observed(request_headers(headers=chat_headers()), handoff)], envoy_closes=True
        )
        assert ext.stats.estimated_responses == 1
        assert ext.pending()[GLOBAL_KEY].cost_nanos > 0


async def test_a_stream_without_a_handoff_is_ended_at_once_and_charges_nothing() -> None:
    """A refused request's local reply, or a request of no metered shape."""
    async with running(**OBSERVE) as ext:
        ext.set_policies(policy("global"))
        await meter(ext, [observed(response_headers(429), None)])
        assert ext.pending() == {}
        assert ext.stats.observe_streams == 1
        assert ext.stats.handoffs["parked"] == 0


async def test_another_process_meters_the_request_from_its_metadata() -> None:
    """--workers: the metering stream reaches a process that did not admit
    the request. It meters and charges it there, holding nothing (a second
    hold would count the request twice); the admitting process keeps its hold
    until handoff_timeout_s has passed."""
    async with running(**OBSERVE) as a, running(**OBSERVE) as b:
        for ext in (a, b):
            ext.set_policies(policy("global"))
        handoff = await admit(a)
        held_by_a = a.server.state.held(GLOBAL_KEY)
        assert held_by_a[0] > 0

        await meter(b, response(handoff))
        assert b.pending() == {GLOBAL_KEY: Increment(COST, 1, 0)}
        assert b.server.state.held(GLOBAL_KEY) == (0, 0)
        assert b.stats.handoffs["restored"] == 1
        assert a.pending() == {}

        handoffs = a.server.processor.handoffs
        handoffs.expire()
        assert a.server.state.held(GLOBAL_KEY) == held_by_a  # not yet
        handoffs.clock = lambda: float("inf")  # handoff_timeout_s later
        handoffs.expire()
        assert a.server.state.held(GLOBAL_KEY) == (0, 0)
        assert a.stats.handoffs["expired"] == 1
        assert len(handoffs) == 0


async def test_unreadable_handoff_metadata_is_counted_and_logged() -> None:
    async with running(**OBSERVE) as ext:
        bad = ep.ProcessingResponse()
        ns = bad.dynamic_metadata.fields[NAMESPACE].struct_value
        ns.fields["token"].string_value = "elsewhere.1"
        ns.fields["request"].string_value = orjson.dumps({"s": "no-such-shape"}).decode()
        await meter(ext, [observed(response_headers(200), bad)])
        assert ext.stats.handoffs["unreadable"] == 1
        assert ext.pending() == {}


async def test_refused_requests_are_not_handed_off() -> None:
    async with running(**OBSERVE) as ext:
        ext.set_policies(policy("global", amount="0.001"), spend=[spent("global", 10**6)])
        body = chat_body()
        s = ext.stream()
        answer = await s.answer_and_end(request_headers(headers=chat_headers(body)))
        assert answer.immediate_response.status.code == 429
        assert not answer.HasField("dynamic_metadata")
        assert ext.stats.handoffs["parked"] == 0


WORKERS = {**OBSERVE, "workers": 2}
KEY = "k" * 32


async def test_workers_keep_the_hold_on_the_admitting_worker_until_it_charges(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--workers: the metering worker tells the admitting one "take" at once
    (no expiry then, however long the response) and hands it what it metered
    when the response ends: the admitting worker charges it and releases the
    hold in one step, so the hold lasts exactly as long as the request and
    no view ever counts the request twice or not at all."""
    monkeypatch.setenv(KEY_ENV, KEY)
    async with running(**WORKERS) as a, running(**WORKERS) as b:
        for ext in (a, b):
            ext.set_policies(policy("global"))
        handoff = await admit(a)
        held_by_a = a.server.state.held(GLOBAL_KEY)
        assert held_by_a[0] > 0
        handoffs = a.server.processor.handoffs

        call = b.stub.Process()
        first, *rest = response(handoff)
        await call.write(first)
        await wait_for(lambda: a.stats.handoffs["taken_elsewhere"] == 1, "take")
        # Long past handoff_timeout_s (10 s), within REMOTE_CAP_S.
        handoffs.clock = lambda: time.monotonic() + 600
        handoffs.expire()
        assert a.server.state.held(GLOBAL_KEY) == held_by_a  # b has it: no expiry
        assert b.server.state.held(GLOBAL_KEY) == (0, 0)  # held once, on a

        for m in rest:
            await call.write(m)
        assert await asyncio.wait_for(call.read(), TIMEOUT) is grpc.aio.EOF
        await wait_for(lambda: a.stats.handoffs["charged_for_sibling"] == 1, "charge")
        assert a.server.state.held(GLOBAL_KEY) == (0, 0)
        assert a.pending() == {GLOBAL_KEY: Increment(COST, 1, 0)}
        assert b.pending() == {}
        assert b.stats.metered_responses == 0 and a.stats.metered_responses == 1
        assert len(handoffs) == 0
        assert a.stats.handoffs["untold"] == b.stats.handoffs["untold"] == 0


async def test_a_response_cut_short_on_another_worker_is_charged_by_the_admitting_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    async with running(**WORKERS) as a, running(**WORKERS) as b:
        for ext in (a, b):
            ext.set_policies(policy("global"))
        handoff = await admit(a)
        await meter(b, response(handoff, cut=True), envoy_closes=True)
        await wait_for(lambda: a.stats.handoffs["charged_for_sibling"] == 1, "charge")
        assert a.server.state.held(GLOBAL_KEY) == (0, 0)
        ((key, increment),) = a.pending().items()
        assert key == GLOBAL_KEY and increment.cost_nanos > 0
        assert b.pending() == {}


async def test_a_stranger_on_the_handoff_socket_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An abstract unix socket has no file permissions: any local process can
    connect. Without the group's key it releases no hold and charges nothing."""
    monkeypatch.setenv(KEY_ENV, KEY)
    async with running(**WORKERS) as a:
        a.set_policies(policy("global"))
        handoff = await admit(a)
        token = handoff.dynamic_metadata.fields[NAMESPACE].struct_value.fields["token"]
        held = a.server.state.held(GLOBAL_KEY)
        handoffs = a.server.processor.handoffs
        for key in ("wrong", "k" * 31, ""):
            _, writer = await asyncio.open_unix_connection(sibling_address(handoffs.prefix))
            writer.write(f"{key}\nend {token.string_value}\n".encode())
            await writer.drain()
            writer.close()
        await wait_for(lambda: a.stats.handoffs["unreadable"] == 3, "three strangers dropped")
        assert a.server.state.held(GLOBAL_KEY) == held
        assert a.stats.handoffs["ended_elsewhere"] == 0 and a.pending() == {}


async def test_a_metering_worker_that_cannot_reach_the_admitting_one_charges_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The admitting worker is gone (its holds went with it): the response is
    charged where it was metered, and the failure is loud."""
    monkeypatch.setenv(KEY_ENV, KEY)
    async with running(**WORKERS) as a, running(**WORKERS) as b:
        for ext in (a, b):
            ext.set_policies(policy("global"))
        handoff = await admit(a)
        listener = a.server.processor.handoffs.server
        assert listener is not None
        listener.close()  # a listens no more: as good as gone
        await listener.wait_closed()
        await meter(b, response(handoff))
        assert b.stats.handoffs["untold"] == 1
        assert b.pending() == {GLOBAL_KEY: Increment(COST, 1, 0)}


@pytest.mark.parametrize("admitter", ["single process", "another group"])
async def test_a_token_of_another_group_is_metered_as_without_workers(
    monkeypatch: pytest.MonkeyPatch, admitter: str
) -> None:
    """ext_proc with --workers on several hosts behind one Envoy cluster: a
    metering stream may bring a token of another host's group (or of an
    ext_proc without workers). No sibling of this group holds it, so nobody
    is told (no error per stream, no `untold`): the response is charged
    here, and the admitting process releases its hold after
    handoff_timeout_s, as without workers."""
    monkeypatch.setenv(KEY_ENV, "o" * 32)
    settings = OBSERVE if admitter == "single process" else WORKERS
    async with running(**settings) as a:
        a.set_policies(policy("global"))
        handoff = await admit(a)
    monkeypatch.setenv(KEY_ENV, KEY)
    async with running(**WORKERS) as b:
        b.set_policies(policy("global"))
        await meter(b, response(handoff))
        assert b.stats.handoffs["untold"] == 0 and b.stats.handoffs["restored"] == 1
        assert b.pending() == {GLOBAL_KEY: Increment(COST, 1, 0)}


async def test_a_stopping_worker_takes_no_more_and_its_sibling_charges_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The admitting worker stops (its handoffs close before its last flush):
    what its sibling meters afterwards is charged by the sibling, never
    written into a process that will not send it."""
    monkeypatch.setenv(KEY_ENV, KEY)
    async with running(**WORKERS) as a, running(**WORKERS) as b:
        for ext in (a, b):
            ext.set_policies(policy("global"))
        handoff = await admit(a)
        call = b.stub.Process()
        first, *rest = response(handoff)
        await call.write(first)
        await wait_for(lambda: a.stats.handoffs["taken_elsewhere"] == 1, "take")
        a.server.processor.handoffs.close()
        await wait_for(lambda: not a.server.processor.handoffs.connections, "closed")
        for m in rest:
            await call.write(m)
        assert await asyncio.wait_for(call.read(), TIMEOUT) is grpc.aio.EOF
        await wait_for(lambda: bool(b.pending()), "charged on b")
        assert b.pending() == {GLOBAL_KEY: Increment(COST, 1, 0)}
        assert b.stats.handoffs["untold"] == 1
        assert a.stats.handoffs["charged_for_sibling"] == 0 and a.pending() == {}


async def test_a_worker_without_the_group_key_does_not_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=KEY_ENV):
        async with running(**WORKERS):
            pass


async def test_a_json_answer_is_metered_on_the_admission_stream() -> None:
    """No handoff, no metering filter (its matcher skips it without the
    header): one chunk or two, held for one answer, cost less than a stream."""
    async with running(**OBSERVE) as ext:
        ext.set_policies(policy("global"))
        body = chat_body()
        s = ext.stream()
        await s.send(request_headers(headers=chat_headers(body)))
        last = await s.send(request_body(body))
        assert isinstance(last, ep.ProcessingResponse)
        assert not last.HasField("dynamic_metadata")
        assert not last.request_body.response.header_mutation.set_headers
        assert await s.send(response_body(COMPLETION, end_of_stream=True)) is ENDED
        await s.close()
        assert ext.pending() == {GLOBAL_KEY: Increment(COST, 1, 0)}
        assert ext.stats.handoffs["parked"] == 0
