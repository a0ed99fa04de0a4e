"""OpenAIResponsesMeter and OpenAIEmbeddingsMeter: fixtures, edge cases, properties."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_proc.metering.meters.base import MeterResult
from ext_proc.metering.meters.openai_embeddings import OpenAIEmbeddingsMeter
from ext_proc.metering.meters.openai_responses import OpenAIResponsesMeter
from spendgate.domain.usage import Usage

pytest.register_assert_rewrite("tests.unit.meter_cases")
from tests.unit.meter_cases import (  # noqa: E402
    CUTS,
    FIXTURES,
    MeterCases,
    bytewise,
    estimated,
    exact,
    failed,
    meter_contract,
    split,
)
from tests.unit.meter_cases import named_sse as sse  # noqa: E402

GPT41 = "gpt-4.1-2025-04-14"
O4 = "o4-mini-2025-04-16"
SMALL = "text-embedding-3-small"
GARBAGE = [b"data: ", b"event: error\n", b"\n\n", b"\r", b"{", b"}", b'"usage":']

FIXTURE_RESULTS = {
    "responses_basic.json": exact(GPT41, Usage(36, 0, output_tokens=25, reasoning_tokens=0)),
    "responses_reasoning_cached.json": exact(
        O4, Usage(2418, 1920, output_tokens=612, reasoning_tokens=576)
    ),
    "responses_error.json": failed("provider error"),
    "responses_stream.sse": exact(GPT41, Usage(9, 0, output_tokens=11, reasoning_tokens=0)),
    # cut at max_output_tokens: still a complete usage report, not an error
    "responses_stream_incomplete.sse": exact(
        O4, Usage(31, 0, output_tokens=64, reasoning_tokens=48)
    ),
}


STREAMS = [n for n in FIXTURE_RESULTS if n.endswith(".sse")]
EMBEDDINGS_RESULTS = {"embeddings.json": exact(SMALL, Usage(8, output_tokens=0))}
CASES = MeterCases(
    OpenAIResponsesMeter,
    FIXTURES / "openai",
    FIXTURE_RESULTS,
    STREAMS,
    GARBAGE,
    [*EMBEDDINGS_RESULTS],
)
EMBEDDINGS = MeterCases(
    OpenAIEmbeddingsMeter, FIXTURES / "openai", EMBEDDINGS_RESULTS, [], GARBAGE, [*FIXTURE_RESULTS]
)
fixture, meter = CASES.fixture, CASES.meter


class TestContract(meter_contract(CASES)):
    """The tests every meter passes (tests/unit/meter_cases.py)."""


class TestEmbeddingsContract(meter_contract(EMBEDDINGS)):
    """The tests every meter passes, for OpenAIEmbeddingsMeter."""


# -- non-streaming -------------------------------------------------------------

U = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}


def output(*items: object) -> dict[str, object]:
    return {"object": "response", "model": "m", "status": "completed", "output": list(items)}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            {"model": "m", "usage": U}, exact("m", Usage(10, output_tokens=5)), id="no-details"
        ),
        pytest.param(
            {"usage": {**U, "input_tokens_details": None, "output_tokens_details": None}},
            exact(None, Usage(10, output_tokens=5)),
            id="null-details",
        ),
        pytest.param(
            {"usage": {**U, "input_tokens_details": [], "output_tokens_details": "x"}},
            exact(None, Usage(10, output_tokens=5)),
            id="details-not-objects",
        ),
        pytest.param(
            {"usage": {**U, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 3}}},
            exact(None, Usage(10, 4, 3, output_tokens=5)),
            id="cache-writes",
        ),
        pytest.param(
            {"usage": {"input_tokens": True, "output_tokens": 5}},
            exact(None, Usage(output_tokens=5)),
            id="bool-is-not-int",
        ),
        pytest.param(
            {"usage": {"input_tokens": "10", "output_tokens": 5.0, "total_tokens": 15}},
            failed("no usage in response"),
            id="str-and-float-counts",
        ),
        pytest.param(
            {**output(), "status": "incomplete", "usage": U},
            exact("m", Usage(10, output_tokens=5)),
            id="incomplete-is-not-an-error",
        ),
        pytest.param(
            {**output(), "status": "failed", "error": {"code": "server_error"}, "usage": U},
            exact("m", Usage(10, output_tokens=5), "provider error"),
            id="failed-with-usage",
        ),
        pytest.param(
            {**output(), "status": "failed", "usage": None},
            failed("provider error", "m"),
            id="failed-status-alone",
        ),
        pytest.param(
            output(
                {"type": "message", "content": [{"type": "output_text", "text": "abc"}]},
                {"type": "message", "content": [{"type": "refusal", "refusal": "de"}]},
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "fg"}]},
                {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "h"}]},
                {"type": "function_call", "name": "f", "arguments": '{"a":1}'},
                {"type": "custom_tool_call", "name": "g", "input": "ij"},
                {"type": "code_interpreter_call", "code": "k"},
            ),
            estimated("m", 3 + 2 + 2 + 1 + 7 + 2 + 1, "no usage in response"),
            id="estimate-every-output-kind",
        ),
        pytest.param(
            output(None, "x", {"content": "x", "summary": [None, {"text": 1}], "arguments": {}}),
            failed("no usage in response", "m"),
            id="junk-output",
        ),
        pytest.param({"model": "", "usage": None}, failed("no usage in response"), id="no-usage"),
    ],
)
def test_json_body(body: object, expected: MeterResult) -> None:
    assert meter(orjson.dumps(body), streaming=False) == expected


def test_negative_and_huge_counts_are_not_reported() -> None:
    # a huge count does not fit JSON's (or orjson's) int64
    body = b'{"usage": {"input_tokens": -1, "output_tokens": 123456789012345678901234}}'
    assert meter(body, streaming=False) == failed("no usage in response")


# -- streaming -----------------------------------------------------------------


def delta(kind: str, text: object) -> dict[str, object]:
    return {"type": f"response.{kind}.delta", "item_id": "i", "output_index": 0, "delta": text}


def final(kind: str = "completed", usage: object = U, **response: object) -> dict[str, object]:
    body = {"object": "response", "model": "m", "status": kind, "usage": usage, **response}
    return {"type": f"response.{kind}", "response": body}


CREATED = {"type": "response.created", "response": {"model": "m", "status": "in_progress"}}
STREAM = fixture("responses_stream.sse")
BEFORE_FINAL = STREAM[: STREAM.rindex(b"event: response.completed")]
HI = len("Hi there! How can I help you today?")
INCOMPLETE = fixture("responses_stream_incomplete.sse")
BEFORE_INCOMPLETE = INCOMPLETE[: INCOMPLETE.rindex(b"event: response.incomplete")]
SUMMARY_AND_ANSWER = len("**Counting primes**\n\nI list the primes below 50.") + len(
    "The primes below 50 are 2, 3, 5, 7"
)


@pytest.mark.parametrize(
    ("stream", "aborted", "expected"),
    [
        pytest.param(BEFORE_FINAL, True, estimated(GPT41, HI, "stream aborted"), id="aborted"),
        pytest.param(
            BEFORE_FINAL, False, estimated(GPT41, HI, "no usage in stream"), id="ended-early"
        ),
        pytest.param(
            BEFORE_INCOMPLETE,
            True,
            estimated(O4, SUMMARY_AND_ANSWER, "stream aborted"),
            id="aborted-reasoning",
        ),
        pytest.param(
            STREAM,
            True,
            exact(GPT41, Usage(9, 0, output_tokens=11, reasoning_tokens=0)),
            id="aborted-after-final",
        ),
        pytest.param(
            sse(CREATED, delta("output_text", "abcde"), final(usage=None)),
            True,
            estimated("m", 5, "no usage in stream"),
            id="final-without-usage",
        ),
        pytest.param(b"", True, failed("stream aborted"), id="aborted-before-anything"),
        pytest.param(
            b": keep-alive\n\n", False, failed("no usage in stream"), id="nothing-streamed"
        ),
        pytest.param(
            sse(CREATED, delta("output_text", "abc"), {"type": "error", "code": "server_error"}),
            False,
            estimated("m", 3, "provider error"),
            id="error-event",
        ),
        pytest.param(
            sse(CREATED, delta("output_text", "abc"), final("failed", None, error={"code": "x"})),
            False,
            estimated("m", 3, "provider error"),
            id="failed-without-usage",
        ),
        pytest.param(
            sse(CREATED, final("failed")),
            False,
            exact("m", Usage(10, output_tokens=5), "provider error"),
            id="failed-with-usage",
        ),
        pytest.param(
            sse(
                delta("output_text", "a"),
                delta("refusal", "b"),
                delta("reasoning_text", "c"),
                delta("reasoning_summary_text", "d"),
                delta("function_call_arguments", "e"),
                delta("custom_tool_call_input", "f"),
                delta("code_interpreter_call_code", "g"),
                delta("mcp_call_arguments", "h"),
            ),
            False,
            estimated(None, 8, "no usage in stream"),
            id="every-text-delta",
        ),
        pytest.param(
            sse(
                delta("audio", "UklGRiQAAABXQVZF"),
                delta("audio_transcript", "abc"),
                delta("output_text", None),
                delta("function_call_arguments", {"a": 1}),
                {"type": "response.output_text.done", "text": "abc"},
            ),
            False,
            failed("no usage in stream"),
            id="not-counted",
        ),
        pytest.param(
            b'event: response.output_text.delta\ndata: {"delta": "abc"}\n\n'
            b'event: response.output_text.delta\ndata: {"type": "x", "delta": "zz"}\n\n'
            b'event: response.completed\ndata: {"response": {"usage": {"input_tokens": 1}}}\n\n',
            False,
            exact(None, Usage(1)),
            id="sse-event-name-when-no-type",
        ),
        pytest.param(
            sse(
                {"type": "response.created", "response": {"model": ""}},
                {"type": "response.in_progress", "response": {"model": "first"}},
                {**final(), "response": {"model": "second", "usage": U}},
            ),
            False,
            exact("first", Usage(10, output_tokens=5)),
            id="first-model-wins",
        ),
        pytest.param(
            sse(
                {**final(), "response": {"usage": {**U, "output_tokens": 1}}},
                final(),
                final(usage={}),
            ),
            False,
            exact("m", Usage(10, output_tokens=5)),
            id="last-usage-wins",
        ),
        pytest.param(
            sse(delta("output_text", "ab"), b"not json", b"[1]", b"", b"[DONE]", b'{"trunc'),
            True,
            estimated(None, 2, "stream aborted"),
            id="bad-events-skipped",
        ),
        pytest.param(
            sse({"type": "response.completed", "response": "x"}, {"type": 7, "response": None}),
            True,
            failed("stream aborted"),
            id="junk-events",
        ),
    ],
)
def test_stream(stream: bytes, aborted: bool, expected: MeterResult) -> None:
    assert meter(stream, streaming=True, aborted=aborted) == expected
    assert meter(*bytewise(stream), streaming=True, aborted=aborted) == expected


def test_bad_events_are_counted() -> None:
    m = OpenAIResponsesMeter(streaming=True)
    m.feed(sse(b"not json", b"[1]", b"null", delta("output_text", "ok"), final()))
    assert m.finish() == exact("m", Usage(10, output_tokens=5))
    assert m.bad_events == 3


def test_oversized_stream_event_is_skipped() -> None:
    big = delta("output_text", "x" * 2000)
    stream = sse(delta("output_text", "ab"), big, final())
    assert meter(stream, streaming=True, max_body_bytes=1000) == exact(
        "m", Usage(10, output_tokens=5)
    )


# -- embeddings ----------------------------------------------------------------


def embed(*chunks: bytes, aborted: bool = False, **kw: Any) -> MeterResult:
    return EMBEDDINGS.meter(*chunks, streaming=False, aborted=aborted, **kw)


def embeddings_body(vectors: int, *, model_first: bool = False, indent: bool = False) -> bytes:
    data = [
        {"object": "embedding", "index": i, "embedding": [0.001 * i] * 8} for i in range(vectors)
    ]
    body: dict[str, object] = {"object": "list", "data": data}
    if model_first:  # vLLM's key order
        body = {"id": "embd-1", "object": "list", "model": "BAAI/bge-m3", "data": data}
    else:
        body["model"] = SMALL
    body["usage"] = {"prompt_tokens": 3 * vectors, "total_tokens": 3 * vectors}
    return orjson.dumps(body, option=orjson.OPT_INDENT_2 if indent else 0)


BIG = embeddings_body(100)


@pytest.mark.parametrize(
    ("chunks", "aborted", "expected"),
    [
        pytest.param(
            [fixture("embeddings.json")],
            False,
            exact(SMALL, Usage(8, output_tokens=0)),
            id="fixture",
        ),
        pytest.param(
            [b'{"model": "m", "usage": {"total_tokens": 5}}'],
            False,
            exact("m", Usage(5, output_tokens=0)),
            id="total-only",
        ),
        pytest.param(
            [b'{"usage": {"prompt_tokens": true, "total_tokens": 5}}'],
            False,
            exact(None, Usage(5, output_tokens=0)),
            id="bool-prompt-falls-back",
        ),
        pytest.param(
            [b'{"model": "m", "usage": {"prompt_tokens": "5"}}'],
            False,
            failed("no usage in response", "m"),
            id="junk-usage",
        ),
        pytest.param(
            [b'{"model": "m", "data": []}'], False, failed("no usage in response", "m"), id="none"
        ),
        pytest.param(
            [fixture("responses_error.json")], False, failed("provider error"), id="error"
        ),
        pytest.param([b"[1]"], False, failed("invalid json"), id="not-an-object"),
        pytest.param([BIG[:100]], True, failed("response aborted"), id="aborted"),
        pytest.param([BIG], False, exact(SMALL, Usage(300, output_tokens=0)), id="large-from-tail"),
        pytest.param(
            [embeddings_body(100, model_first=True, indent=True)],
            False,
            exact("BAAI/bge-m3", Usage(300, output_tokens=0)),
            id="large-model-first-indented",
        ),
        pytest.param([BIG[:-40]], True, failed("body too large"), id="large-cut-before-usage"),
        pytest.param(
            [BIG.replace(b'"usage"', b'"usage_"')],
            False,
            failed("body too large"),
            id="large-no-usage",
        ),
        pytest.param(
            [BIG[:-1] + b" garbage"], False, failed("body too large"), id="large-bad-ending"
        ),
    ],
)
def test_embeddings(chunks: list[bytes], aborted: bool, expected: MeterResult) -> None:
    assert embed(*chunks, aborted=aborted, max_body_bytes=1000) == expected
    assert embed(*bytewise(b"".join(chunks)), aborted=aborted, max_body_bytes=1000) == (expected)


def test_embeddings_ignore_streaming_and_finish_once() -> None:
    m = OpenAIEmbeddingsMeter(streaming=True)
    m.feed(fixture("embeddings.json"))
    first = m.finish()
    m.feed(b"x")
    assert m.finish(aborted=True) is first
    assert first == exact(SMALL, Usage(8, output_tokens=0))


@settings(database=None)
@given(st.integers(1, 120), st.booleans(), st.integers(min_value=0), CUTS, st.integers(200, 3000))
def test_embeddings_chunking_invariant(
    vectors: int, model_first: bool, end: int, cuts: list[int], max_body_bytes: int
) -> None:
    body = embeddings_body(vectors, model_first=model_first)
    truncated = end % 3 == 0
    if truncated:
        body = body[: end % (len(body) + 1)]
    whole = embed(body, max_body_bytes=max_body_bytes)
    assert embed(*split(body, cuts), max_body_bytes=max_body_bytes) == whole
    if not truncated:
        model = "BAAI/bge-m3" if model_first else SMALL
        assert whole == exact(model, Usage(3 * vectors, output_tokens=0))
