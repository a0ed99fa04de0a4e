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
from dataclasses import dataclass, field
from typing import Any

from spendgate.domain.usage import Usage


@dataclass(frozen=True)
class Reply:
    """A whole JSON answer, or stream events (each already framed)."""

    content_type: str
    body: bytes = b""
    events: tuple[bytes, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)  # more response headers


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


_TRUE = {"1", "on", "t", "true", "y", "yes"}


def streams(value: Any) -> bool:
    """Whether ``stream`` asks for a stream, read leniently, as servers that
    validate requests with pydantic (vLLM, LiteLLM) read it: ``true``, ``1``
    and strings such as "true" or "yes" all do."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in _TRUE


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
    if not streams(body.get("stream")):
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


def openai_completions(body: dict[str, Any], model: str, u: Usage, chunks: int) -> Reply:
    """The legacy completions API (``/v1/completions``)."""
    cid = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    words = _words(chunks)

    def completion(text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    if not streams(body.get("stream")):
        return _json({**completion("".join(words), "length"), "usage": _openai_usage(u)})
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    extra = {"usage": None} if include_usage else {}
    events = [sse({**completion(w, None), **extra}) for w in words]
    events.append(sse({**completion("", "length"), **extra}))
    if include_usage:
        events.append(sse({**completion("", None), "choices": [], "usage": _openai_usage(u)}))
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


def _invoke_chunk(obj: dict[str, Any]) -> bytes:
    """One ``chunk`` event of InvokeModelWithResponseStream: base64 JSON bytes."""
    payload = {"bytes": base64.b64encode(json.dumps(obj).encode()).decode(), "p": "abcdef"}
    return eventstream_message(
        {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
        json.dumps(payload).encode(),
    )


def bedrock_invoke(
    body: dict[str, Any], model: str, u: Usage, chunks: int, *, stream: bool
) -> Reply:
    """InvokeModel / InvokeModelWithResponseStream, in the body format of the
    model's family (Claude, Nova, Llama, Mistral, Cohere: by model id). Usage
    goes where Bedrock puts it: the family's own fields, the
    ``x-amzn-bedrock-*-token-count`` headers of every InvokeModel answer, and
    the invocation metrics of a stream's last chunk."""
    family = next(
        (f for f in ("anthropic", "nova", "llama", "mistral", "cohere") if f in model), "llama"
    )
    words = _words(chunks)
    text = "".join(words)
    counts = {
        "input": uncached_input(u),
        "output": _n(u.output_tokens),
        "cache-read-input": _n(u.cached_input_tokens),
        "cache-write-input": _n(u.cache_write_tokens) + _n(u.cache_write_1h_tokens),
    }
    metrics = {
        "amazon-bedrock-invocationMetrics": {
            "inputTokenCount": counts["input"],
            "outputTokenCount": counts["output"],
            "invocationLatency": 120,
            "firstByteLatency": 40,
            "cacheReadInputTokenCount": counts["cache-read-input"],
            "cacheWriteInputTokenCount": counts["cache-write-input"],
        }
    }
    if not stream:
        headers = {f"x-amzn-bedrock-{k}-token-count": str(v) for k, v in counts.items()}
        return Reply("application/json", _invoke_body(family, body, model, u, text), (), headers)
    objects = _invoke_stream(family, model, u, words)
    objects[-1] = {**objects[-1], **metrics}
    return Reply(
        "application/vnd.amazon.eventstream", events=tuple(_invoke_chunk(o) for o in objects)
    )


def _invoke_body(family: str, body: dict[str, Any], model: str, u: Usage, text: str) -> bytes:
    if family == "anthropic":
        reply = anthropic_messages({}, model, u, 0)
        message = json.loads(reply.body)
        message["content"] = [{"type": "text", "text": text}]
        return json.dumps(message).encode()
    if family == "nova":
        payload: dict[str, Any] = {
            "output": {"message": {"content": [{"text": text}], "role": "assistant"}},
            "stopReason": "end_turn",
            "usage": {
                "inputTokens": uncached_input(u),
                "outputTokens": _n(u.output_tokens),
                "totalTokens": _n(u.input_tokens) + _n(u.output_tokens),
                "cacheReadInputTokenCount": _n(u.cached_input_tokens),
                "cacheWriteInputTokenCount": _n(u.cache_write_tokens),
            },
        }
    elif family == "llama":
        payload = {
            "generation": text,
            "prompt_token_count": _n(u.input_tokens),
            "generation_token_count": _n(u.output_tokens),
            "stop_reason": "stop",
        }
    elif family == "mistral":
        payload = {"outputs": [{"text": text, "stop_reason": "stop"}]}
    else:
        payload = {
            "response_id": uuid.uuid4().hex,
            "text": text,
            "generation_id": uuid.uuid4().hex,
            "chat_history": [],
            "finish_reason": "COMPLETE",
        }
    return json.dumps(payload).encode()


def _invoke_stream(family: str, model: str, u: Usage, words: list[str]) -> list[dict[str, Any]]:
    """The decoded chunks of a stream (the last one gets the invocation metrics)."""
    if family == "anthropic":
        start = json.loads(anthropic_messages({}, model, u, 0).body)
        start.update(content=[], stop_reason=None, usage=_anthropic_usage(u, 1))
        return [
            {"type": "message_start", "message": start},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
            *(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                }
                for w in words
            ),
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": _n(u.output_tokens)},
            },
            {"type": "message_stop"},
        ]
    if family == "nova":
        return [
            {"messageStart": {"role": "assistant"}},
            *({"contentBlockDelta": {"delta": {"text": w}, "contentBlockIndex": 0}} for w in words),
            {"contentBlockStop": {"contentBlockIndex": 0}},
            {"messageStop": {"stopReason": "end_turn"}},
            {
                "metadata": {
                    "usage": {
                        "inputTokens": uncached_input(u),
                        "outputTokens": _n(u.output_tokens),
                        "cacheReadInputTokenCount": _n(u.cached_input_tokens),
                        "cacheWriteInputTokenCount": _n(u.cache_write_tokens),
                    }
                }
            },
        ]
    out: list[dict[str, Any]]
    if family == "llama":
        out = [
            {
                "generation": w,
                "prompt_token_count": _n(u.input_tokens) if i == 0 else None,
                "generation_token_count": i + 1,
                "stop_reason": None,
            }
            for i, w in enumerate(words)
        ]
        out.append(
            {
                "generation": "",
                "prompt_token_count": None,
                "generation_token_count": _n(u.output_tokens),
                "stop_reason": "stop",
            }
        )
        return out
    if family == "mistral":
        out = [{"outputs": [{"text": w, "stop_reason": None}]} for w in words]
        return [*out, {"outputs": [{"text": "", "stop_reason": "stop"}]}]
    return [
        {"is_finished": False, "event_type": "stream-start"},
        *({"is_finished": False, "event_type": "text-generation", "text": w} for w in words),
        {"is_finished": True, "event_type": "stream-end", "finish_reason": "COMPLETE"},
    ]


# ---- errors, in each API's dialect ------------------------------------------------------


def error_body(api: str, status: int) -> dict[str, Any]:
    message = f"fake provider error {status}"
    if api == "anthropic":
        return {"type": "error", "error": {"type": "api_error", "message": message}}
    if api == "gemini":
        return {"error": {"code": status, "message": message, "status": "INTERNAL"}}
    if api.startswith("bedrock"):
        return {"message": message}
    return {"error": {"message": message, "type": "server_error", "code": None}}
