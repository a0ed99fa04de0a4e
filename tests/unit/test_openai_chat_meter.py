"""OpenAIChatMeter: fixtures from OpenAI's documented shapes, edge cases, properties."""

from __future__ import annotations

import orjson
import pytest

from ext_proc.metering.meters.base import MeterResult, estimate_tokens_from_chars
from ext_proc.metering.meters.openai_chat import OpenAIChatMeter
from spendgate.domain.usage import Usage

pytest.register_assert_rewrite("tests.unit.meter_cases")
from tests.unit.meter_cases import (  # noqa: E402
    FIXTURES,
    MeterCases,
    estimated,
    exact,
    failed,
    meter_contract,
    sse,
)

MINI = "gpt-4o-mini-2024-07-18"

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


STREAMS = sorted(p.name for p in (FIXTURES / "openai").glob("chat_*.sse"))
GARBAGE = [b"data: ", b"\n\n", b"\r", b"[DONE]", b"{", b"}", b'"usage":', b"\xef\xbb"]
CASES = MeterCases(OpenAIChatMeter, FIXTURES / "openai", FIXTURE_RESULTS, STREAMS, GARBAGE)
fixture, meter = CASES.fixture, CASES.meter


class TestContract(meter_contract(CASES)):
    """The tests every meter passes (tests/unit/meter_cases.py)."""


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
    ],
)
def test_json_body(body: object, expected: MeterResult) -> None:
    assert meter(orjson.dumps(body), streaming=False) == expected


def test_negative_and_huge_counts_are_not_reported() -> None:
    # a huge count does not fit JSON's (or orjson's) int64
    body = b'{"usage": {"prompt_tokens": -1, "completion_tokens": 123456789012345678901234}}'
    assert meter(body, streaming=False) == failed("no usage in response")


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


def test_oversized_stream_event_is_skipped() -> None:
    big = chunk(content="x" * 2000)
    result = meter(sse(chunk(content="ab"), big, USAGE_CHUNK), streaming=True, max_body_bytes=1000)
    assert result == exact("m", Usage(10, output_tokens=5))
