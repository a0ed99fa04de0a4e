"""From admission to metering: one request on two ext_proc streams.

With ``response_metering: observe`` Envoy runs two ext_proc filters
(envoy/envoy.yaml). The first, the admission filter, is the one that can
answer 429: it gets the request headers and body, each held until ext_proc
answers. The second runs in Envoy's ``observability_mode``: it sends the
request headers, the response headers and every response chunk without
waiting for any answer, so no chunk of a response is ever held for metering.
Envoy 1.40, as tests/e2e/test_envoy_observe.py pins:

- sends the metering stream's first message only once the admission filter
  has answered the request's last message (its headers, or its body when read);
- forwards the admission filter's dynamic metadata (namespace ``spendgate``)
  with every message of the metering stream;
- half-closes the metering stream ``deferred_close_timeout`` after the request
  ended (an aborted response: no ``end_of_stream`` chunk) unless ext_proc
  ended it first;
- sends a request refused by the admission filter (its local reply) to the
  metering stream without that metadata.

So: when the admission stream lets a metered request go to the provider, the
request's processor is *parked* here under a token, and the answer carries the
token and everything metering needs as dynamic metadata. The metering stream
*takes* it from this process's parked requests (the hold made at admission
moves with it). A parked request no metering stream took within
``handoff_timeout_s`` is *expired* and its holds released (Envoy has no
metering filter, which is logged at error level); a metering stream that
comes later, or reaches a process that did not admit the request, meters it
*restored* from the metadata, holding nothing. ``--workers`` meters inline
(Settings.meters_inline): there the two streams of a request may reach
different workers, and only the admitting one could end the hold.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable

import orjson
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc.metering.shapes import BY_NAME
from ext_proc.protocol.processor import Context, RequestProcessor
from spendgate.domain.policies import RequestFacts

log = structlog.get_logger("spendgate.ext_proc")
NAMESPACE = "spendgate"


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
        self.warned_no_metering = False

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
        return proc

    def expire(self) -> None:
        """Release the holds of requests no metering stream took here in time."""
        if not self.parked:
            return
        now = self.clock()
        stats = self.ctx.stats
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
        return len(self.parked)


def metering_stream(first: ep.ProcessingRequest) -> bool:
    """Whether a stream is a metering stream (Envoy's observing filter)."""
    return bool(first.observability_mode)


__all__ = ("NAMESPACE", "Handoffs", "Unreadable", "metering_stream", "payload", "restore")
