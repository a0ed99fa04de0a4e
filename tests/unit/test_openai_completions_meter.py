"""OpenAICompletionsMeter (legacy ``/v1/completions``): fixtures, edge cases, properties."""

from __future__ import annotations

import orjson
import pytest

from ext_proc.metering.meters.base import MeterResult
from ext_proc.metering.meters.openai_completions import OpenAICompletionsMeter
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

INSTRUCT = "gpt-3.5-turbo-instruct"
TEXT = "\n\nThis is indeed a test"  # 23 characters

FIXTURE_RESULTS = {
    "completions_basic.json": exact(INSTRUCT, Usage(5, output_tokens=7)),
    "completions_stream_usage.sse": exact(INSTRUCT, Usage(5, output_tokens=7)),
    "completions_stream_no_usage.sse": estimated(INSTRUCT, len(TEXT), "no usage in stream"),
}
STREAMS = [n for n in FIXTURE_RESULTS if n.endswith(".sse")]
GARBAGE = [b"data: ", b"\n\n", b"\r", b"[DONE]", b"{", b"}", b'"usage":', b'"text":']
CASES = MeterCases(OpenAICompletionsMeter, FIXTURES / "openai", FIXTURE_RESULTS, STREAMS, GARBAGE)
fixture, meter = CASES.fixture, CASES.meter


class TestContract(meter_contract(CASES)):
    """The tests every meter passes (tests/unit/meter_cases.py)."""

    def check_truncated(self, full: bytes, data: bytes, aborted: bool, whole: MeterResult) -> None:
        if aborted and not whole.complete and whole.error != "provider error":
            assert whole.error == "stream aborted"


U = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            {"model": "m", "usage": U}, exact("m", Usage(10, output_tokens=5)), id="usage"
        ),
        pytest.param(
            {"model": "m", "choices": [{"text": "abcdefghi"}, {"text": "jk"}, {"text": 5}, "x"]},
            estimated("m", 11, "no usage in response"),
            id="estimate-every-choice",
        ),
        pytest.param(
            {"error": {"message": "bad", "type": "invalid_request_error"}},
            failed("provider error"),
            id="error",
        ),
        pytest.param({"choices": "x", "usage": "x"}, failed("no usage in response"), id="junk"),
    ],
)
def test_json_body(body: object, expected: MeterResult) -> None:
    assert meter(orjson.dumps(body), streaming=False) == expected


def test_stream_metered_though_the_request_did_not_ask_for_one() -> None:
    """``"stream": "true"`` streams on lenient servers: the body says what it is."""
    data = fixture("completions_stream_usage.sse")
    assert meter(data, streaming=False) == FIXTURE_RESULTS["completions_stream_usage.sse"]
    assert meter(b"\n" + data, streaming=False) == FIXTURE_RESULTS["completions_stream_usage.sse"]


def test_json_answer_to_a_stream_request() -> None:
    data = fixture("completions_basic.json")
    assert meter(data, streaming=True) == FIXTURE_RESULTS["completions_basic.json"]


def test_stream_cut_is_estimated_from_text() -> None:
    events = sse(
        {"model": INSTRUCT, "choices": [{"text": "abcd"}]},
        {"model": INSTRUCT, "choices": [{"text": "efgh"}]},
    )
    assert meter(events, streaming=True, aborted=True) == estimated(INSTRUCT, 8, "stream aborted")
