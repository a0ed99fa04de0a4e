"""From admission to metering: one request on two ext_proc streams.

With ``response_metering: observe`` Envoy runs two ext_proc filters
(envoy/envoy.yaml). The first, the admission filter, is the one that can
answer 429: it gets the request headers and body, each held until ext_proc
answers. The second runs in Envoy's ``observability_mode``: it sends the
request headers, the response headers and every response chunk without
waiting for any answer, so no chunk of a stream is ever held for metering. A
matcher runs it only for requests the admission filter marked
``x-spendgate-meter: observe``: streams (a JSON answer is metered on the
admission stream, which costs less than a second stream). Envoy 1.40, as
tests/e2e/test_envoy_observe.py pins:

- sends the metering stream's first message only once the admission filter
  has answered the request's last message (its headers, or its body when read);
- forwards the admission filter's dynamic metadata (namespace ``spendgate``)
  with every message of the metering stream;
- lets the matcher see a header set in the answer to the request body;
- ends the metering stream ``deferred_close_timeout`` after the request
  ended (an aborted response: no ``end_of_stream`` chunk) unless ext_proc
  ended it first;
- sends a request refused by the admission filter (its local reply) to the
  metering stream without that metadata.

So: when the admission stream lets a stream go to the provider, the
request's processor is *parked* here under a token, and the answer carries the
token and everything metering needs as dynamic metadata. The metering stream
*takes* it from this process's parked requests (the hold made at admission
moves with it). A parked request no metering stream took within
``handoff_timeout_s`` is *expired* and its holds released (Envoy has no
metering filter, which is logged at error level); a metering stream that
comes later meters it *restored* from the metadata, holding nothing.

``--workers``: the two streams of one request may reach different workers
(each a data plane of its own, on one port). The worker that gets the
metering stream restores the request from the metadata and meters it there,
holding nothing; the hold stays with the admitting worker, which alone can
end it. So the metering worker tells it, with a datagram on a local (Linux
abstract) unix socket named after the token's process part: ``take`` at once
(the admitting worker then waits for the end instead of expiring the hold
after handoff_timeout_s) and ``end`` when the response is charged or cut.
The hold lasts exactly as long as the request, on whichever worker. A worker
that never says ``end`` (killed) leaves the hold to expire after
REMOTE_CAP_S, longer than any request Envoy lets run (route timeout 600 s).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc.metering.shapes import BY_NAME
from ext_proc.protocol.context import Context
from ext_proc.protocol.processor import RequestProcessor
from spendgate.domain.policies import RequestFacts

log = structlog.get_logger("spendgate.ext_proc")
NAMESPACE = "spendgate"
# How long a hold taken over by another worker waits for its "end" at most.
REMOTE_CAP_S = 900.0


def sibling_address(prefix: str) -> str:
    """The abstract unix socket of the worker whose tokens start with ``prefix``."""
    return f"\0spendgate-handoff-{prefix}"


class Unreadable(ValueError):
    """Handoff metadata this process cannot read."""


def payload(proc: RequestProcessor) -> str:
    """What a metering stream on another process needs to meter ``proc``'s
    response and charge it as ``proc`` would."""
    assert proc.shape is not None
    f = proc.facts
    return orjson.dumps(
        {
            "s": proc.shape.name,
            "p": proc.path,
            "pm": proc.path_model,
            "m": proc.request_model,
            "st": proc.stream_requested,
            "b": proc.request_bytes,
            "id": proc.request_id,
            "f": [f.route, f.user, f.api_key_hash, f.workspace, f.provider, f.model, f.service],
            "t": dict(f.tags),
        }
    ).decode()


def restore(ctx: Context, data: str) -> RequestProcessor:
    """A processor for a request another process admitted, from ``payload``.
    Its policies are matched again on this process's policy index. It holds
    nothing here: its holds stay on the admitting process until they expire."""
    try:
        d = orjson.loads(data)
        shape = BY_NAME[d["s"]]
        route, user, key_hash, workspace, provider, model, service = (str(v) for v in d["f"])
        tags = {str(k): str(v) for k, v in d["t"].items()}
        proc = RequestProcessor(ctx)
        proc.shape = shape
        proc.path = str(d["p"])
        proc.path_model = None if d["pm"] is None else str(d["pm"])
        proc.request_model = str(d["m"])
        proc.stream_requested = bool(d["st"])
        proc.request_bytes = int(d["b"])
        proc.request_id = str(d["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from None
    proc.facts = RequestFacts(
        route=route,
        user=user,
        api_key_hash=key_hash,
        workspace=workspace,
        provider=provider,
        model=model,
        tags=tags,
        service=service,
    )
    proc.matches = ctx.state.index.matches(proc.facts)
    proc.forwarded = True
    return proc


class Handoffs:
    """This process's parked requests, oldest first."""

    def __init__(self, ctx: Context, clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        self.clock = clock
        # Tokens name this process (random: ports and pids repeat) and a count.
        self.prefix = os.urandom(8).hex()
        self.count = itertools.count(1)
        self.parked: dict[str, tuple[float, RequestProcessor]] = {}
        # Parked requests another worker meters: their holds wait for its "end".
        self.remote: dict[str, tuple[float, RequestProcessor]] = {}
        self.warned_no_metering = False
        # --workers: where the siblings' datagrams arrive, and how ours leave.
        self.transport: asyncio.BaseTransport | None = None
        self.sender: socket.socket | None = None

    async def listen(self) -> None:
        """Take the siblings' "take" and "end" datagrams (--workers)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sibling_address(self.prefix))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: _Siblings(self), sock=sock)
        self.sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sender.setblocking(False)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.sender is not None:
            self.sender.close()

    def tell(self, verb: bytes, token: str) -> None:
        """Tell the worker that admitted ``token`` that it is taken or ended."""
        if self.sender is None:
            return
        prefix = token.partition(".")[0]
        try:
            self.sender.sendto(verb + b" " + token.encode(), sibling_address(prefix))
        except OSError as e:
            # The sibling is gone (its holds went with it) or its buffer is
            # full (its hold then expires): either way loud.
            self.ctx.stats.handoffs["untold"] += 1
            log.error("could not tell the admitting worker", verb=verb.decode(), error=str(e))

    def on_sibling(self, data: bytes) -> None:
        verb, _, token = data.decode(errors="replace").partition(" ")
        stats = self.ctx.stats.handoffs
        if verb == "take":
            entry = self.parked.pop(token, None)
            if entry is not None:
                self.remote[token] = (self.clock() + REMOTE_CAP_S, entry[1])
                stats["taken_elsewhere"] += 1
        elif verb == "end":
            entry = self.parked.pop(token, None) or self.remote.pop(token, None)
            if entry is not None:
                entry[1].expire_handoff()
                stats["ended_elsewhere"] += 1

    def ended(self, proc: RequestProcessor) -> None:
        """A metering stream ended: the admitting worker may end the hold."""
        if proc.handoff_from:
            self.tell(b"end", proc.handoff_from)

    def park(self, proc: RequestProcessor, reply: ep.ProcessingResponse) -> ep.ProcessingResponse:
        """Park ``proc``; ``reply`` (the admission answer that lets it go)
        with the handoff as dynamic metadata."""
        self.expire()
        token = f"{self.prefix}.{next(self.count)}"
        self.parked[token] = (self.clock() + self.ctx.settings.handoff_timeout_s, proc)
        proc.parked = True
        proc.last = not proc.asked_response_headers
        self.ctx.stats.handoffs["parked"] += 1
        out = ep.ProcessingResponse()
        out.CopyFrom(reply)
        ns = out.dynamic_metadata.fields[NAMESPACE].struct_value
        ns.fields["token"].string_value = token
        ns.fields["request"].string_value = payload(proc)
        return out

    def take(self, req: ep.ProcessingRequest) -> RequestProcessor | None:
        """The request a metering stream's first message is about; None when
        there is nothing to meter (no handoff: a request refused, or of no
        metered shape)."""
        stats = self.ctx.stats
        stats.observe_streams += 1
        ns = req.metadata_context.filter_metadata.get(NAMESPACE)
        if ns is None or "token" not in ns.fields:
            return None
        token = ns.fields["token"].string_value
        entry = self.parked.pop(token, None)
        if entry is not None:
            stats.handoffs["claimed"] += 1
            return entry[1]
        try:
            proc = restore(self.ctx, ns.fields["request"].string_value)
        except Unreadable as e:
            stats.handoffs["unreadable"] += 1
            log.error("handoff metadata unreadable; this response is not metered", error=str(e))
            return None
        stats.handoffs["restored"] += 1
        if self.sender is not None and not token.startswith(self.prefix + "."):
            proc.handoff_from = token
            self.tell(b"take", token)
        return proc

    def expire(self) -> None:
        """Release the holds of requests no metering stream took here in time
        (and of those another worker took and never ended)."""
        now = self.clock()
        stats = self.ctx.stats
        while self.remote:
            token, (deadline, proc) = next(iter(self.remote.items()))
            if deadline > now:
                break
            del self.remote[token]
            proc.expire_handoff()
            stats.handoffs["expired"] += 1
        while self.parked:
            token, (deadline, proc) = next(iter(self.parked.items()))
            if deadline > now:
                return
            del self.parked[token]
            proc.expire_handoff()
            stats.handoffs["expired"] += 1
            if not stats.observe_streams and not self.warned_no_metering:
                self.warned_no_metering = True
                log.error(
                    "no metering stream has reached this process: responses are not metered. "
                    "Envoy needs spendgate's metering filter (an ext_proc filter with "
                    "observability_mode, see envoy/envoy.yaml), or set "
                    "response_metering: inline",
                    handoff_timeout_s=self.ctx.settings.handoff_timeout_s,
                )

    def __len__(self) -> int:
        return len(self.parked) + len(self.remote)


class _Siblings(asyncio.DatagramProtocol):
    def __init__(self, handoffs: Handoffs) -> None:
        self.handoffs = handoffs

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.handoffs.on_sibling(data)
        except Exception:
            self.handoffs.ctx.stats.internal_errors += 1
            log.exception("could not apply a sibling worker's handoff message")


def metering_stream(first: ep.ProcessingRequest) -> bool:
    """Whether a stream is a metering stream (Envoy's observing filter)."""
    return bool(first.observability_mode)


__all__ = ("NAMESPACE", "Handoffs", "Unreadable", "metering_stream", "payload", "restore")
