"""Response bodies of the fake provider, one renderer per provider API.

Each renderer takes the parsed request and the usage to report (normalised,
see spendgate.domain.usage) and returns either one JSON body or a list of
stream events already framed for the wire (SSE text or AWS event-stream
binary). The shapes follow each provider's documented format closely enough
for the official SDKs to parse them.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

from spendgate.domain.usage import Usage


@dataclass(frozen=True)
class Reply:
    """A whole JSON answer, or stream events (each already framed)."""

    content_type: str
    body: bytes = b""
    events: tuple[bytes, ...] = ()


def _words(n: int) -> list[str]:
    return [f"word{i} " for i in range(n)]


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n".encode()


def _json(payload: Any) -> Reply:
    return Reply("application/json", json.dumps(payload).encode())


def _n(u: int | None) -> int:
    return u or 0


def uncached_input(u: Usage) -> int:
    return max(
        _n(u.input_tokens)
        - _n(u.cached_input_tokens)
        - _n(u.cache_write_tokens)
        - _n(u.cache_write_1h_tokens),
        0,
    )


# ---- OpenAI ------------------------------------------------------------------


def _openai_usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": _n(u.input_tokens),
        "completion_tokens": _n(u.output_tokens),
        "total_tokens": _n(u.input_tokens) + _n(u.output_tokens),
        "prompt_tokens_details": {"cached_tokens": _n(u.cached_input_tokens), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": _n(u.reasoning_tokens),
            "audio_tokens": 0,
        },
    }


def openai_chat(body: dict[str, Any], model: str, u: Usage, chunks: int) -> Reply:
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.get("stream") is not True:
        return _json(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "logprobs": None,
                        "message": {
                            "role": "assistant",
                            "content": "".join(_words(chunks)),
                            "refusal": None,
                        },
                    }
                ],
                "usage": _openai_usage(u),
            }
        )
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
        )

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w}) for w in _words(chunks)]
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(
            sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _openai_usage(u),
                }
            )
        )
    events.append(sse("[DONE]"))
    return Reply("text/event-stream", events=tuple(events))


def openai_responses(body: dict[str, Any], model: str, u: Usage, chunks: int) -> Reply:
    rid = f"resp_{uuid.uuid4().hex}"
    mid = f"msg_{uuid.uuid4().hex}"
    text = "".join(_words(chunks))
    usage = {
        "input_tokens": _n(u.input_tokens),
        "input_tokens_details": {"cached_tokens": _n(u.cached_input_tokens)},
        "output_tokens": _n(u.output_tokens),
        "output_tokens_details": {"reasoning_tokens": _n(u.reasoning_tokens)},
        "total_tokens": _n(u.input_tokens) + _n(u.output_tokens),
    }

    def response(status: str, with_output: bool) -> dict[str, Any]:
        output = [
            {
                "type": "message",
                "id": mid,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "model": model,
            "output": output if with_output else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage if with_output else None,
        }

    if body.get("stream") is not True:
        return _json(response("completed", True))
    seq = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

    item = {
        "type": "message",
        "id": mid,
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    part = {"type": "output_text", "text": "", "annotations": []}
    at = {"item_id": mid, "output_index": 0, "content_index": 0}
    done_item = response("completed", True)["output"][0]
    events = [
        event("response.created", response=response("in_progress", False)),
        event("response.output_item.added", output_index=0, item=item),
        event("response.content_part.added", part=part, **at),
    ]
    events += [
        event("response.output_text.delta", delta=w, logprobs=[], **at) for w in _words(chunks)
    ]
    events += [
        event("response.output_text.done", text=text, logprobs=[], **at),
        event("response.content_part.done", part={**part, "text": text}, **at),
        event("response.output_item.done", output_index=0, item=done_item),
        event("response.completed", response=response("completed", True)),
    ]
    return Reply("text/event-stream", events=tuple(events))


def openai_embeddings(body: dict[str, Any], model: str, u: Usage, chunks: int) -> Reply:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) and inputs and isinstance(inputs[0], str) else 1
    vector = [0.25, -0.5, 0.125, 1.0]
    b64 = body.get("encoding_format") == "base64"
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(struct.pack("<4f", *vector)).decode() if b64 else vector,
        }
        for i in range(count)
    ]
    return _json(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": _n(u.input_tokens), "total_tokens": _n(u.input_tokens)},
        }
    )


# ---- Anthropic -----------------------------------------------------------------


def _anthropic_usage(u: Usage, output: int) -> dict[str, Any]:
    return {
        "input_tokens": uncached_input(u),
        "cache_creation_input_tokens": _n(u.cache_write_tokens) + _n(u.cache_write_1h_tokens),
        "cache_read_input_tokens": _n(u.cached_input_tokens),
        "cache_creation": {
            "ephemeral_5m_input_tokens": _n(u.cache_write_tokens),
            "ephemeral_1h_input_tokens": _n(u.cache_write_1h_tokens),
        },
        "output_tokens": output,
        "service_tier": "standard",
    }


def anthropic_messages(body: dict[str, Any], model: str, u: Usage, chunks: int) -> Reply:
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    text = "".join(_words(chunks))
    message = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(u, _n(u.output_tokens)),
    }
    if body.get("stream") is not True:
        return _json(message)
    start = {**message, "content": [], "stop_reason": None, "usage": _anthropic_usage(u, 1)}
    events = [
        sse({"type": "message_start", "message": start}, "message_start"),
        sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        sse({"type": "ping"}, "ping"),
    ]
    events += [
        sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
            "content_block_delta",
        )
        for w in _words(chunks)
    ]
    events += [
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": _n(u.output_tokens)},
            },
            "message_delta",
        ),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    return Reply("text/event-stream", events=tuple(events))


# ---- Google Gemini ---------------------------------------------------------------


def gemini(
    body: dict[str, Any], model: str, u: Usage, chunks: int, *, stream: bool, alt_sse: bool
) -> Reply:
    reasoning = _n(u.reasoning_tokens)
    meta: dict[str, Any] = {
        "promptTokenCount": _n(u.input_tokens),
        "candidatesTokenCount": _n(u.output_tokens) - reasoning,
        "totalTokenCount": _n(u.input_tokens) + _n(u.output_tokens),
    }
    if u.cached_input_tokens:
        meta["cachedContentTokenCount"] = u.cached_input_tokens
    if reasoning:
        meta["thoughtsTokenCount"] = reasoning
    rid = uuid.uuid4().hex[:16]

    def response(text: str, final: bool, usage: dict[str, Any]) -> dict[str, Any]:
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": text}], "role": "model"},
            "index": 0,
        }
        if final:
            candidate["finishReason"] = "STOP"
        return {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": rid,
        }

    words = _words(chunks)
    if not stream:
        return _json(response("".join(words), True, meta))
    partial = {
        "promptTokenCount": meta["promptTokenCount"],
        "totalTokenCount": meta["promptTokenCount"],
    }
    objects = [
        response(w, i == len(words) - 1, meta if i == len(words) - 1 else partial)
        for i, w in enumerate(words)
    ]
    if alt_sse:
        return Reply(
            "text/event-stream",
            events=tuple(f"data: {json.dumps(o)}\r\n\r\n".encode() for o in objects),
        )
    # The default streaming form: one JSON array, elements as they are ready.
    parts = [("[" if i == 0 else ",\r\n") + json.dumps(o, indent=2) for i, o in enumerate(objects)]
    parts[-1] += "]"
    return Reply("application/json; charset=UTF-8", events=tuple(p.encode() for p in parts))


# ---- AWS Bedrock --------------------------------------------------------------------


def eventstream_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One frame of application/vnd.amazon.eventstream (string headers only)."""
    raw_headers = b""
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        raw_headers += bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(raw_headers))
    head = prelude + struct.pack(">I", zlib.crc32(prelude))
    message = head + raw_headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _bedrock_event(kind: str, payload: dict[str, Any]) -> bytes:
    return eventstream_message(
        {":event-type": kind, ":content-type": "application/json", ":message-type": "event"},
        json.dumps({**payload, "p": "abcdefghijklmnopqrstuvwxyz"}).encode(),
    )


def bedrock_converse(
    body: dict[str, Any], model: str, u: Usage, chunks: int, *, stream: bool
) -> Reply:
    usage = {
        "inputTokens": uncached_input(u),
        "outputTokens": _n(u.output_tokens),
        "totalTokens": _n(u.input_tokens) + _n(u.output_tokens),
        "cacheReadInputTokens": _n(u.cached_input_tokens),
        "cacheWriteInputTokens": _n(u.cache_write_tokens),
    }
    words = _words(chunks)
    if not stream:
        return _json(
            {
                "output": {"message": {"role": "assistant", "content": [{"text": "".join(words)}]}},
                "stopReason": "end_turn",
                "usage": usage,
                "metrics": {"latencyMs": 12},
            }
        )
    events = [_bedrock_event("messageStart", {"role": "assistant"})]
    events += [
        _bedrock_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": w}})
        for w in words
    ]
    events += [
        _bedrock_event("contentBlockStop", {"contentBlockIndex": 0}),
        _bedrock_event("messageStop", {"stopReason": "end_turn"}),
        _bedrock_event("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}),
    ]
    return Reply("application/vnd.amazon.eventstream", events=tuple(events))


# ---- errors, in each API's dialect ------------------------------------------------------


def error_body(api: str, status: int) -> dict[str, Any]:
    message = f"fake provider error {status}"
    if api == "anthropic":
        return {"type": "error", "error": {"type": "api_error", "message": message}}
    if api == "gemini":
        return {"error": {"code": status, "message": message, "status": "INTERNAL"}}
    if api == "bedrock":
        return {"message": message}
    return {"error": {"message": message, "type": "server_error", "code": None}}
