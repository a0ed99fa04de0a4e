"""AnthropicMessagesMeter: fixtures from Anthropic's documented shapes, edge cases, properties."""

from __future__ import annotations

import orjson
import pytest

from ext_proc.metering.meters.anthropic_messages import AnthropicMessagesMeter
from ext_proc.metering.meters.base import MeterResult, estimate_tokens_from_chars
from spendgate.domain.usage import Usage

pytest.register_assert_rewrite("tests.unit.meter_cases")
from tests.unit.meter_cases import (  # noqa: E402
    FIXTURES,
    MeterCases,
    exact,
    failed,
    meter_contract,
)
from tests.unit.meter_cases import named_sse as sse  # noqa: E402

SONNET = "claude-sonnet-4-5-20250929"


def estimated(model: str | None, error: str, chars: int = 0, **counts: int | None) -> MeterResult:
    """Input/cache counts as reported, output estimated from ``chars`` (at least ``floor``)."""
    floor = counts.pop("floor", 0) or 0
    output = max(estimate_tokens_from_chars(chars), floor)
    usage = Usage(output_tokens=output, estimated=True, **counts)
    return MeterResult(model=model, usage=usage, complete=False, error=error)


FIXTURE_RESULTS = {
    "message_basic.json": exact(SONNET, Usage(12, 0, 0, 0, 12)),
    # input = 21 + 1800 read + 2556 written (456 for 5 minutes, 2100 for 1 hour)
    "message_cache_5m_1h.json": exact(
        "claude-opus-4-1-20250805", Usage(4377, 1800, 456, 2100, 393)
    ),
    # no cache_creation breakdown: all of cache_creation_input_tokens is 5-minute
    "message_thinking.json": exact("claude-3-7-sonnet-20250219", Usage(46, 0, 0, None, 312)),
    "error.json": failed("provider error"),
    "stream_basic.sse": exact(SONNET, Usage(25, 0, 0, None, 15)),
    # message_delta repeats the input/cache counts (newer API versions)
    "stream_cache.sse": exact(SONNET, Usage(4377, 1800, 456, 2100, 87)),
    "stream_tool_use.sse": exact(SONNET, Usage(472, output_tokens=89)),
    # "Once upon a time, in a quiet" = 28 chars -> 7 tokens; input from message_start
    "stream_error.sse": estimated(
        SONNET, "provider error", 28, input_tokens=25, cached_input_tokens=0, cache_write_tokens=0
    ),
}


STREAMS = sorted(p.name for p in (FIXTURES / "anthropic").glob("*.sse"))
GARBAGE = [b"data: ", b"event: error\n", b"\n\n", b"\r", b"{", b"}", b'"usage":', b"\xef\xbb"]
CASES = MeterCases(
    AnthropicMessagesMeter, FIXTURES / "anthropic", FIXTURE_RESULTS, STREAMS, GARBAGE
)
fixture, meter = CASES.fixture, CASES.meter


class TestContract(meter_contract(CASES)):
    """The tests every meter passes (tests/unit/meter_cases.py)."""

    def check_truncated(self, full: bytes, data: bytes, aborted: bool, whole: MeterResult) -> None:
        start_data = full.split(b"\n")[1]  # every stream fixture opens with message_start
        if start_data in data and not whole.complete:  # cut: input known, output estimated
            assert whole.usage is not None and whole.usage.input_tokens is not None


# -- non-streaming -------------------------------------------------------------

U = {"input_tokens": 10, "output_tokens": 5}


def message(usage: object = None, *content: dict[str, object]) -> dict[str, object]:
    body: dict[str, object] = {"type": "message", "model": "m", "content": list(content)}
    if usage is not None:
        body["usage"] = usage
    return body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(message(U), exact("m", Usage(10, output_tokens=5)), id="no-cache-fields"),
        pytest.param(
            message({**U, "cache_read_input_tokens": None, "cache_creation": None}),
            exact("m", Usage(10, output_tokens=5)),
            id="null-cache-fields",
        ),
        pytest.param(
            message({**U, "cache_creation_input_tokens": 30}),
            exact("m", Usage(40, cache_write_tokens=30, output_tokens=5)),
            id="no-breakdown-all-5m",
        ),
        pytest.param(
            message(
                {
                    **U,
                    "cache_creation_input_tokens": 30,
                    "cache_creation": {"ephemeral_1h_input_tokens": 20},
                }
            ),
            exact("m", Usage(40, cache_write_tokens=10, cache_write_1h_tokens=20, output_tokens=5)),
            id="partial-breakdown-rest-is-5m",
        ),
        pytest.param(
            message(
                {
                    **U,
                    "cache_creation": {
                        "ephemeral_5m_input_tokens": 7,
                        "ephemeral_1h_input_tokens": 3,
                    },
                }
            ),
            exact("m", Usage(20, cache_write_tokens=7, cache_write_1h_tokens=3, output_tokens=5)),
            id="breakdown-without-total",
        ),
        pytest.param(
            message({**U, "cache_creation": [], "cache_read_input_tokens": "9"}),
            exact("m", Usage(10, output_tokens=5)),
            id="junk-cache-fields",
        ),
        pytest.param(
            message({"input_tokens": True, "output_tokens": 5}),
            exact("m", Usage(output_tokens=5)),
            id="bool-is-not-int",
        ),
        pytest.param(
            message({"input_tokens": 1.0, "output_tokens": -5}, {"type": "text", "text": "abcde"}),
            estimated("m", "no usage in response", 5),
            id="float-and-negative-counts",
        ),
        pytest.param(
            message(
                {},
                {"type": "thinking", "thinking": "abcd", "signature": "x" * 100},
                {"type": "redacted_thinking", "data": "y" * 100},
                {"type": "text", "text": "efg"},
                {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}},  # {"a":1}
            ),
            estimated("m", "no usage in response", 4 + 3 + 7),
            id="empty-usage-estimates",
        ),
        pytest.param(message(), failed("no usage in response", "m"), id="nothing-to-estimate"),
        pytest.param(
            {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}},
            failed("provider error"),
            id="error-body",
        ),
    ],
)
def test_json_body(body: object, expected: MeterResult) -> None:
    assert meter(orjson.dumps(body), streaming=False) == expected


# -- streaming -----------------------------------------------------------------


def start(model: str = "m", **usage: object) -> dict[str, object]:
    return {"type": "message_start", "message": {"model": model, "content": [], "usage": usage}}


def delta(**delta: object) -> dict[str, object]:
    return {"type": "content_block_delta", "index": 0, "delta": delta}


def end(usage: object = None) -> dict[str, object]:
    event: dict[str, object] = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
    if usage is not None:
        event["usage"] = usage
    return event


STOP = {"type": "message_stop"}
STREAM = fixture("stream_basic.sse")
BEFORE_DELTA = STREAM[: STREAM.index(b"event: message_delta")]
BEFORE_STOP = STREAM[: STREAM.index(b"event: message_stop")]
AFTER_START = STREAM[: STREAM.index(b"event: content_block_start")]
HELLO = len("Hello! How can I help you today?")
BASIC_INPUT = {"input_tokens": 25, "cached_input_tokens": 0, "cache_write_tokens": 0}


@pytest.mark.parametrize(
    ("stream", "aborted", "expected"),
    [
        pytest.param(
            BEFORE_DELTA,
            True,
            estimated(SONNET, "stream aborted", HELLO, **BASIC_INPUT),
            id="aborted-before-message-delta",
        ),
        pytest.param(
            BEFORE_DELTA,
            False,
            estimated(SONNET, "no usage in stream", HELLO, **BASIC_INPUT),
            id="ended-before-message-delta",
        ),
        pytest.param(
            AFTER_START,
            True,
            estimated(SONNET, "stream aborted", 0, floor=1, **BASIC_INPUT),
            id="aborted-after-start-keeps-initial-output",
        ),
        pytest.param(
            BEFORE_STOP,
            True,
            exact(SONNET, Usage(25, 0, 0, None, 15)),
            id="aborted-after-message-delta",
        ),
        pytest.param(b"", True, failed("stream aborted"), id="aborted-before-anything"),
        pytest.param(b": keep-alive\n\n", False, failed("no usage in stream"), id="nothing"),
        pytest.param(
            sse(delta(type="text_delta", text="abcde"), STOP),
            True,
            estimated(None, "no usage in stream", 5),
            id="aborted-after-stop-without-usage",
        ),
        pytest.param(
            sse(start(input_tokens=10), delta(type="text_delta", text="ab"), end(), STOP),
            False,
            estimated("m", "no usage in stream", 2, input_tokens=10),
            id="message-delta-without-usage",
        ),
        pytest.param(
            sse(start(input_tokens=10), end({"output_tokens": 5}), end({"output_tokens": 9}), STOP),
            False,
            exact("m", Usage(10, output_tokens=9)),
            id="cumulative-output-latest-wins",
        ),
        pytest.param(
            sse(
                start(input_tokens=2679, cache_read_input_tokens=0, output_tokens=3),
                end({"input_tokens": 10682, "cache_read_input_tokens": None, "output_tokens": 510}),
            ),
            False,
            exact("m", Usage(10682, 0, output_tokens=510)),
            id="message-delta-updates-input-null-keeps",
        ),
        pytest.param(
            sse(
                start(
                    cache_creation_input_tokens=30,
                    cache_creation={
                        "ephemeral_5m_input_tokens": 10,
                        "ephemeral_1h_input_tokens": 20,
                    },
                    input_tokens=1,
                ),
                end({"output_tokens": 4, "cache_creation_input_tokens": 30}),
            ),
            False,
            exact("m", Usage(31, cache_write_tokens=10, cache_write_1h_tokens=20, output_tokens=4)),
            id="breakdown-kept-from-start",
        ),
        pytest.param(
            sse(start(input_tokens=3), end({"output_tokens": True}), end({"output_tokens": "7"})),
            False,
            estimated("m", "no usage in stream", 0, input_tokens=3),
            id="junk-output-is-not-final",
        ),
        pytest.param(
            sse(
                start(input_tokens=3, output_tokens=1),
                delta(type="thinking_delta", thinking="abcdefgh"),
                delta(type="signature_delta", signature="s" * 400),
                delta(type="text_delta", text="ijkl"),
                delta(type="input_json_delta", partial_json='{"a":'),
                delta(type="citations_delta", citation={"cited_text": "x" * 400}),
            ),
            True,
            estimated("m", "stream aborted", 8 + 4 + 5, input_tokens=3),
            id="thinking-text-and-tool-json-counted",
        ),
        pytest.param(
            sse(start(), delta(type="text_delta", text="abc"), {"type": "error", "error": {}}),
            False,
            estimated("m", "provider error", 3),
            id="unnamed-error-event",
        ),
        pytest.param(
            sse(start(input_tokens=3)) + b"event: error\ndata: upstream connect error\n\n",
            False,
            estimated("m", "provider error", input_tokens=3),
            id="error-event-without-json",
        ),
        pytest.param(
            sse(start(input_tokens=3), b"not json", b"[1]", b"", b'{"trunc', {"type": "future"}),
            True,
            estimated("m", "stream aborted", input_tokens=3),
            id="bad-and-unknown-events-skipped",
        ),
        pytest.param(
            sse(
                {"type": "message_start", "message": "x"},
                {"type": "message_start", "message": {"model": 7, "usage": []}},
                {"type": "content_block_delta", "delta": ["text"]},
                delta(type="text_delta", text=None),
                start(model=""),
            ),
            False,
            failed("no usage in stream"),
            id="junk-shapes",
        ),
    ],
)
def test_stream(stream: bytes, aborted: bool, expected: MeterResult) -> None:
    assert meter(stream, streaming=True, aborted=aborted) == expected


def test_bad_events_are_counted() -> None:
    m = AnthropicMessagesMeter(streaming=True)
    m.feed(sse(b"not json", b"[1]", b"null", {"type": "ping"}, STOP))
    m.finish()
    assert m.bad_events == 3


def test_oversized_stream_event_is_skipped() -> None:
    big = delta(type="text_delta", text="x" * 2000)
    stream = sse(start(input_tokens=10), big, end({"output_tokens": 5}))
    result = meter(stream, streaming=True, max_body_bytes=1000)
    assert result == exact("m", Usage(10, output_tokens=5))
