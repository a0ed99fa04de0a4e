"""A local fake LLM provider: a real HTTP/1.1 server speaking each provider's API.

``spendgate up --demo`` runs it so the quickstart needs no provider key, and
the end-to-end tests put it behind a real Envoy and call it with the official
SDKs. It records every usage it reported, so a test can compare spendgate's
spend with what the provider billed.

APIs (by path): OpenAI ``.../chat/completions``, ``.../completions``
(legacy), ``/v1/responses``, ``/v1/embeddings``, ``/v1/images/generations``
(an API spendgate does not meter; nothing billed); Anthropic
``/v1/messages``; Gemini ``/v1beta/models/{model}:generateContent`` /
``:streamGenerateContent`` (``?alt=sse`` or the JSON-array form); Bedrock
``/model/{id}/converse``, ``/converse-stream``, ``/invoke`` and
``/invoke-with-response-stream`` (AWS event stream; InvokeModel bodies in the
model family's format: Claude, Nova, Llama, Mistral, Cohere). ``stream`` is
read leniently, as vLLM reads it (``"true"`` and ``1`` stream).

Per-request knobs (request headers; Envoy passes them through):
  x-fake-prompt-tokens      all input tokens, cached and cache writes included
                            (default: 8 + the words in the request's messages)
  x-fake-cached-tokens, x-fake-cache-write-tokens, x-fake-cache-write-1h-tokens
                            the parts of the input read from / written to cache
  x-fake-completion-tokens  all output tokens, reasoning included (default 16)
  x-fake-reasoning-tokens   the reasoning part of the output
  x-fake-status             answer this HTTP status with the API's error body
  x-fake-chunks             content chunks when streaming (default 5)
  x-fake-chunk-delay-ms     pause between streamed events (paced on a schedule:
                            event i leaves i x delay after the first, so the
                            time spent writing does not add up)
  x-fake-stamp              "1": each streamed event carries an SSE comment line
                            ": t=NS" with the CLOCK_MONOTONIC nanoseconds at which
                            it was written (the benchmark's per-event latency)
  x-fake-delay-ms           pause before answering at all
  x-fake-cut-after          stream this many events after the first, then drop
                            the connection
  x-fake-gate               name of a gate: each streamed event after the first
                            waits until the caller opens the gate once
                            (FakeProviderServer.open_gate), which lets a test
                            prove chunks are not buffered
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from spendgate.demo import fake_apis
from spendgate.domain.usage import Usage

_GEMINI = re.compile(r"^/v1(?:beta)?/models/([^/:]+):(generateContent|streamGenerateContent)$")
_BEDROCK = re.compile(r"^/model/([^/]+)/(converse|converse-stream)$")
_BEDROCK_INVOKE = re.compile(r"^/model/([^/]+)/(invoke|invoke-with-response-stream)$")


@dataclass
class Billed:
    """One response's usage as the provider reported it (normalised)."""

    api: str
    model: str
    usage: Usage
    stream: bool

    @property
    def prompt_tokens(self) -> int:
        return self.usage.input_tokens or 0


LOG_LIMIT = 10_000  # records kept; `spendgate up --demo` may run for days


@dataclass
class ProviderLog:
    billed: list[Billed] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def trim(self) -> None:
        """Keep the newest LOG_LIMIT records of each kind (call with the lock held)."""
        for records in (self.billed, self.requests):
            if len(records) > LOG_LIMIT:
                del records[: len(records) - LOG_LIMIT]

    def clear(self) -> None:
        with self.lock:
            self.billed.clear()
            self.requests.clear()


def _words_in(body: dict[str, Any]) -> int:
    """A deterministic stand-in for prompt tokens: words in the request's text."""
    count = 0

    def walk(value: Any) -> None:
        nonlocal count
        if isinstance(value, str):
            count += len(value.split())
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for k, v in value.items():
                if k in ("content", "text", "input", "messages", "contents", "parts", "system"):
                    walk(v)

    walk(body)
    return count


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # separate header and body writes must not wait 40 ms
    server: FakeProviderServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _int(self, name: str, default: int) -> int:
        try:
            return int(self.headers.get(name, default))
        except ValueError:
            return default

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length", 0) or 0)
        return self.rfile.read(length) if length else b""

    def _log_request(self, raw: bytes) -> None:
        """Every request, GET included: path, headers (Host is what the route
        rewrote it to) and the start of the body."""
        with self.server.log.lock:
            self.server.log.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": dict(self.headers),
                    "body_bytes": len(raw),
                    "body": raw[:4096],
                }
            )
            self.server.log.trim()

    def do_GET(self) -> None:
        self._log_request(b"")
        if self.path.endswith("/models"):
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": "gpt-4o-mini", "object": "model", "owned_by": "spendgate-demo"}
                    ],
                },
            )
        else:
            self._send_json(
                404, {"error": {"message": "not found", "type": "invalid_request_error"}}
            )

    def do_POST(self) -> None:
        raw = self._read_body()
        path, _, query = self.path.partition("?")
        self._log_request(raw)
        api, model_in_path = self._api(path)
        if api is None:
            self._send_json(
                404, {"error": {"message": f"unknown path {path}", "type": "invalid_request_error"}}
            )
            return
        delay = self._int("x-fake-delay-ms", 0)
        if delay > 0:
            time.sleep(min(delay, 60_000) / 1000)
        status = self._int("x-fake-status", 200)
        if status != 200:
            self._send_json(status, fake_apis.error_body(api, status))
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self._send_json(
                400,
                fake_apis.error_body(api, 400)
                | (
                    {
                        "error": {
                            "message": "We could not parse the JSON body of your request.",
                            "type": "invalid_request_error",
                        }
                    }
                    if api.startswith("openai")
                    else {}
                ),
            )
            return
        if api == "openai_images":  # not metered by spendgate, and not billed here
            self._send_json(
                200, {"created": int(time.time()), "data": [{"url": "https://images.invalid/1"}]}
            )
            return
        model = model_in_path or str(body.get("model") or "gpt-4o-mini")
        usage = Usage(
            input_tokens=self._int("x-fake-prompt-tokens", 8 + _words_in(body)),
            cached_input_tokens=self._int("x-fake-cached-tokens", 0),
            cache_write_tokens=self._int("x-fake-cache-write-tokens", 0),
            cache_write_1h_tokens=self._int("x-fake-cache-write-1h-tokens", 0),
            output_tokens=self._int("x-fake-completion-tokens", 16),
            reasoning_tokens=self._int("x-fake-reasoning-tokens", 0),
        )
        chunks = self._int("x-fake-chunks", 5)
        reply = self._render(api, path, query, body, model, usage, chunks)
        stream = bool(reply.events)
        billed = Billed(api, model, usage, stream)
        if not stream:
            self._record(billed)
            self.send_response(200)
            self.send_header("content-type", reply.content_type)
            self.send_header("content-length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self._send_extra_header()
            self.end_headers()
            self.wfile.write(reply.body)
            return
        # An OpenAI (chat or legacy) completion stream reports usage only when asked to.
        asked = api not in ("openai_chat", "openai_completions")
        reports_usage = asked or b'"usage": {' in reply.events[-2]
        # Billed as the last event leaves: a client can have read it, and
        # returned, before this thread runs again.
        self._stream(reply, (lambda: self._record(billed)) if reports_usage else None)

    def _api(self, path: str) -> tuple[str | None, str | None]:
        if path.endswith("/chat/completions"):
            return "openai_chat", None
        if path.endswith("/completions"):
            return "openai_completions", None
        if path.endswith("/v1/images/generations"):
            return "openai_images", None
        if path.endswith("/v1/responses"):
            return "openai_responses", None
        if path.endswith("/v1/embeddings"):
            return "openai_embeddings", None
        if path.endswith("/v1/messages"):
            return "anthropic", None
        if m := _GEMINI.match(path):
            return "gemini", m.group(1)
        if m := _BEDROCK.match(path):
            return "bedrock", unquote(m.group(1))
        if m := _BEDROCK_INVOKE.match(path):
            return "bedrock_invoke", unquote(m.group(1))
        return None, None

    def _render(
        self,
        api: str,
        path: str,
        query: str,
        body: dict[str, Any],
        model: str,
        usage: Usage,
        chunks: int,
    ) -> fake_apis.Reply:
        if api == "openai_chat":
            return fake_apis.openai_chat(body, model, usage, chunks)
        if api == "openai_completions":
            return fake_apis.openai_completions(body, model, usage, chunks)
        if api == "bedrock_invoke":
            stream = path.endswith("/invoke-with-response-stream")
            return fake_apis.bedrock_invoke(body, model, usage, chunks, stream=stream)
        if api == "openai_responses":
            return fake_apis.openai_responses(body, model, usage, chunks)
        if api == "openai_embeddings":
            return fake_apis.openai_embeddings(body, model, usage, chunks)
        if api == "anthropic":
            return fake_apis.anthropic_messages(body, model, usage, chunks)
        if api == "gemini":
            return fake_apis.gemini(
                body,
                model,
                usage,
                chunks,
                stream=path.endswith(":streamGenerateContent"),
                alt_sse="alt=sse" in query,
            )
        return fake_apis.bedrock_converse(
            body, model, usage, chunks, stream=path.endswith("converse-stream")
        )

    def _send_extra_header(self) -> None:
        """``x-fake-response-header: name: value`` adds that header to a 200
        answer (a provider sending headers spendgate must not pass on)."""
        name, sep, value = self.headers.get("x-fake-response-header", "").partition(":")
        if sep and name.strip():
            self.send_header(name.strip(), value.strip())

    def _record(self, billed: Billed) -> None:
        with self.server.log.lock:
            self.server.log.billed.append(billed)
            self.server.log.trim()

    def _stream(self, reply: fake_apis.Reply, complete: Callable[[], None] | None) -> bool:
        """Send the events one HTTP chunk each, calling ``complete`` just
        before the last; False if the stream was cut."""
        delay = min(self._int("x-fake-chunk-delay-ms", 0), 60_000) / 1000
        stamp = self.headers.get("x-fake-stamp") == "1"
        cut_after = self._int("x-fake-cut-after", -1)
        gate = self.server.gate(self.headers.get("x-fake-gate", ""))
        self.send_response(200)
        self.send_header("content-type", reply.content_type)
        self.send_header("transfer-encoding", "chunked")
        self._send_extra_header()
        self.end_headers()
        start = time.monotonic()
        for i, event in enumerate(reply.events):
            if i > 0:
                if gate is not None and not gate.acquire(timeout=15):
                    cut_after = i - 1  # nobody asked for more: give up on this stream
                if i - 1 == cut_after:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return False
                if delay:
                    time.sleep(max(0.0, start + i * delay - time.monotonic()))
            if stamp:
                event = b": t=%d\n" % time.monotonic_ns() + event
            if i == len(reply.events) - 1 and complete is not None:
                complete()
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        return True


class FakeProviderServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Many streams open at once (the benchmark opens 32): the default backlog of 5
    # drops connections, which then wait a second for the SYN to be retried.
    request_queue_size = 128

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.log = ProviderLog()
        self._gates: dict[str, threading.Semaphore] = {}
        self._gates_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-stream is a normal event here, not a bug.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def gate(self, name: str) -> threading.Semaphore | None:
        if not name:
            return None
        with self._gates_lock:
            return self._gates.setdefault(name, threading.Semaphore(0))

    def open_gate(self, name: str) -> None:
        """Let one more event of the stream using gate ``name`` through."""
        gate = self.gate(name)
        assert gate is not None
        gate.release()

    def start_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="fake-provider", daemon=True)
        t.start()
        return t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spendgate.demo.fake_provider")
    parser.add_argument("--port", type=int, default=18080)
    # A container needs 0.0.0.0 for Envoy in another container to reach it.
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    args = parser.parse_args(argv)
    server = FakeProviderServer(host=args.host, port=args.port)
    print(f"fake provider on http://{args.host}:{server.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
