"""GeminiMeter: fixtures from Google's documented shapes, edge cases, properties."""

from __future__ import annotations

from functools import partial
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_proc.metering.meters.base import MeterResult
from ext_proc.metering.meters.gemini import GeminiMeter, _ArraySplitter, gemini_model_from_path
from spendgate.domain.usage import Usage

pytest.register_assert_rewrite("tests.unit.meter_cases")
from tests.unit import meter_cases  # noqa: E402
from tests.unit.meter_cases import (  # noqa: E402
    FIXTURES,
    MeterCases,
    exact,
    meter_contract,
    split,
)
from tests.unit.meter_cases import estimated as from_chars  # noqa: E402

PATH_MODEL = "gemini-from-path"


def sse(*events: object) -> bytes:
    """An alt=sse stream (CRLF line ends): dicts become JSON, bytes are sent as they are."""
    return meter_cases.sse(*events, newline=b"\r\n")


def array(*objects: object) -> bytes:
    """The default streaming form: a pretty-printed JSON array, one element per flush."""
    return (
        b"[" + b"\n,\n".join(orjson.dumps(o, option=orjson.OPT_INDENT_2) for o in objects) + b"\n]"
    )


def estimated(model: str | None, usage: Usage, error: str) -> MeterResult:
    return MeterResult(model=model, usage=usage, complete=False, error=error)


def failed(error: str, model: str | None = PATH_MODEL) -> MeterResult:
    return meter_cases.failed(error, model)


FIXTURE_RESULTS = {
    "generate_basic.json": exact("gemini-2.0-flash", Usage(8, output_tokens=12)),
    # input = 12345 prompt (cache included) + 150 tool-use prompt; output = 250 + 980 thoughts
    "generate_cached_thinking.json": exact(
        "gemini-2.5-pro", Usage(12495, 12000, output_tokens=1230, reasoning_tokens=980)
    ),
    "error.json": failed("provider error"),
    "stream_sse.sse": exact("gemini-2.5-flash", Usage(9, output_tokens=407, reasoning_tokens=400)),
    "stream_array.json": exact("gemini-2.0-flash", Usage(8, output_tokens=24)),
}


STREAMS = sorted(p.name for p in (FIXTURES / "gemini").glob("stream_*"))
GARBAGE = [b"data: ", b"\r\n\r\n", b"\r", b"[", b"]", b"{", b"}", b'"', b"\\", b",", b"\xef\xbb"]
CASES = MeterCases(
    partial(GeminiMeter, model_from_path=PATH_MODEL),
    FIXTURES / "gemini",
    FIXTURE_RESULTS,
    STREAMS,
    GARBAGE,
    body_model=PATH_MODEL,
)
fixture, meter = CASES.fixture, CASES.meter


class TestContract(meter_contract(CASES)):
    """The tests every meter passes (tests/unit/meter_cases.py)."""

    def check_truncated(self, full: bytes, data: bytes, aborted: bool, whole: MeterResult) -> None:
        assert whole.complete or whole.error in ("stream aborted", "no usage in stream")


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1beta/models/gemini-2.5-flash:generateContent?key=abc", "gemini-2.5-flash"),
        ("/v1/models/gemini-1.5-pro:streamGenerateContent?alt=sse", "gemini-1.5-pro"),
        (
            "/v1/projects/p/locations/us-central1/publishers/google/models/"
            "gemini-2.0-flash-001:streamGenerateContent",
            "gemini-2.0-flash-001",
        ),
        ("/v1/projects/models/locations/l/publishers/google/models/m:generateContent", "m"),
        ("/v1beta/models/gemini-2.5-flash%3AgenerateContent", "gemini-2.5-flash"),
        ("/v1beta/models/gemini-2.5-flash", "gemini-2.5-flash"),
        ("/v1beta/models/:generateContent", None),
        ("/v1beta/tunedModels/t:generateContent", None),
        ("/v1/chat/completions?next=/models/x:y", None),
        ("", None),
    ],
)
def test_gemini_model_from_path(path: str, model: str | None) -> None:
    assert gemini_model_from_path(path) == model


# -- non-streaming -------------------------------------------------------------

U = {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15}


def response(usage: object = None, *parts: object, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"candidates": [{"content": {"parts": list(parts), "role": "model"}}]}
    if usage is not None:
        body["usageMetadata"] = usage
    return body | extra


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(response(U), exact(PATH_MODEL, Usage(10, output_tokens=5)), id="path-model"),
        pytest.param(
            response(U, modelVersion=""),
            exact(PATH_MODEL, Usage(10, output_tokens=5)),
            id="empty-model-version",
        ),
        pytest.param(
            response({"promptTokenCount": 10, "thoughtsTokenCount": 7}),
            exact(PATH_MODEL, Usage(10, output_tokens=7, reasoning_tokens=7)),
            id="thoughts-only",
        ),
        pytest.param(
            response({"promptTokenCount": 10, "totalTokenCount": 10}),
            exact(PATH_MODEL, Usage(10)),
            id="no-candidates-count",
        ),
        pytest.param(
            response({"toolUsePromptTokenCount": 4, "candidatesTokenCount": 1}),
            exact(PATH_MODEL, Usage(4, output_tokens=1)),
            id="tool-use-prompt-only",
        ),
        pytest.param(
            response({**U, "promptTokenCount": True, "cachedContentTokenCount": "3"}),
            exact(PATH_MODEL, Usage(output_tokens=5)),
            id="bool-and-str-are-not-counts",
        ),
        pytest.param(
            response(
                {"totalTokenCount": 15, "trafficType": "ON_DEMAND"},
                {"text": "abcd", "thought": True},
                {"text": "efg"},
                {"functionCall": {"name": "f", "args": {"a": 1}}},  # {"a":1}
                {"inlineData": {"data": "x" * 100}},
                "junk",
            ),
            from_chars(PATH_MODEL, 4 + 3 + 7, "no usage in response"),
            id="no-counts-estimates",
        ),
        pytest.param(response(), failed("no usage in response"), id="nothing-to-estimate"),
        pytest.param(
            {"candidates": "x", "usageMetadata": [], "modelVersion": 3},
            failed("no usage in response"),
            id="junk-shapes",
        ),
        pytest.param(
            {"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}},
            failed("provider error"),
            id="error-body",
        ),
        pytest.param([response(U)], failed("invalid json"), id="not-an-object"),
    ],
)
def test_json_body(body: object, expected: MeterResult) -> None:
    assert meter(orjson.dumps(body), streaming=False) == expected


def test_model_is_none_without_path_or_version() -> None:
    result = meter(orjson.dumps(response(U)), streaming=False, model_from_path=None)
    assert result == exact(None, Usage(10, output_tokens=5))


# -- streaming -----------------------------------------------------------------

SSE = fixture("stream_sse.sse")
SSE_BEFORE_LAST = SSE[: SSE.rindex(b"data: ")]
ARRAY = fixture("stream_array.json")
ARRAY_BEFORE_LAST = ARRAY[: ARRAY.rindex(b"\n,\n")]
ARRAY_FIRST = ARRAY[: ARRAY.index(b"\n,\n")]
ARRAY_UNCLOSED = ARRAY[: ARRAY.rindex(b"]")]
FLASH_PARTIAL = Usage(9, output_tokens=405, reasoning_tokens=400)
DONE = {"finishReason": "STOP"}


def chunk(text: str | None = None, usage: object = None, **candidate: object) -> dict[str, Any]:
    parts = [] if text is None else [{"text": text}]
    obj: dict[str, Any] = {
        "candidates": [{"content": {"parts": parts, "role": "model"}, **candidate}],
        "modelVersion": "m",
    }
    if usage is not None:
        obj["usageMetadata"] = usage
    return obj


@pytest.mark.parametrize(
    ("stream", "aborted", "expected"),
    [
        pytest.param(
            SSE_BEFORE_LAST,
            True,
            estimated(
                "gemini-2.5-flash",
                Usage(9, output_tokens=405, reasoning_tokens=400, estimated=True),
                "stream aborted",
            ),
            id="sse-aborted-keeps-last-report",
        ),
        pytest.param(
            SSE_BEFORE_LAST,
            False,
            exact("gemini-2.5-flash", FLASH_PARTIAL),
            id="sse-ended-without-finish-reason",
        ),
        pytest.param(
            ARRAY_BEFORE_LAST,
            True,
            estimated(
                "gemini-2.0-flash", Usage(8, output_tokens=17, estimated=True), "stream aborted"
            ),
            id="array-aborted-keeps-last-report",
        ),
        pytest.param(
            # the first chunk reports the prompt only: its text ("AI") is estimated
            ARRAY_FIRST,
            True,
            estimated(
                "gemini-2.0-flash", Usage(8, output_tokens=1, estimated=True), "stream aborted"
            ),
            id="array-aborted-after-prompt-only-report",
        ),
        pytest.param(
            ARRAY_UNCLOSED,
            True,
            exact("gemini-2.0-flash", Usage(8, output_tokens=24)),
            id="array-aborted-after-finish-reason",
        ),
        pytest.param(
            array(chunk("ab", {"promptTokenCount": 3, "candidatesTokenCount": 1})),
            True,
            exact("m", Usage(3, output_tokens=1)),
            id="array-closed-without-finish-reason",
        ),
        pytest.param(
            sse(
                chunk("abcd", {"promptTokenCount": 3, "candidatesTokenCount": 1}),
                chunk("efghijkl"),
            ),
            True,
            estimated("m", Usage(3, output_tokens=1 + 2, estimated=True), "stream aborted"),
            id="text-after-last-report-is-estimated",
        ),
        pytest.param(
            sse(chunk("abcde", {"trafficType": "ON_DEMAND"}), chunk("fgh", None, **DONE)),
            False,
            from_chars("m", 8, "no usage in stream"),
            id="vertex-traffic-type-only-is-no-report",
        ),
        pytest.param(
            sse(
                chunk("ab", {"promptTokenCount": 3, "candidatesTokenCount": 1}),
                chunk("cd", {"promptTokenCount": 3, "candidatesTokenCount": 2}, **DONE),
                chunk(None, {"totalTokenCount": 9}),
            ),
            True,
            exact("m", Usage(3, output_tokens=2)),
            id="last-report-wins-empty-ignored",
        ),
        pytest.param(
            sse(
                {
                    "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                    "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
                }
            ),
            True,
            exact(PATH_MODEL, Usage(8)),
            id="blocked-prompt-is-final",
        ),
        pytest.param(
            sse(chunk("abc", {"promptTokenCount": 3}), {"error": {"code": 500}}),
            False,
            exact("m", Usage(3), "provider error"),
            id="sse-error-mid-stream",
        ),
        pytest.param(
            b"[" + fixture("error.json") + b"]",
            True,
            failed("provider error"),
            id="json-array-error-on-stream-request",
        ),
        pytest.param(
            b"\r\n " + fixture("generate_basic.json"),
            True,
            exact("gemini-2.0-flash", Usage(8, output_tokens=12)),
            id="json-response-on-stream-request",
        ),
        pytest.param(
            sse(chunk("ab"), b"not json", b"[1]", b"", b'{"trunc'),
            True,
            from_chars("m", 2, "stream aborted"),
            id="bad-sse-events-skipped",
        ),
        pytest.param(
            b'[{"candidates": [{"content": {"parts": [{"text": "abc"}]}}]},\n{"a": tru}, 7, "{",'
            b' [{"x": 1}], {"usageMetadata": {"promptTokenCount',
            True,
            from_chars(PATH_MODEL, 3, "stream aborted"),
            id="bad-array-elements-skipped",
        ),
        pytest.param(b"", True, failed("stream aborted"), id="aborted-before-anything"),
        pytest.param(b" \r\n\r\n ", False, failed("no usage in stream"), id="only-whitespace"),
        pytest.param(b": keep-alive\r\n\r\n", False, failed("no usage in stream"), id="comment"),
    ],
)
def test_stream(stream: bytes, aborted: bool, expected: MeterResult) -> None:
    assert meter(stream, streaming=True, aborted=aborted) == expected


def test_bad_events_are_counted() -> None:
    m = GeminiMeter(streaming=True, model_from_path=None)
    m.feed(sse(b"not json", b"[1]", b"null", chunk("ok")))
    m.finish()
    assert m.bad_events == 3


@pytest.mark.parametrize("form", [sse, array])
def test_oversized_stream_object_is_skipped(form: Any) -> None:
    big = chunk("x" * 2000, {"promptTokenCount": 99, "candidatesTokenCount": 99})
    last = chunk("ab", {"promptTokenCount": 10, "candidatesTokenCount": 5}, **DONE)
    result = meter(form(big, last), streaming=True, max_body_bytes=1000)
    assert result == exact("m", Usage(10, output_tokens=5))


# -- the JSON-array splitter ---------------------------------------------------


def cut_out(data: bytes, cuts: list[int], max_object_bytes: int = 1 << 20) -> list[bytes]:
    splitter = _ArraySplitter(max_object_bytes)
    return [obj for piece in split(data, cuts) for obj in splitter.feed(piece)]


def test_splitter_handles_strings_and_nesting() -> None:
    objects = [b'{"a": "}]\\"{[", "b": [{"c": {}}]}', b'{"d": "\\\\"}', b"{}"]
    data = b" [ " + b" ,\n".join(objects) + b" ] "
    for cuts in ([], list(range(len(data)))):
        assert cut_out(data, cuts) == objects
    splitter = _ArraySplitter(1 << 20)
    splitter.feed(data)
    assert splitter.closed


def test_splitter_drops_oversized_objects() -> None:
    splitter = _ArraySplitter(10)
    assert splitter.feed(b'[{"a": "0123456789"}, {"b": 1}') == [b'{"b": 1}']
    assert splitter.oversized == 1
    assert splitter.feed(b', {"c": "') == []
    assert splitter.feed(b'0123456789"}]') == []
    assert (splitter.oversized, splitter.buffered_bytes, splitter.closed) == (2, 0, True)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(st.characters(blacklist_categories=("Cs",))),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(blacklist_categories=("Cs",))), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(database=None)
@given(
    st.lists(st.dictionaries(st.text(max_size=5), JSON, max_size=4), max_size=5),
    st.booleans(),
    st.lists(st.integers(min_value=0), max_size=30),
)
def test_splitter_cuts_out_any_array_of_objects(
    objects: list[dict[str, Any]], pretty: bool, cuts: list[int]
) -> None:
    data = array(*objects) if pretty else orjson.dumps(objects)
    assert [orjson.loads(obj) for obj in cut_out(data, cuts)] == objects
