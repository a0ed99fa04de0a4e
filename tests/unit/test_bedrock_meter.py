"""BedrockConverseMeter and bedrock_model_from_path: fixtures, edge cases, properties.

The stream fixtures are encoded by tests/fixtures/bedrock/streams.py and are
checked here against botocore's own ConverseStream parser (its service model),
so their shapes are Bedrock's, not ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import botocore.session
import orjson
import pytest
from botocore.eventstream import EventStream
from botocore.exceptions import EventStreamError
from botocore.parsers import EventStreamJSONParser, RestJSONParser
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_proc.metering.meters.base import MeterResult
from ext_proc.metering.meters.bedrock_converse import BedrockConverseMeter, bedrock_model_from_path
from spendgate.domain.usage import Usage
from tests.fixtures.bedrock.streams import (
    BASIC,
    STREAMS,
    encode_message,
    event,
    exception,
    stop,
    text_delta,
)

pytest.register_assert_rewrite("tests.unit.meter_cases")
from tests.unit import meter_cases  # noqa: E402
from tests.unit.meter_cases import (  # noqa: E402
    CUTS,
    FIXTURES,
    MeterCases,
    bytewise,
    meter_contract,
    split,
)

SONNET = "us.anthropic.claude-sonnet-4-20250514-v1:0"
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"


def exact(usage: Usage, error: str | None = None, model: str | None = SONNET) -> MeterResult:
    return meter_cases.exact(model, usage, error)


def estimated(chars: int, error: str, model: str | None = SONNET) -> MeterResult:
    return meter_cases.estimated(model, chars, error)


def failed(error: str, model: str | None = SONNET) -> MeterResult:
    return meter_cases.failed(error, model)


FIXTURE_RESULTS = {
    "converse_basic.json": exact(Usage(14, output_tokens=29)),
    # 12 + 1830 read + 612 written (412 for 1h, 200 for 5m)
    "converse_cache.json": exact(Usage(2454, 1830, 200, 412, output_tokens=21)),
    "converse_error.json": failed("provider error"),
    "converse_stream_basic.bin": exact(Usage(12, output_tokens=10)),
    "converse_stream_tool_use.bin": exact(Usage(2385, 2048, 310, output_tokens=61)),
    # "Once upon a time" = 16 chars, then modelStreamErrorException
    "converse_stream_exception.bin": estimated(16, "provider error"),
}


GARBAGE = [b"{", b"}", b'"usage":', b"\x00\x00\x00", *BASIC]
CASES = MeterCases(
    partial(BedrockConverseMeter, model_from_path=SONNET),
    FIXTURES / "bedrock",
    FIXTURE_RESULTS,
    sorted(STREAMS),
    GARBAGE,
    body_model=SONNET,
    slack=0,
)
fixture, meter = CASES.fixture, CASES.meter


class TestContract(meter_contract(CASES)):
    """The tests every meter passes (tests/unit/meter_cases.py)."""

    def check_truncated(self, full: bytes, data: bytes, aborted: bool, whole: MeterResult) -> None:
        if aborted and not whole.complete and whole.error != "provider error":
            assert whole.error == "stream aborted"
            assert whole.usage is None or whole.usage.estimated


def botocore_events(data: bytes) -> Iterator[dict[str, Any]]:
    """ConverseStream events as botocore parses them (its own service model)."""

    class Raw:
        def stream(self) -> Iterator[bytes]:
            yield data

        def close(self) -> None:
            pass

    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    shape = model.operation_model("ConverseStream").output_shape.members["stream"]
    yield from EventStream(Raw(), shape, EventStreamJSONParser(), "ConverseStream")


def test_fixtures_are_what_botocore_parses() -> None:
    events = list(botocore_events(fixture("converse_stream_tool_use.bin")))
    assert [next(iter(e)) for e in events][:2] == ["messageStart", "contentBlockDelta"]
    assert events[-1]["metadata"]["usage"]["cacheReadInputTokens"] == 2048
    assert len(list(botocore_events(fixture("converse_stream_basic.bin")))) == len(BASIC)
    with pytest.raises(EventStreamError, match="modelStreamErrorException"):
        list(botocore_events(fixture("converse_stream_exception.bin")))
    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    body = {"status_code": 200, "headers": {}, "body": fixture("converse_cache.json")}
    parsed = RestJSONParser().parse(body, model.operation_model("Converse").output_shape)
    assert parsed["usage"]["cacheWriteInputTokens"] == 612


# -- model from the path --------------------------------------------------------

PROFILE_ARN = (
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
    "us.anthropic.claude-3-7-sonnet-20250219-v1:0"
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param(
            "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse",
            "anthropic.claude-3-5-haiku-20241022-v1:0",
            id="encoded-colon",
        ),
        pytest.param(f"/model/{SONNET}/converse-stream", SONNET, id="profile-stream"),
        pytest.param(
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
            "us.anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse",
            PROFILE_ARN,
            id="encoded-arn",
        ),
        pytest.param(f"/model/{PROFILE_ARN}/converse", PROFILE_ARN, id="raw-arn"),
        pytest.param("/model/amazon.nova-pro-v1:0/invoke", "amazon.nova-pro-v1:0", id="invoke"),
        pytest.param("/model/m/invoke-with-response-stream", "m", id="invoke-with-response-stream"),
        pytest.param("/model/m/converse?trace=1", "m", id="query"),
        pytest.param("/model/m/converse/", "m", id="trailing-slash"),
        pytest.param("/bedrock/model/m/converse", "m", id="route-prefix"),
        pytest.param("/model/%20/converse", None, id="blank-id"),
        pytest.param("/model//converse", None, id="empty-id"),
        pytest.param("/model/m/converse/extra", None, id="extra-segment"),
        pytest.param("/models/m/converse", None, id="models"),
        pytest.param("/v1/chat/completions", None, id="not-bedrock"),
        pytest.param("", None, id="empty"),
    ],
)
def test_bedrock_model_from_path(path: str, expected: str | None) -> None:
    assert bedrock_model_from_path(path) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        pytest.param(HAIKU.replace(":", "%3A"), HAIKU, id="encoded"),
        pytest.param(SONNET, SONNET, id="decoded"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="none"),
    ],
)
def test_model_from_path_is_decoded(model: str | None, expected: str | None) -> None:
    result = meter(fixture("converse_basic.json"), streaming=False, model_from_path=model)
    assert result == exact(Usage(14, output_tokens=29), model=expected)


# -- non-streaming -------------------------------------------------------------

U = {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15}
TEXT = {"output": {"message": {"role": "assistant", "content": [{"text": "abcdefghi"}]}}}


def writes(*details: object) -> dict[str, object]:
    """A body whose usage reports 9 cache writes, detailed as given."""
    return {"usage": {**U, "cacheWriteInputTokens": 9, "cacheDetails": list(details)}}


def content(*blocks: object) -> dict[str, object]:
    return {"output": {"message": {"role": "assistant", "content": list(blocks)}}}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"usage": U}, exact(Usage(10, output_tokens=5)), id="no-cache-fields"),
        pytest.param(
            {"usage": {**U, "cacheReadInputTokens": 0, "cacheWriteInputTokens": 0}},
            exact(Usage(10, 0, 0, output_tokens=5)),
            id="zero-cache",
        ),
        pytest.param(
            {"usage": {**U, "cacheReadInputTokens": 7}},
            exact(Usage(17, 7, output_tokens=5)),
            id="cache-read-added-to-input",
        ),
        pytest.param(
            writes({"ttl": "1h", "inputTokens": 9}),
            exact(Usage(19, None, 0, 9, output_tokens=5)),
            id="all-writes-1h",
        ),
        pytest.param(
            writes({"ttl": "1h", "inputTokens": 50}),
            exact(Usage(19, None, 0, 9, output_tokens=5)),
            id="1h-clamped-to-writes",
        ),
        pytest.param(
            writes({"ttl": "5m", "inputTokens": 9}),
            exact(Usage(19, None, 9, output_tokens=5)),
            id="all-writes-5m",
        ),
        pytest.param(
            {"usage": {**U, "cacheDetails": [{"ttl": "1h", "inputTokens": 9}]}},
            exact(Usage(10, output_tokens=5)),
            id="details-without-writes-ignored",
        ),
        pytest.param(
            writes(None, "x", {"ttl": "1h"}, {"ttl": "1h", "inputTokens": True}),
            exact(Usage(19, None, 9, output_tokens=5)),
            id="junk-details",
        ),
        pytest.param(
            {"usage": {**U, "cacheWriteInputTokens": 9, "cacheDetails": {"ttl": "1h"}}},
            exact(Usage(19, None, 9, output_tokens=5)),
            id="details-not-a-list",
        ),
        pytest.param(
            {"usage": {"inputTokens": True, "outputTokens": 5, "cacheReadInputTokens": 3}},
            exact(Usage(3, 3, output_tokens=5)),
            id="bool-is-not-int",
        ),
        pytest.param(
            {"usage": {"inputTokens": "10", "outputTokens": 5.0, "totalTokens": 15}},
            failed("no usage in response"),
            id="str-and-float-counts",
        ),
        pytest.param(
            {"usage": {"inputTokens": -1, "outputTokens": 1e30}},
            failed("no usage in response"),
            id="negative-and-huge-counts",
        ),
        pytest.param({"usage": {}, **TEXT}, estimated(9, "no usage in response"), id="estimate"),
        pytest.param(
            content(
                {"reasoningContent": {"reasoningText": {"text": "abcd", "signature": "sig"}}},
                {"text": "ef"},
                {"toolUse": {"toolUseId": "t", "name": "f", "input": {"a": 1}}},
            ),
            estimated(4 + 2 + len('{"a":1}'), "no usage in response"),
            id="estimate-reasoning-and-tool-input",
        ),
        pytest.param(
            content({"toolUse": {"toolUseId": "t", "name": "f", "input": {"a": "ééé"}}}),
            estimated(len('{"a":"ééé"}'), "no usage in response"),  # 11 characters, 14 bytes
            id="tool-input-counted-in-characters",
        ),
        pytest.param(
            content({"toolUse": {"toolUseId": "t", "name": "f", "input": None}}),
            estimated(len("null"), "no usage in response"),
            id="null-tool-input-counted-as-null",
        ),
        pytest.param(
            content(
                None, "x", {"text": 5}, {"toolUse": "x"}, {"reasoningContent": {"reasoningText": 1}}
            ),
            failed("no usage in response"),
            id="junk-content",
        ),
        pytest.param({"output": "x", "usage": "x"}, failed("no usage in response"), id="junk"),
        pytest.param({"Message": "Unauthorized"}, failed("provider error"), id="capital-message"),
        pytest.param(
            {"message": "hi", "usage": U},
            exact(Usage(10, output_tokens=5)),
            id="message-key-with-usage",
        ),
    ],
)
def test_json_body(body: object, expected: MeterResult) -> None:
    assert meter(orjson.dumps(body), streaming=False) == expected


# -- streaming -----------------------------------------------------------------

STREAM = fixture("converse_stream_basic.bin")
NO_METADATA = b"".join(BASIC[:-1])  # cut before the usage report
HELLO = len("Hello! How can I help you today?")
METADATA_U = event("metadata", {"usage": U, "metrics": {"latencyMs": 1}})
CORRUPT = bytearray(BASIC[1])
CORRUPT[-1] ^= 0xFF


def error_message(code: str, text: str) -> bytes:
    headers = [(":message-type", 7, "error"), (":error-code", 7, code), (":error-message", 7, text)]
    return encode_message(b"", headers)


@pytest.mark.parametrize(
    ("stream", "aborted", "expected"),
    [
        pytest.param(NO_METADATA, True, estimated(HELLO, "stream aborted"), id="aborted"),
        pytest.param(
            NO_METADATA, False, estimated(HELLO, "no usage in stream"), id="ended-without-usage"
        ),
        pytest.param(
            NO_METADATA + BASIC[-1][:-1],
            True,
            estimated(HELLO, "stream aborted"),
            id="aborted-inside-metadata",
        ),
        pytest.param(STREAM, True, exact(Usage(12, output_tokens=10)), id="aborted-after-usage"),
        pytest.param(b"", True, failed("stream aborted"), id="aborted-before-anything"),
        pytest.param(b"", False, failed("no usage in stream"), id="empty-stream"),
        pytest.param(
            NO_METADATA + exception("throttlingException", {"message": "slow down"}),
            False,
            estimated(HELLO, "provider error"),
            id="exception-mid-stream",
        ),
        pytest.param(
            STREAM + exception("internalServerException", {"message": "oops"}),
            False,
            exact(Usage(12, output_tokens=10), "provider error"),
            id="exception-after-usage",
        ),
        pytest.param(
            text_delta(0, "ab") + error_message("InternalFailure", "boom"),
            False,
            estimated(2, "provider error"),
            id="error-message",
        ),
        pytest.param(
            BASIC[0] + bytes(CORRUPT) + BASIC[2],
            False,
            failed("invalid event stream"),
            id="bad-crc-before-usage",
        ),
        pytest.param(
            NO_METADATA + bytes(CORRUPT) + METADATA_U,
            False,
            estimated(HELLO, "invalid event stream"),
            id="bad-crc-hides-later-usage",
        ),
        pytest.param(
            STREAM + bytes(CORRUPT),
            False,
            exact(Usage(12, output_tokens=10)),
            id="bad-crc-after-usage",
        ),
        pytest.param(
            event("metadata", {"usage": {**U, "outputTokens": 1}}) + METADATA_U,
            False,
            exact(Usage(10, output_tokens=5)),
            id="last-usage-wins",
        ),
        pytest.param(
            METADATA_U + event("metadata", {"usage": None}) + event("metadata", {"usage": {}}),
            False,
            exact(Usage(10, output_tokens=5)),
            id="empty-usage-does-not-erase",
        ),
        pytest.param(
            event("metadata", {"usage": {"inputTokens": "1", "outputTokens": False}}),
            False,
            failed("no usage in stream"),
            id="junk-usage",
        ),
        pytest.param(
            text_delta(0, "ab")
            + encode_message(b"not json", [(":event-type", 7, "contentBlockDelta")])
            + encode_message(b"[1]", [(":event-type", 7, "metadata")])
            + encode_message(b'{"usage": ', [(":event-type", 7, "metadata")]),
            True,
            estimated(2, "stream aborted"),
            id="bad-payloads-skipped",
        ),
        pytest.param(
            event("contentBlockDelta", {"delta": {"text": None, "toolUse": {"input": 5}}})
            + event("contentBlockDelta", {"delta": "x"})
            + event("contentBlockDelta", {"delta": {"reasoningContent": "x", "toolUse": "x"}})
            + event("contentBlockDelta", {"delta": {"reasoningContent": {"signature": "sig"}}}),
            False,
            failed("no usage in stream"),
            id="junk-deltas",
        ),
        pytest.param(
            event("contentBlockDelta", {"delta": {"text": "abc", "toolUse": {"input": "de"}}})
            + event("contentBlockDelta", {"delta": {"reasoningContent": {"text": "fgh"}}}),
            False,
            estimated(8, "no usage in stream"),
            id="every-delta-kind",
        ),
        pytest.param(
            encode_message(orjson.dumps({"delta": {"text": "abc"}}))
            + event("someFutureEvent", {"usage": U, "delta": {"text": "abc"}})
            + encode_message(orjson.dumps({"usage": U}), [(":event-type", 6, b"metadata")]),
            False,
            failed("no usage in stream"),
            id="unknown-or-missing-event-type",
        ),
        pytest.param(
            text_delta(0, "ab") + stop(0) + METADATA_U,
            False,
            exact(Usage(10, output_tokens=5)),
            id="usage-beats-estimate",
        ),
    ],
)
def test_stream(stream: bytes, aborted: bool, expected: MeterResult) -> None:
    assert meter(stream, streaming=True, aborted=aborted) == expected
    assert meter(*bytewise(stream), streaming=True, aborted=aborted) == expected


def test_bad_events_are_counted() -> None:
    m = BedrockConverseMeter(streaming=True, model_from_path=None)
    m.feed(encode_message(b"not json") + encode_message(b"[1]") + encode_message(b"null"))
    m.feed(STREAM)
    assert m.finish() == exact(Usage(12, output_tokens=10), model=None)
    assert m.bad_events == 3


def test_oversized_stream_message_is_skipped() -> None:
    big = event("contentBlockDelta", {"delta": {"text": "x" * 2000}})
    result = meter(text_delta(0, "ab") + big + METADATA_U, streaming=True, max_body_bytes=1000)
    assert result == exact(Usage(10, output_tokens=5))


# -- properties ----------------------------------------------------------------


@settings(database=None)
@given(st.sampled_from(sorted(STREAMS)), st.data())
def test_corrupted_streams_never_raise(name: str, data: st.DataObject) -> None:
    stream = bytearray(fixture(name))
    for _ in range(data.draw(st.integers(1, 3))):
        stream[data.draw(st.integers(0, len(stream) - 1))] ^= data.draw(st.integers(1, 255))
    result = meter(*split(bytes(stream), data.draw(CUTS)), streaming=True)
    assert result.model == SONNET
    assert result.complete or result.error is not None
