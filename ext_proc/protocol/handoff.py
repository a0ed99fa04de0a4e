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
metering stream restores the request from the metadata and meters it there;
the hold stays with the admitting worker. So the metering worker tells it, on
a local (Linux abstract) unix stream socket named after the token's process
part: ``take`` at once (the admitting worker then waits instead of expiring
the hold after handoff_timeout_s), and ``charge`` with what the meter read
when the response ends: the admitting worker charges it and releases the
hold in one step, exactly as for a response metered there. (Charged on the
metering worker while the hold lived on the admitting one, the control plane
saw, for a flush, both or neither: a budget's line moved by up to a few
requests either way.) ``end`` ends a hold with nothing to charge. A worker
that cannot be told (gone: its holds went with it) has the response charged
where it was metered. A hold nobody ends (the metering worker killed) expires
after REMOTE_CAP_S, longer than any request Envoy lets run (route timeout
600 s). Siblings prove themselves with the group's key
(``SPENDGATE_HANDOFF_KEY``, set by ``--workers`` for its workers; an abstract
socket has no file permissions), sent first on every connection; a token
names its group (``group_tag``), so a token of another group (ext_proc
with --workers on several hosts behind one Envoy cluster) is metered as
without workers, nobody told. A worker
killed with ``kill -9`` loses, as always, the usage charged since its last
flush, now including what its siblings handed it in that time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import os
import socket
import time
from collections.abc import Callable

import orjson
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc.metering.meters.base import MeterResult
from ext_proc.metering.shapes import BY_NAME
from ext_proc.protocol.context import Context
from ext_proc.protocol.processor import RequestProcessor
from spendgate.domain.policies import RequestFacts
from spendgate.domain.usage import Usage

log = structlog.get_logger("spendgate.ext_proc")
NAMESPACE = "spendgate"
# How long a hold taken over by another worker waits for its "end" at most.
REMOTE_CAP_S = 900.0
# The environment variable with the --workers group's key.
KEY_ENV = "SPENDGATE_HANDOFF_KEY"
LISTEN_BACKLOG = 128
MAX_LINE = 1 << 20  # a sibling's message, at most (a handoff is about 1 KB)
MAX_PENDING = 16 << 20  # buffered for a sibling not reading, at most


def group_tag(key: bytes) -> str:
    """The part of a --workers group's tokens that names the group: from
    its key (one way: the tag is in Envoy's metadata, the key is not)."""
    return hashlib.sha256(b"spendgate-handoff-group\0" + key).hexdigest()[:12]


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
        # Tokens name this process (random: ports and pids repeat) and a
        # count; in a --workers group, the group first (``listen``).
        self.prefix = os.urandom(8).hex()
        self.group = ""
        self.count = itertools.count(1)
        self.parked: dict[str, tuple[float, RequestProcessor]] = {}
        # Parked requests another worker meters: their holds wait for its "end".
        self.remote: dict[str, tuple[float, RequestProcessor]] = {}
        self.warned_no_metering = False
        # --workers: where the siblings' messages arrive, and ours to each.
        self.key = b""
        self.server: asyncio.Server | None = None
        self.peers: dict[str, _Peer] = {}
        self.connections: set[asyncio.BaseTransport] = set()

    async def listen(self, key: bytes) -> None:
        """Take the siblings' messages (--workers); ``key``: the group's."""
        self.key = key
        self.group = group_tag(key)
        self.prefix = f"{self.group}-{self.prefix}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(sibling_address(self.prefix))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(lambda: _Siblings(self), sock=sock)

    def close(self) -> None:
        """Take nothing more from the siblings (before the last flush: a
        sibling that writes after this finds the connection closed and
        charges what it metered itself)."""
        if self.server is not None:
            self.server.close()
        for transport in list(self.connections):
            transport.close()
        for peer in self.peers.values():
            peer.close()
        self.peers.clear()

    def sibling(self, token: str) -> bool:
        """``token`` was issued by another worker of this group: one on
        this host, which holds the request's hold and wants to be told. A
        token of another group (ext_proc on another host, or another group
        on this one) is metered here like one of a single process: its
        admitting process releases its hold after handoff_timeout_s."""
        return (
            self.server is not None
            and token.startswith(self.group + "-")
            and not token.startswith(self.prefix + ".")
        )

    def tell(self, line: bytes, token: str) -> bool:
        """Send ``line`` to the worker that admitted ``token``. False (logged
        at error, counted) when that worker cannot be reached."""
        if self.server is None:
            return False
        prefix = token.partition(".")[0]
        peer = self.peers.get(prefix)
        try:
            if peer is None or peer.broken:
                peer = self.peers[prefix] = _Peer(sibling_address(prefix), self.key, self.ctx)
            peer.send(line)
        except OSError as e:
            # The sibling is gone (its holds went with it) or cannot keep up
            # (BlockingIOError: what is buffered for it stays, in order).
            if not isinstance(e, BlockingIOError):
                self.peers.pop(prefix, None)
            self.ctx.stats.handoffs["untold"] += 1
            log.error(
                "could not tell the admitting worker",
                verb=line.partition(b" ")[0].decode(),
                error=str(e),
            )
            return False
        return True

    def on_sibling(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        token, _, body = rest.partition(b" ")
        key = token.decode(errors="replace")
        stats = self.ctx.stats.handoffs
        if verb == b"take":
            entry = self.parked.pop(key, None)
            if entry is not None:
                self.remote[key] = (self.clock() + REMOTE_CAP_S, entry[1])
                stats["taken_elsewhere"] += 1
        elif verb == b"end":
            entry = self.parked.pop(key, None) or self.remote.pop(key, None)
            if entry is not None:
                entry[1].expire_handoff()
                stats["ended_elsewhere"] += 1
        elif verb == b"charge":
            self._charge_for_sibling(key, body)
        else:
            raise Unreadable(f"unknown verb {verb[:32]!r}")

    def _charge_for_sibling(self, token: str, body: bytes) -> None:
        """A sibling metered the response of a request admitted here: charge
        it and release its hold in one step (restored from the message if its
        hold already expired here)."""
        try:
            d = orjson.loads(body)
            u = d["u"]
            result = MeterResult(
                model=None if d["m"] is None else str(d["m"]),
                usage=None if u is None else Usage(**u),
                complete=bool(d["c"]),
                error=None if d["e"] is None else str(d["e"]),
            )
            aborted = bool(d["a"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise Unreadable(f"{type(e).__name__}: {e}") from None
        entry = self.parked.pop(token, None) or self.remote.pop(token, None)
        proc = entry[1] if entry is not None else restore(self.ctx, str(d["r"]))
        self.ctx.stats.handoffs["charged_for_sibling"] += 1
        proc.settle(result, aborted=aborted)

    def _charge_at_admitter(
        self, proc: RequestProcessor, result: MeterResult, aborted: bool
    ) -> bool:
        """``proc.charge_elsewhere``: hand ``result`` to the worker that holds
        ``proc``'s request. False: charge it here."""
        body = orjson.dumps(
            {
                "r": payload(proc),
                "m": result.model,
                "u": None if result.usage is None else dataclasses.asdict(result.usage),
                "c": result.complete,
                "e": result.error,
                "a": aborted,
            }
        )
        token, proc.handoff_from = proc.handoff_from, ""  # nothing left to end either way
        return self.tell(b"charge " + token.encode() + b" " + body, token)

    def ended(self, proc: RequestProcessor) -> None:
        """A metering stream ended with nothing handed over: the admitting
        worker may end the hold."""
        if proc.handoff_from:
            self.tell(b"end " + proc.handoff_from.encode(), proc.handoff_from)

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
        if self.sibling(token) and self.tell(b"take " + token.encode(), token):
            proc.handoff_from = token
            proc.charge_elsewhere = self._charge_at_admitter
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


class _Siblings(asyncio.Protocol):
    """One sibling's connection: its key first, then one message per line."""

    def __init__(self, handoffs: Handoffs) -> None:
        self.handoffs = handoffs
        self.buffer = bytearray()
        self.trusted = False
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's: not an asyncio.Transport subclass
        self.handoffs.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.handoffs.connections.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (n := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:n])
            del self.buffer[: n + 1]
            if not self._line(line):
                return
        if len(self.buffer) > MAX_LINE:
            self._drop("a message longer than MAX_LINE")

    def _line(self, line: bytes) -> bool:
        handoffs = self.handoffs
        if not self.trusted:
            if not hmac.compare_digest(line, handoffs.key):
                self._drop("a connection without the group's key")
                return False
            self.trusted = True
            return True
        try:
            handoffs.on_sibling(line)
        except Unreadable as e:
            handoffs.ctx.stats.handoffs["unreadable"] += 1
            log.error("a sibling worker's handoff message unreadable", error=str(e))
        except Exception:
            handoffs.ctx.stats.internal_errors += 1
            log.exception("could not apply a sibling worker's handoff message")
        return True

    def _drop(self, what: str) -> None:
        self.handoffs.ctx.stats.handoffs["unreadable"] += 1
        log.error("handoff socket: connection dropped", reason=what)
        self.buffer.clear()
        if self.transport is not None:
            self.transport.close()


class _Peer:
    """Our connection to one sibling: lines written without waiting, kept in
    order (a kernel buffer, then ours while the sibling is busy)."""

    def __init__(self, address: str, key: bytes, ctx: Context) -> None:
        self.ctx = ctx
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        try:
            self.sock.connect(address)  # local: done at once, or refused
        except OSError:
            self.sock.close()
            raise
        self.pending = bytearray()
        self.broken = False
        self.loop = asyncio.get_running_loop()
        self.send(key)

    def send(self, line: bytes) -> None:
        if self.broken:
            raise BrokenPipeError("sibling connection broken")
        if len(self.pending) + len(line) > MAX_PENDING:
            raise BlockingIOError("sibling not reading: MAX_PENDING buffered")
        data = line + b"\n"
        if self.pending:
            self.pending += data
            return
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.close()
            raise
        if n < len(data):
            self.pending += data[n:]
            self.loop.add_writer(self.sock.fileno(), self._drain)

    def _drain(self) -> None:
        try:
            n = self.sock.send(self.pending)
        except BlockingIOError:
            return
        except OSError as e:
            # Only a sibling that died does this: its holds went with it, and
            # the charges it had not read yet with them (as a kill -9 loses
            # the usage of its last flush interval).
            lost = self.pending.count(b"\n")
            self.ctx.stats.handoffs["untold"] += lost
            log.error("lost the connection to a sibling worker", error=str(e), messages_lost=lost)
            self.close()
            return
        del self.pending[:n]
        if not self.pending:
            self.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if not self.broken:
            self.broken = True
            if self.pending:
                self.loop.remove_writer(self.sock.fileno())
            self.sock.close()


def metering_stream(first: ep.ProcessingRequest) -> bool:
    """Whether a stream is a metering stream (Envoy's observing filter)."""
    return bool(first.observability_mode)


__all__ = (
    "KEY_ENV",
    "NAMESPACE",
    "Handoffs",
    "Unreadable",
    "metering_stream",
    "payload",
    "restore",
)
