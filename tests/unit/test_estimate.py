"""What a reservation holds (ext_proc/admission/estimate.py): a high percentile of what
the model produced on the route recently, the default until there is data,
never more than the request's max_tokens nor, per window, the policy's amount;
bounded memory."""

from __future__ import annotations

import pytest

from ext_proc.admission import estimate
from ext_proc.admission.estimate import (
    MIN_SAMPLES,
    SAMPLES,
    OutputEstimator,
    max_tokens_of,
    per_window,
)

KEY = ("gpt-4o-mini", "openai")


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        pytest.param([7], 95, 7, id="one-value"),
        pytest.param(list(range(1, 101)), 95, 95, id="p95-of-1-to-100"),
        pytest.param(list(range(1, 101)), 100, 100, id="p100-is-the-max"),
        pytest.param(list(range(1, 101)), 50, 50, id="median"),
        pytest.param([5, 1, 4, 2, 3], 95, 5, id="few-values-take-the-top"),
        pytest.param([10] * 19 + [10_000], 95, 10, id="one-outlier-in-twenty-ignored"),
        pytest.param([10] * 18 + [10_000] * 2, 95, 10_000, id="two-in-twenty-counted"),
    ],
)
def test_percentile_is_nearest_rank(values: list[int], p: int, expected: int) -> None:
    assert estimate.percentile(values, p) == expected


def test_the_default_until_a_few_answers_were_seen() -> None:
    e = OutputEstimator(default_tokens=4096)
    for _ in range(MIN_SAMPLES - 1):
        e.record(KEY, 16)
    assert e.output_tokens(KEY) == 4096
    e.record(KEY, 16)
    assert e.output_tokens(KEY) == 16
    assert e.output_tokens(("gpt-4o-mini", "another-route")) == 4096


def test_only_the_last_answers_count() -> None:
    e = OutputEstimator(default_tokens=4096)
    for _ in range(SAMPLES):
        e.record(KEY, 1000)
    assert e.output_tokens(KEY) == 1000
    for _ in range(SAMPLES):
        e.record(KEY, 20)
    assert e.output_tokens(KEY) == 20


@pytest.mark.parametrize(
    ("learned", "max_tokens", "expected"),
    [
        pytest.param(None, None, 4096, id="default"),
        pytest.param(None, 100, 100, id="default-bounded-by-max-tokens"),
        pytest.param(None, 10**12, 4096, id="absurd-max-tokens-changes-nothing"),
        pytest.param(300, None, 300, id="learned"),
        pytest.param(300, 10**12, 300, id="learned-absurd-max-tokens"),
        pytest.param(300, 50, 50, id="learned-bounded-by-max-tokens"),
    ],
)
def test_estimate(learned: int | None, max_tokens: int | None, expected: int) -> None:
    e = OutputEstimator(default_tokens=4096)
    if learned is not None:
        for _ in range(MIN_SAMPLES):
            e.record(KEY, learned)
    assert e.estimate(KEY, max_tokens) == expected


def test_an_absurd_report_is_learned_bounded() -> None:
    e = OutputEstimator(default_tokens=0, percentile=100)
    for _ in range(MIN_SAMPLES):
        e.record(KEY, 99_999_999_999_999_999)
    assert e.output_tokens(KEY) == estimate.MAX_LEARNED_TOKENS


def test_keys_are_bounded_least_recently_used_first_out() -> None:
    e = OutputEstimator(default_tokens=4096)
    for _ in range(MIN_SAMPLES):
        e.record(("first", ""), 1)
    for i in range(estimate.MAX_KEYS - 1):
        e.record((f"m{i}", ""), 1)
    e.record(("first", ""), 1)  # used again: not the oldest any more
    e.record(("one-more", ""), 1)
    assert len(e) == estimate.MAX_KEYS
    assert e.output_tokens(("first", "")) == 1
    assert ("m0", "") not in e._recent


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"max_tokens": 500}, 500, id="max_tokens"),
        pytest.param({"max_completion_tokens": 7}, 7, id="max_completion_tokens"),
        pytest.param({"max_output_tokens": 9}, 9, id="responses-api"),
        pytest.param({"max_tokens": True}, None, id="bool-is-no-limit"),
        pytest.param({"max_tokens": 0}, None, id="zero-is-no-limit"),
        pytest.param({"max_tokens": "500"}, None, id="string-is-no-limit"),
        pytest.param({}, None, id="none"),
    ],
)
def test_max_tokens_of(body: dict[str, object], expected: int | None) -> None:
    assert max_tokens_of(body) == expected


def test_no_window_is_held_for_more_than_its_policy_amount() -> None:
    assert per_window(600_000 * 10**9, [10 * 10**9, 10**15]) == [10 * 10**9, 600_000 * 10**9]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="percentile"):
        OutputEstimator(4096, percentile=0)
    with pytest.raises(ValueError, match="default_tokens"):
        OutputEstimator(-1)
