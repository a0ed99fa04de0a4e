"""Provider answers a broken provider sends: usage numbers huge, negative,
fractional, textual, missing, duplicated, 1 MB long, in the JSON and
streaming forms of the OpenAI, Anthropic and Gemini APIs, cut into HTTP
chunks anywhere."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from spendgate.domain.usage import Usage
from tests.fuzz import values
from tests.fuzz.provider import Reply


@dataclass(frozen=True)
class Raw:
    """A JSON token written as is: NaN, Infinity, 1e999, -0."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """A JSON object that may repeat a key."""

    items: tuple[tuple[str, Any], ...]


def render(v: Any) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{render(x)}" for k, x in v.items) + "}"
    if isinstance(v, dict):
        return render(Pairs(tuple(v.items())))
    if isinstance(v, list):
        return "[" + ",".join(render(x) for x in v) + "]"
    return json.dumps(v)


USAGE_KEYS = {
    "openai": (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details.cached_tokens",
        "completion_tokens_details.reasoning_tokens",
    ),
    "anthropic": (
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation.ephemeral_5m_input_tokens",
        "cache_creation.ephemeral_1h_input_tokens",
    ),
    "gemini": (
        "promptTokenCount",
        "candidatesTokenCount",
        "totalTokenCount",
        "cachedContentTokenCount",
        "thoughtsTokenCount",
    ),
}
# The request each API is called with (model known to the price catalog).
CALLS = {
    "openai": ("/v1/chat/completions", "gpt-4o-mini", (("authorization", "Bearer sk-fuzz"),)),
    "anthropic": (
        "/v1/messages",
        "claude-3-5-haiku-20241022",
        (("x-api-key", "sk-ant-fuzz"), ("anthropic-version", "2023-06-01")),
    ),
    "gemini": (
        "/v1beta/models/gemini-2.0-flash:{method}",
        "gemini-2.0-flash",
        (("x-goog-api-key", "AIza-fuzz"),),
    ),
}


def token_value() -> st.SearchStrategy[Any]:
    return st.one_of(
        values.token_count(),
        st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("-0")]),
    )


def usage(api: str) -> st.SearchStrategy[Any]:
    keys = USAGE_KEYS[api]

    def nest(pairs: list[tuple[str, Any]]) -> Pairs:
        top: list[tuple[str, Any]] = []
        for key, value in pairs:
            outer, _, inner = key.partition(".")
            top.append((outer, Pairs(((inner, value),)) if inner else value))
        return Pairs(tuple(top))

    entry = st.tuples(
        st.one_of(st.sampled_from(keys), st.sampled_from(keys), st.text(max_size=8)), token_value()
    )
    sane = st.tuples(st.sampled_from(keys), st.integers(0, 5000))
    primary = st.tuples(*(st.tuples(st.just(k), st.integers(0, 5000)) for k in PRIMARY[api])).map(
        list
    )
    return st.one_of(
        primary.map(nest),
        st.lists(st.one_of(sane, entry), max_size=8).map(nest),  # keys may repeat
        st.sampled_from([None, "usage", [], 0, Raw("NaN")]),
        values.big_text((1_000_000,)),
    )


# The input and output counts of each API: an answer that reports exactly
# these two, as plain integers, has one right charge.
PRIMARY = {
    "openai": ("prompt_tokens", "completion_tokens"),
    "anthropic": ("input_tokens", "output_tokens"),
    "gemini": ("promptTokenCount", "candidatesTokenCount"),
}


def plain_usage(api: str, u: Any) -> Usage | None:
    """The Usage a well-formed report means, or None if ``u`` is anything else."""
    if not isinstance(u, Pairs):
        return None
    keys = [k for k, _ in u.items]
    if sorted(keys) != sorted(PRIMARY[api]):
        return None
    counts = dict(u.items)
    if not all(type(v) is int and 0 <= v <= 10_000 for v in counts.values()):
        return None
    return Usage(input_tokens=counts[PRIMARY[api][0]], output_tokens=counts[PRIMARY[api][1]])


@dataclass(frozen=True)
class Answer:
    api: str
    stream: bool
    reply: Reply
    # What the answer must be charged, when that is known (a plain report).
    expected: Usage | None = None

    def __repr__(self) -> str:
        body = self.reply.body
        text = repr(body if len(body) <= 1500 else body[:1500] + b"...")
        return (
            f"Answer({self.api}, stream={self.stream}, status={self.reply.status}, "
            f"{len(body)} bytes in {len(self.reply.parts)} parts: {text})"
        )

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def _openai(u: Any, model: Any, pad: Any, stream: bool) -> tuple[str, list[str]]:
    message = {"role": "assistant", "content": "hi"}
    if not stream:
        doc = Pairs(
            (
                ("id", "chatcmpl-fuzz"),
                ("object", "chat.completion"),
                ("model", model),
                ("choices", [{"index": 0, "message": message, "finish_reason": "stop"}]),
                ("usage", u),
                ("pad", pad),
            )
        )
        return "application/json", [render(doc)]
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": model}
    events = [
        render({**chunk, "choices": [{"index": 0, "delta": {"content": "hi"}}]}),
        render(Pairs((*chunk.items(), ("choices", []), ("usage", u), ("pad", pad)))),
        "[DONE]",
    ]
    return "text/event-stream", [f"data: {e}\n\n" for e in events]


def _anthropic(u: Any, model: Any, pad: Any, stream: bool) -> tuple[str, list[str]]:
    message = {"id": "msg_fuzz", "type": "message", "role": "assistant", "model": model}
    if not stream:
        doc = Pairs(
            (
                *message.items(),
                ("content", [{"type": "text", "text": "hi"}]),
                ("stop_reason", "end_turn"),
                ("usage", u),
                ("pad", pad),
            )
        )
        return "application/json", [render(doc)]
    events = [
        (
            "message_start",
            {"type": "message_start", "message": Pairs((*message.items(), ("usage", u)))},
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hi"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            Pairs(
                (
                    ("type", "message_delta"),
                    ("delta", {"stop_reason": "end_turn"}),
                    ("usage", u),
                    ("pad", pad),
                )
            ),
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return "text/event-stream", [f"event: {name}\ndata: {render(doc)}\n\n" for name, doc in events]


def _gemini(u: Any, model: Any, pad: Any, stream: bool) -> tuple[str, list[str]]:
    candidate = {"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}
    doc = Pairs(
        (("candidates", [candidate]), ("usageMetadata", u), ("modelVersion", model), ("pad", pad))
    )
    if not stream:
        return "application/json", [render(doc)]
    first = {
        "candidates": [{"content": {"parts": [{"text": "h"}], "role": "model"}}],
        "modelVersion": model,
    }
    return "text/event-stream", [f"data: {render(first)}\r\n\r\n", f"data: {render(doc)}\r\n\r\n"]


FORMS = {"openai": _openai, "anthropic": _anthropic, "gemini": _gemini}


def _split(data: bytes, cuts: list[int]) -> tuple[bytes, ...]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, last = [], 0
    for p in points:
        parts.append(data[last:p])
        last = p
    parts.append(data[last:])
    return tuple(p for p in parts if p)


@st.composite
def answer(draw: st.DrawFn) -> Answer:
    api = draw(st.sampled_from(sorted(FORMS)))
    stream = draw(st.booleans())
    u = draw(usage(api))
    model = draw(
        st.one_of(
            st.just(CALLS[api][1]),
            st.sampled_from(["", "gpt-4o", None, 5]),
            values.big_text((1_000_000,)),
        )
    )
    pad = draw(st.one_of(st.none(), values.big_text((1_000_000,))))
    content_type, events = FORMS[api](u, model, pad, stream)
    status = draw(st.sampled_from([200, 200, 200, 200, 400, 429, 500, 529]))
    cuts = draw(st.lists(st.integers(0, 2**31), max_size=6))
    parts = tuple(p for e in events for p in _split(e.encode(), cuts))
    # A 1 MB field is beyond what ext_proc buffers of one stream event (1 MiB):
    # such an answer is estimated, not charged from its report.
    known = status == 200 and model == CALLS[api][1] and pad is None
    plain = plain_usage(api, u) if known else None
    reply = Reply(status, content_type, parts or (b"",), chunked=stream or bool(cuts))
    return Answer(api, stream, reply, plain)
