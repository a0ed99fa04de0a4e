"""A local, OpenAI-compatible fake LLM provider: a real HTTP/1.1 server.

``spendgate up --demo`` runs it so the quickstart needs no provider key, and
the end-to-end tests put it behind a real Envoy. It answers
``POST .../chat/completions`` as OpenAI does (JSON, or SSE when ``stream`` is
true, with a usage chunk when ``stream_options.include_usage`` is true) and
records every usage it reported, so a test can compare spendgate's spend
with what the provider billed.

Per-request knobs (request headers; Envoy passes them through):
  x-fake-prompt-tokens, x-fake-completion-tokens, x-fake-cached-tokens,
  x-fake-reasoning-tokens   usage to report
  x-fake-status             answer this HTTP status with an OpenAI error body
  x-fake-chunks             number of content chunks when streaming (default 5)
  x-fake-chunk-delay-ms     pause between streamed chunks
  x-fake-cut-after          stream this many chunks, then drop the connection
  x-fake-gate               name of a gate: each content chunk waits until the
                            caller opens the gate once (FakeProviderServer.open_gate),
                            which lets a test prove chunks are not buffered
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Billed:
    """One response's usage as the provider reported it."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    stream: bool


@dataclass
class ProviderLog:
    billed: list[Billed] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.billed.clear()
            self.requests.clear()


def _int_header(handler: BaseHTTPRequestHandler, name: str, default: int) -> int:
    try:
        return int(handler.headers.get(name, default))
    except ValueError:
        return default


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # separate header and body writes must not wait 40 ms
    server: FakeProviderServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.endswith("/models"):
            self._json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": "gpt-4o-mini", "object": "model", "owned_by": "spendgate-demo"}
                    ],
                },
            )
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        raw = self.rfile.read(length) if length else b""
        log = self.server.log
        with log.lock:
            log.requests.append(
                {
                    "path": self.path,
                    "headers": dict(self.headers.items()),
                    "body_bytes": len(raw),
                    "body": raw[:4096],
                }
            )
        if not self.path.split("?")[0].endswith("/chat/completions"):
            self._json(
                404,
                {
                    "error": {
                        "message": f"unknown path {self.path}",
                        "type": "invalid_request_error",
                    }
                },
            )
            return
        status = _int_header(self, "x-fake-status", 200)
        if status != 200:
            self._json(
                status,
                {
                    "error": {
                        "message": f"fake provider error {status}",
                        "type": "server_error",
                        "code": None,
                    }
                },
            )
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self._json(
                400,
                {
                    "error": {
                        "message": "We could not parse the JSON body of your request.",
                        "type": "invalid_request_error",
                    }
                },
            )
            return
        model = str(body.get("model") or "gpt-4o-mini")
        messages = body.get("messages") or []
        words = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
        usage = Billed(
            model=model,
            prompt_tokens=_int_header(self, "x-fake-prompt-tokens", 8 + words),
            completion_tokens=_int_header(self, "x-fake-completion-tokens", 16),
            cached_tokens=_int_header(self, "x-fake-cached-tokens", 0),
            reasoning_tokens=_int_header(self, "x-fake-reasoning-tokens", 0),
            stream=body.get("stream") is True,
        )
        if usage.stream:
            self._stream(body, usage)
        else:
            self._complete(usage)

    def _usage_json(self, u: Billed) -> dict[str, Any]:
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": u.reasoning_tokens,
                "audio_tokens": 0,
            },
        }

    def _complete(self, u: Billed) -> None:
        with self.server.log.lock:
            self.server.log.billed.append(u)
        self._json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": u.model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {
                            "role": "assistant",
                            "content": " ".join(["spend"] * u.completion_tokens),
                        },
                    }
                ],
                "usage": self._usage_json(u),
            },
        )

    def _stream(self, body: dict[str, Any], u: Billed) -> None:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        chunks = _int_header(self, "x-fake-chunks", 5)
        delay = _int_header(self, "x-fake-chunk-delay-ms", 0) / 1000
        cut_after = _int_header(self, "x-fake-cut-after", -1)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def send(payload: str) -> None:
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return json.dumps(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": u.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    **({"usage": None} if include_usage else {}),
                }
            )

        gate = self.server.gate(self.headers.get("x-fake-gate", ""))
        send(chunk({"role": "assistant", "content": ""}))
        for i in range(chunks):
            if gate is not None and not gate.acquire(timeout=15):
                cut_after = i  # the caller never asked for more: give up on this stream
            if i == cut_after:
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            if delay:
                time.sleep(delay)
            send(chunk({"content": f"word{i} "}))
        send(chunk({}, "stop"))
        if include_usage:
            with self.server.log.lock:
                self.server.log.billed.append(u)
            send(
                json.dumps(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": u.model,
                        "choices": [],
                        "usage": self._usage_json(u),
                    }
                )
            )
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class FakeProviderServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.log = ProviderLog()
        self._gates: dict[str, threading.Semaphore] = {}
        self._gates_lock = threading.Lock()

    def gate(self, name: str) -> threading.Semaphore | None:
        if not name:
            return None
        with self._gates_lock:
            return self._gates.setdefault(name, threading.Semaphore(0))

    def open_gate(self, name: str) -> None:
        """Let one more chunk of the stream using gate ``name`` through."""
        gate = self.gate(name)
        assert gate is not None
        gate.release()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="fake-provider", daemon=True)
        t.start()
        return t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spendgate.demo.fake_provider")
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args(argv)
    server = FakeProviderServer(port=args.port)
    print(f"fake provider on http://127.0.0.1:{server.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
