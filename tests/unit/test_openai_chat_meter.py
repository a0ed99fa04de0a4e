"""OpenAIChatMeter: fixtures from OpenAI's documented shapes, edge cases, properties."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_proc.meters.base import Meter, MeterResult, estimate_tokens_from_chars
from ext_proc.meters.openai_chat import OpenAIChatMeter
from spendgate.domain.usage import Usage

FIXTURES = Path(__file__).parent.parent / "fixtures" / "openai"
STREAMS = sorted(p.name for p in FIXTURES.glob("*.sse"))
MINI = "gpt-4o-mini-2024-07-18"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def meter(*chunks: bytes, streaming: bool, aborted: bool = False, **kw: Any) -> MeterResult:
    m: Meter = OpenAIChatMeter(streaming=streaming, **kw)
    for chunk in chunks:
        m.feed(chunk)
    return m.finish(aborted=aborted)


def sse(*events: object) -> bytes:
    """An event stream: dicts become JSON, bytes are sent as they are."""
    datas = [e if isinstance(e, bytes) else orjson.dumps(e) for e in events]
    return b"".join(b"data: " + d + b"\n\n" for d in datas)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


def exact(model: str | None, usage: Usage) -> MeterResult:
    return MeterResult(model=model, usage=usage, complete=True, error=None)


def estimated(model: str | None, chars: int, error: str) -> MeterResult:
    usage = Usage(output_tokens=estimate_tokens_from_chars(chars), estimated=True)
    return MeterResult(model=model, usage=usage, complete=False, error=error)


def failed(error: str, model: str | None = None) -> MeterResult:
    return MeterResult(model=model, usage=None, complete=False, error=error)


FIXTURE_RESULTS = {
    "chat_basic.json": exact(MINI, Usage(19, 0, output_tokens=10, reasoning_tokens=0)),
    "chat_cached.json": exact(
        "gpt-4o-2024-08-06", Usage(2006, 1920, output_tokens=19, reasoning_tokens=0)
    ),
    "chat_reasoning.json": exact(
        "o3-mini-2025-01-31", Usage(25, 0, output_tokens=786, reasoning_tokens=768)
    ),
    "chat_error.json": failed("provider error"),
    "chat_stream_usage.sse": exact(MINI, Usage(19, 0, output_tokens=10, reasoning_tokens=0)),
    # "The capital of France is Paris." = 31 chars -> 8 tokens
    "chat_stream_no_usage.sse": estimated("gpt-4o-2024-08-06", 31, "no usage in stream"),
    "chat_stream_vllm_usage_in_choice.sse": exact("Qwen/Qwen3-8B", Usage(12, output_tokens=21)),
    "chat_stream_tool_calls.sse": exact(MINI, Usage(82, 0, output_tokens=17, reasoning_tokens=0)),
}


@pytest.mark.parametrize(
    ("name", "expected"), [pytest.param(n, r, id=n) for n, r in FIXTURE_RESULTS.items()]
)
def test_fixture(name: str, expected: MeterResult) -> None:
    data = fixture(name)
    streaming = name.endswith(".sse")
    assert meter(data, streaming=streaming) == expected
    assert meter(*(bytes([b]) for b in data), streaming=streaming) == expected


def test_estimate_tokens_from_chars() -> None:
    assert [estimate_tokens_from_chars(n) for n in (-1, 0, 1, 4, 5, 8, 9)] == [0, 0, 1, 1, 2, 2, 3]


# -- non-streaming -------------------------------------------------------------

U = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
MSG = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "abcdefghi"}}]}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            {"model": "m", "usage": U}, exact("m", Usage(10, output_tokens=5)), id="no-details"
        ),
        pytest.param(
            {"usage": {**U, "prompt_tokens_details": None, "completion_tokens_details": None}},
            exact(None, Usage(10, output_tokens=5)),
            id="null-details",
        ),
        pytest.param(
            {"usage": {**U, "prompt_tokens_details": {"cached_tokens": None}}},
            exact(None, Usage(10, output_tokens=5)),
            id="null-cached-count",
        ),
        pytest.param(
            {"usage": {**U, "prompt_tokens_details": [], "completion_tokens_details": "x"}},
            exact(None, Usage(10, output_tokens=5)),
            id="details-not-objects",
        ),
        pytest.param(
            {"usage": {"prompt_tokens": True, "completion_tokens": 5}},
            exact(None, Usage(output_tokens=5)),
            id="bool-is-not-int",
        ),
        pytest.param(
            {"usage": {"prompt_tokens": "10", "completion_tokens": 5.0, "total_tokens": 15}},
            failed("no usage in response"),
            id="str-and-float-counts",
        ),
        pytest.param(
            {"model": "m", "usage": {}, **MSG},
            estimated("m", 9, "no usage in response"),
            id="empty-usage-estimates",
        ),
        pytest.param(
            {"model": "m", **MSG},
            estimated("m", 9, "no usage in response"),
            id="no-usage-estimates",
        ),
        pytest.param(
            {"model": "m", "usage": None},
            failed("no usage in response", "m"),
            id="no-usage-nothing-to-estimate",
        ),
        pytest.param(
            {"object": "error", "message": "bad", "code": 400},
            failed("provider error"),
            id="vllm-error-object",
        ),
        pytest.param([1, 2], failed("invalid json"), id="not-an-object"),
    ],
)
def test_json_body(body: object, expected: MeterResult) -> None:
    assert meter(orjson.dumps(body), streaming=False) == expected


@pytest.mark.parametrize(
    ("chunks", "aborted", "expected"),
    [
        pytest.param([b""], False, failed("invalid json"), id="empty-body"),
        pytest.param([b'{"model": '], False, failed("invalid json"), id="truncated"),
        pytest.param([b'{"model": '], True, failed("response aborted"), id="truncated-aborted"),
        pytest.param(
            [b'{"usage": {"prompt_tokens": -1, "completion_tokens": 123456789012345678901234}}'],
            False,
            failed("no usage in response"),
            id="negative-and-huge-counts",
        ),
        pytest.param([b"<html>502</html>"], False, failed("invalid json"), id="html"),
        pytest.param([b"x" * 60, b"x" * 60], False, failed("body too large"), id="too-large"),
        pytest.param(
            [orjson.dumps({"model": "m", "usage": U})],
            True,
            exact("m", Usage(10, output_tokens=5)),
            id="complete-body-then-abort",
        ),
    ],
)
def test_raw_body(chunks: list[bytes], aborted: bool, expected: MeterResult) -> None:
    assert meter(*chunks, streaming=False, aborted=aborted, max_body_bytes=100) == expected


# -- streaming -----------------------------------------------------------------


def chunk(model: str = "m", usage: object = None, **delta: object) -> dict[str, object]:
    return {
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        "usage": usage,
    }


USAGE_CHUNK = {"model": "m", "choices": [], "usage": U}
STREAM = fixture("chat_stream_usage.sse")
BEFORE_USAGE = STREAM[: STREAM.rindex(b"data: {")]  # cut before the usage chunk
WITH_USAGE = STREAM[: STREAM.rindex(b"data: [DONE]")]  # cut before [DONE]
HELLO = len("Hello! How can I assist you today?")


@pytest.mark.parametrize(
    ("stream", "aborted", "expected"),
    [
        pytest.param(BEFORE_USAGE, True, estimated(MINI, HELLO, "stream aborted"), id="aborted"),
        pytest.param(
            BEFORE_USAGE,
            False,
            estimated(MINI, HELLO, "no usage in stream"),
            id="ended-without-usage",
        ),
        pytest.param(
            WITH_USAGE,
            True,
            exact(MINI, Usage(19, 0, output_tokens=10, reasoning_tokens=0)),
            id="aborted-after-usage",
        ),
        pytest.param(
            sse(chunk(content="abcde"), b"[DONE]"),
            True,
            estimated("m", 5, "no usage in stream"),
            id="aborted-after-done",
        ),
        pytest.param(b"", True, failed("stream aborted"), id="aborted-before-anything"),
        pytest.param(
            b": keep-alive\n\n", False, failed("no usage in stream"), id="nothing-streamed"
        ),
        pytest.param(
            sse(chunk(content="abc"), {"error": {"message": "overloaded"}}),
            False,
            estimated("m", 3, "provider error"),
            id="error-event-mid-stream",
        ),
        pytest.param(
            fixture("chat_error.json"),
            False,
            failed("provider error"),
            id="json-error-body-on-stream-request",
        ),
        pytest.param(
            b"\r\n  " + fixture("chat_basic.json"),
            False,
            exact(MINI, Usage(19, 0, output_tokens=10, reasoning_tokens=0)),
            id="json-completion-on-stream-request",
        ),
        pytest.param(
            sse(
                {"model": "", "choices": [], "prompt_filter_results": []},
                chunk("gpt-4o", content="x"),
                USAGE_CHUNK,
            ),
            False,
            exact("gpt-4o", Usage(10, output_tokens=5)),
            id="azure-empty-model-first",
        ),
        pytest.param(
            sse(
                chunk(usage={"prompt_tokens": 10, "completion_tokens": 1}),
                chunk(usage={"prompt_tokens": 10, "completion_tokens": 2}),
                chunk(usage=None),
            ),
            False,
            exact("m", Usage(10, output_tokens=2)),
            id="last-usage-wins",
        ),
        pytest.param(
            sse(chunk(content="ab"), b"not json", b"[1]", b"", b'{"trunc'),
            True,
            estimated("m", 2, "stream aborted"),
            id="bad-events-skipped",
        ),
        pytest.param(
            sse(chunk(reasoning="abcd"), chunk(refusal="efg")),
            False,
            estimated("m", 7, "no usage in stream"),
            id="reasoning-and-refusal",
        ),
        pytest.param(
            sse(chunk(reasoning_content="abcd", reasoning="abcd")),
            False,
            estimated("m", 4, "no usage in stream"),
            id="reasoning-counted-once",
        ),
        pytest.param(
            sse(chunk(function_call={"name": "f", "arguments": "{}"})),
            False,
            estimated("m", 2, "no usage in stream"),
            id="legacy-function-call",
        ),
        pytest.param(
            sse(chunk(content=None, tool_calls=[{"function": {"arguments": 7}}, None, "x"])),
            False,
            failed("no usage in stream", "m"),
            id="junk-deltas",
        ),
        pytest.param(
            sse(
                {
                    "model": "m",
                    "choices": [{"delta": {"content": "ab"}}, {"delta": {"content": "cd"}}],
                }
            ),
            False,
            estimated("m", 4, "no usage in stream"),
            id="n-greater-than-1",
        ),
    ],
)
def test_stream(stream: bytes, aborted: bool, expected: MeterResult) -> None:
    assert meter(stream, streaming=True, aborted=aborted) == expected


def test_bad_events_are_counted() -> None:
    m = OpenAIChatMeter(streaming=True)
    m.feed(sse(b"not json", b"[1]", b"null", chunk(content="ok"), b"[DONE]"))
    m.finish()
    assert m.bad_events == 3


def test_finish_is_idempotent_and_feed_after_finish_is_ignored() -> None:
    m = OpenAIChatMeter(streaming=True)
    m.feed(BEFORE_USAGE)
    first = m.finish(aborted=True)
    m.feed(STREAM[len(BEFORE_USAGE) :])
    assert m.finish() is first
    assert first == estimated(MINI, HELLO, "stream aborted")


def test_oversized_stream_event_is_skipped() -> None:
    big = chunk(content="x" * 2000)
    result = meter(sse(chunk(content="ab"), big, USAGE_CHUNK), streaming=True, max_body_bytes=1000)
    assert result == exact("m", Usage(10, output_tokens=5))


# -- properties ----------------------------------------------------------------

CUTS = st.lists(st.integers(min_value=0), max_size=40)


@settings(database=None)
@given(st.sampled_from(sorted(FIXTURE_RESULTS)), CUTS)
def test_any_chunking_gives_the_same_result(name: str, cuts: list[int]) -> None:
    data = fixture(name)
    streaming = name.endswith(".sse")
    assert meter(*split(data, cuts), streaming=streaming) == FIXTURE_RESULTS[name]


@settings(database=None)
@given(st.sampled_from(STREAMS), st.integers(min_value=0), CUTS, st.booleans())
def test_truncated_streams_are_chunking_invariant(
    name: str, end: int, cuts: list[int], aborted: bool
) -> None:
    data = fixture(name)
    data = data[: end % (len(data) + 1)]
    whole = meter(data, streaming=True, aborted=aborted)
    assert meter(*split(data, cuts), streaming=True, aborted=aborted) == whole
    assert whole.complete == (whole.usage is not None and not whole.usage.estimated)


GARBAGE = st.lists(
    st.binary(max_size=64)
    | st.sampled_from([b"data: ", b"\n\n", b"\r", b"[DONE]", b"{", b"}", b'"usage":', b"\xef\xbb"])
    | st.sampled_from([fixture(n) for n in FIXTURE_RESULTS]).flatmap(
        lambda d: st.integers(0, len(d)).map(lambda i: d[i : i + 200])
    ),
    max_size=30,
)


@settings(database=None)
@given(GARBAGE, st.booleans(), st.booleans(), st.integers(16, 400))
def test_garbage_never_raises_and_stays_bounded(
    chunks: list[bytes], streaming: bool, aborted: bool, max_body_bytes: int
) -> None:
    m = OpenAIChatMeter(streaming=streaming, max_body_bytes=max_body_bytes)
    for piece in chunks:
        m.feed(piece)
        assert m.buffered_bytes <= max_body_bytes + 2
    result = m.finish(aborted=aborted)
    assert isinstance(result, MeterResult)
    assert result.complete == (result.usage is not None and not result.usage.estimated)
    assert result.complete or result.error is not None
    assert m.finish() is result
