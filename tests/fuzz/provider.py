"""A fake provider whose answers the fuzz tests write byte for byte.

The demo provider (spendgate.demo.fake_provider) renders well-formed answers
of every API; the fuzz tests need answers no well-behaved provider sends
(usage of -1, 1e999, "12", a 1 MB key, the same key twice). A request naming a
registered reply in ``x-fuzz-reply`` gets exactly that reply; every other
request is answered by the demo provider as usual. Every answer of this
provider carries ``x-fuzz-provider: 1``, so a test can tell a provider answer
from one Envoy or spendgate made up.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from spendgate.demo import fake_provider

MARK = "x-fuzz-provider"


@dataclass(frozen=True)
class Reply:
    """One scripted answer: sent with content-length unless ``chunked``."""

    status: int
    content_type: str
    parts: tuple[bytes, ...]
    chunked: bool = False
    headers: tuple[tuple[str, str], ...] = field(default=())

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


class _Replies:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = itertools.count(1)
        self._replies: dict[str, Reply] = {}

    def add(self, reply: Reply) -> str:
        with self._lock:
            key = f"r{next(self._next)}"
            self._replies[key] = reply
            return key

    def pop(self, key: str) -> Reply | None:
        with self._lock:
            return self._replies.pop(key, None)


REPLIES = _Replies()


class ScriptedHandler(fake_provider._Handler):
    def end_headers(self) -> None:
        self.send_header(MARK, "1")
        super().end_headers()

    # The demo provider speaks POST (and GET without a body); a fuzzed client
    # sends any method with any body. Read it all and answer, so the
    # connection stays usable for Envoy's next request.
    def do_GET(self) -> None:
        self._read_body()
        super().do_GET()

    def _not_allowed(self) -> None:
        self._read_body()
        self._send_json(
            405, {"error": {"message": "method not allowed", "type": "invalid_request_error"}}
        )

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def do_POST(self) -> None:
        key = self.headers.get("x-fuzz-reply")
        reply = REPLIES.pop(key) if key else None
        if reply is None:
            super().do_POST()
            return
        self._read_body()
        self.send_response(reply.status)
        self.send_header("content-type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        if not reply.chunked:
            self.send_header("content-length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
            return
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for part in reply.parts:
            if part:
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def script(server: fake_provider.FakeProviderServer) -> None:
    """Make ``server`` (already serving) answer scripted replies too."""
    server.RequestHandlerClass = ScriptedHandler
