"""BedrockInvokeMeter (InvokeModel / InvokeModelWithResponseStream): each model
family's bodies and streams, usage from the response headers, cut streams.

The streams are encoded by tests/fixtures/bedrock/invoke.py and checked here
against botocore's own InvokeModelWithResponseStream parser.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from functools import partial
from typing import Any

import botocore.session
import orjson
import pytest
from botocore.eventstream import EventStream
from botocore.exceptions import EventStreamError
from botocore.parsers import EventStreamJSONParser

from ext_proc.metering.meters.base import MeterResult
from ext_proc.metering.meters.bedrock_invoke import BedrockInvokeMeter, header_usage
from ext_proc.metering.shapes import BEDROCK_INVOKE, detect
from spendgate.domain.usage import Usage
from tests.fixtures.bedrock.invoke import (
    BODIES,
    CLAUDE_STREAM,
    COHERE_HEADERS,
    LLAMA_STREAM,
    MISTRAL_HEADERS,
    NOVA_STREAM,
    STREAMS,
    chunk,
)
from tests.fixtures.bedrock.streams import encode_message, exception

pytest.register_assert_rewrite("tests.unit.meter_cases")
from tests.unit import meter_cases  # noqa: E402
from tests.unit.meter_cases import FIXTURES, MeterCases, meter_contract  # noqa: E402

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
CLAUDE = Usage(2112, 2000, 100, None, 11)  # 12 + 2000 read + 100 written


def exact(usage: Usage, error: str | None = None) -> MeterResult:
    return meter_cases.exact(MODEL, usage, error)


def estimated(usage: Usage, error: str) -> MeterResult:
    return MeterResult(MODEL, usage, False, error)


def failed(error: str) -> MeterResult:
    return meter_cases.failed(error, MODEL)


def text_only(chars: int, error: str) -> MeterResult:
    return meter_cases.estimated(MODEL, chars, error)


FIXTURE_RESULTS = {
    "invoke_claude.json": exact(CLAUDE),
    "invoke_nova.json": exact(Usage(609, 600, 0, output_tokens=8)),
    "invoke_llama.json": exact(Usage(21, output_tokens=12)),
    # Neither body carries usage (it is in the headers, absent here).
    "invoke_mistral.json": text_only(30, "no usage in response"),
    "invoke_cohere.json": text_only(18, "no usage in response"),
    "invoke_stream_claude.bin": exact(CLAUDE),
    "invoke_stream_nova.bin": exact(Usage(9, output_tokens=8)),
    "invoke_stream_llama.bin": exact(Usage(21, output_tokens=12)),
    "invoke_stream_mistral.bin": exact(Usage(15, output_tokens=9)),
    "invoke_stream_cohere.bin": exact(Usage(8, output_tokens=6)),
    # message_start's input, then "Once upon a time" (16 chars) and an exception
    "invoke_stream_exception.bin": estimated(
        Usage(2112, 2000, 100, None, 4, estimated=True), "provider error"
    ),
}
GARBAGE = [b"{", b"}", b'"bytes":', b"\x00\x00\x00", *CLAUDE_STREAM[:2], *LLAMA_STREAM[:1]]
CASES = MeterCases(
    partial(BedrockInvokeMeter, model_from_path=MODEL),
    FIXTURES / "bedrock",
    FIXTURE_RESULTS,
    sorted(STREAMS),
    GARBAGE,
    body_model=MODEL,
    slack=0,
)
fixture, meter = CASES.fixture, CASES.meter


class TestContract(meter_contract(CASES)):
    """The tests every meter passes (tests/unit/meter_cases.py)."""

    def check_truncated(self, full: bytes, data: bytes, aborted: bool, whole: MeterResult) -> None:
        if aborted and not whole.complete and whole.error != "provider error":
            assert whole.error == "stream aborted"
            assert whole.usage is None or whole.usage.estimated


def botocore_chunks(data: bytes) -> Iterator[dict[str, Any]]:
    """InvokeModelWithResponseStream events as botocore parses them."""

    class Raw:
        def stream(self) -> Iterator[bytes]:
            yield data

        def close(self) -> None:
            pass

    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    operation = model.operation_model("InvokeModelWithResponseStream")
    shape = operation.output_shape.members["body"]
    yield from EventStream(Raw(), shape, EventStreamJSONParser(), "InvokeModelWithResponseStream")


@pytest.mark.parametrize("name", sorted(n for n in STREAMS if "exception" not in n))
def test_streams_are_what_botocore_parses(name: str) -> None:
    events = list(botocore_chunks(fixture(name)))
    objects = [orjson.loads(e["chunk"]["bytes"]) for e in events]
    assert "amazon-bedrock-invocationMetrics" in objects[-1]


def test_exception_is_what_botocore_raises() -> None:
    with pytest.raises(EventStreamError, match="modelStreamErrorException"):
        list(botocore_chunks(fixture("invoke_stream_exception.bin")))


# -- usage from the response headers ---------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(MISTRAL_HEADERS, Usage(15, output_tokens=9), id="input-and-output"),
        pytest.param(
            {
                **COHERE_HEADERS,
                "x-amzn-bedrock-cache-read-input-token-count": "100",
                "x-amzn-bedrock-cache-write-input-token-count": "20",
            },
            Usage(128, 100, 20, output_tokens=6),
            id="cache-added-to-input",
        ),
        pytest.param(
            {"x-amzn-bedrock-input-token-count": " 15 ", "x-amzn-bedrock-output-token-count": "0"},
            Usage(15, output_tokens=0),
            id="padded-and-zero",
        ),
        pytest.param({"x-amzn-bedrock-input-token-count": "15"}, Usage(15), id="no-output-count"),
        pytest.param({"x-amzn-bedrock-output-token-count": "9"}, None, id="no-input"),
        pytest.param(
            {"x-amzn-bedrock-input-token-count": "-1", "x-amzn-bedrock-output-token-count": "9"},
            None,
            id="negative",
        ),
        pytest.param(
            {
                "x-amzn-bedrock-input-token-count": "\uff11\uff15",
                "x-amzn-bedrock-output-token-count": "9",
            },
            None,
            id="non-ascii-digits",
        ),
        pytest.param(
            {
                "x-amzn-bedrock-input-token-count": "9" * 13,
                "x-amzn-bedrock-output-token-count": "9",
            },
            None,
            id="absurdly-large",
        ),
        pytest.param({}, None, id="none"),
    ],
)
def test_header_usage(headers: dict[str, str], expected: Usage | None) -> None:
    assert header_usage(headers) == expected


@pytest.mark.parametrize(
    ("name", "headers", "expected"),
    [
        pytest.param(
            "invoke_mistral.json", MISTRAL_HEADERS, exact(Usage(15, output_tokens=9)), id="mistral"
        ),
        pytest.param(
            "invoke_cohere.json", COHERE_HEADERS, exact(Usage(8, output_tokens=6)), id="cohere"
        ),
        # The family's own report wins: it splits cache writes the headers do not.
        pytest.param("invoke_claude.json", MISTRAL_HEADERS, exact(CLAUDE), id="body-wins"),
        # Without an output count, generated text is estimated...
        pytest.param(
            "invoke_mistral.json",
            {"x-amzn-bedrock-input-token-count": "15"},
            estimated(Usage(15, output_tokens=8, estimated=True), "no usage in response"),
            id="no-output-count-with-text",
        ),
    ],
)
def test_body_with_usage_headers(name: str, headers: dict[str, str], expected: MeterResult) -> None:
    assert meter(fixture(name), streaming=False, headers=headers) == expected


# -- bodies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            {"generation": "abcd", "prompt_token_count": 3, "generation_token_count": None},
            estimated(Usage(3, output_tokens=1, estimated=True), "no usage in response"),
            id="llama-without-output-count",
        ),
        pytest.param(
            {"choices": [{"message": {"content": "abcd"}}], "usage": {"prompt_tokens": 4}},
            estimated(Usage(4, output_tokens=1, estimated=True), "no usage in response"),
            id="openai-style-input-only",
        ),
        pytest.param(
            {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
            },
            exact(Usage(4, output_tokens=2)),
            id="mistral-large-chat",
        ),
        pytest.param(
            {"text": "hi", "meta": {"billed_units": {"input_tokens": 7, "output_tokens": 1}}},
            exact(Usage(7, output_tokens=1)),
            id="cohere-billed-units",
        ),
        pytest.param(
            {"generations": [{"text": "abcdefgh"}, {"text": "ij"}]},
            text_only(10, "no usage in response"),
            id="cohere-command-generations",
        ),
        pytest.param(
            {"choices": [{"text": "abcd", "stop_reason": "stop"}]},
            text_only(4, "no usage in response"),
            id="deepseek-text-choices",
        ),
        pytest.param(
            {"amazon-bedrock-invocationMetrics": {"inputTokenCount": 5, "outputTokenCount": 2}},
            exact(Usage(5, output_tokens=2)),
            id="invocation-metrics",
        ),
        pytest.param(
            {"embedding": [0.1, 0.2], "inputTextTokenCount": 5},
            exact(Usage(5, output_tokens=0)),
            id="titan-embedding",
        ),
        pytest.param(
            {
                "inputTextTokenCount": 6,
                "results": [{"tokenCount": 3, "outputText": "abc", "completionReason": "FINISH"}],
            },
            exact(Usage(6, output_tokens=3)),
            id="titan-text",
        ),
        pytest.param(
            {"inputTextTokenCount": 6, "results": [{"outputText": "abcdefgh"}]},
            estimated(Usage(6, output_tokens=2, estimated=True), "no usage in response"),
            id="titan-text-without-count",
        ),
        pytest.param({"message": "Malformed input request"}, failed("provider error"), id="error"),
        pytest.param({"type": "error", "error": {}}, failed("provider error"), id="claude-error"),
        pytest.param(
            {"generation": 5, "outputs": "x", "choices": [1], "usage": [], "meta": "x"},
            failed("no usage in response"),
            id="junk",
        ),
    ],
)
def test_json_body(body: object, expected: MeterResult) -> None:
    assert meter(orjson.dumps(body), streaming=False) == expected


# -- streams ---------------------------------------------------------------------


def raw_chunk(payload: bytes) -> bytes:
    return encode_message(payload, [(":event-type", 7, "chunk"), (":message-type", 7, "event")])


@pytest.mark.parametrize(
    ("stream", "aborted", "expected"),
    [
        pytest.param(
            b"".join(CLAUDE_STREAM[:4]),
            True,
            # message_start's counts, output from "Hello! How" (10 chars)
            estimated(Usage(2112, 2000, 100, None, 3, estimated=True), "stream aborted"),
            id="claude-cut",
        ),
        pytest.param(
            b"".join(LLAMA_STREAM[:2]),
            True,
            # prompt 21 from the first chunk; 5 generated so far beats 23 chars -> 6
            estimated(Usage(21, output_tokens=6, estimated=True), "stream aborted"),
            id="llama-cut",
        ),
        pytest.param(
            b"".join(NOVA_STREAM[:3]),
            True,
            text_only(len("Paris is the capital"), "stream aborted"),
            id="nova-cut-text-only",
        ),
        pytest.param(b"", True, failed("stream aborted"), id="cut-before-anything"),
        pytest.param(
            b"".join(LLAMA_STREAM[:2]),
            False,
            estimated(Usage(21, output_tokens=6, estimated=True), "no usage in stream"),
            id="llama-ended-early",
        ),
        pytest.param(
            raw_chunk(b'{"bytes": "not base64!"}')
            + raw_chunk(b'{"bytes": 5}')
            + raw_chunk(b"[]")
            + raw_chunk(orjson.dumps({"bytes": base64.b64encode(b"[1]").decode()}))
            + chunk({"generation": "ab"}),
            True,
            text_only(2, "stream aborted"),
            id="bad-chunks-skipped",
        ),
        pytest.param(
            chunk({"generation": "ab"}) + exception("throttlingException", {"message": "slow"}),
            False,
            text_only(2, "provider error"),
            id="exception",
        ),
    ],
)
def test_stream(stream: bytes, aborted: bool, expected: MeterResult) -> None:
    assert meter(stream, streaming=True, aborted=aborted) == expected


def test_stream_counts_chunks_it_cannot_read() -> None:
    m = BedrockInvokeMeter(streaming=True, model_from_path=MODEL)
    m.feed(raw_chunk(b'{"bytes": "%%%"}') + raw_chunk(b"{}"))
    assert m.bad_events == 2


# -- the shape -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type", "name", "expected"),
    [
        pytest.param(
            "/model/m/invoke", "application/json", "invoke_llama.json", "json", id="invoke"
        ),
        pytest.param(
            "/model/m/invoke-with-response-stream",
            "application/vnd.amazon.eventstream",
            "invoke_stream_llama.bin",
            "stream",
            id="stream",
        ),
        pytest.param(
            "/model/m/invoke-with-response-stream",
            "application/json",
            "invoke_llama.json",
            "json",
            id="json-error-to-stream-request",
        ),
        pytest.param(
            "/model/m/invoke-with-response-stream",
            "",
            "invoke_stream_llama.bin",
            "stream",
            id="no-content-type",
        ),
    ],
)
def test_shape_meters_by_content_type(
    path: str, content_type: str, name: str, expected: str
) -> None:
    assert detect("POST", path) is BEDROCK_INVOKE
    m = BEDROCK_INVOKE.new_meter(path, content_type, "meta.llama3-3-70b-instruct-v1:0", {})
    m.feed(fixture(name))
    result = m.finish()
    assert result.usage == Usage(21, output_tokens=12)
    assert result.model == "meta.llama3-3-70b-instruct-v1:0"


def test_shape_reads_usage_headers() -> None:
    m = BEDROCK_INVOKE.new_meter("/model/m/invoke", "application/json", "m", MISTRAL_HEADERS)
    m.feed(orjson.dumps(BODIES["invoke_mistral.json"]))
    assert m.finish() == MeterResult("m", Usage(15, output_tokens=9), True, None)


def test_embedding_without_output_header_is_charged_its_input() -> None:
    """... but an answer that generated nothing (an embedding) has no output."""
    body = {"embeddings": [[0.25, -0.5]], "id": "e1", "response_type": "embeddings_floats"}
    headers = {"x-amzn-bedrock-input-token-count": "4"}
    result = meter(orjson.dumps(body), streaming=False, headers=headers)
    assert result == exact(Usage(4, output_tokens=0))
