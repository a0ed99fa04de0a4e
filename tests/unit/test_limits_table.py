"""The table of limits (spendgate/domain/limits.py) is the one in
docs/concepts/limits.md, and the pure helpers behind safe output and page
tokens do what they promise."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import grpc
import pytest
import structlog

from control_plane.api.errors import to_status
from control_plane.errors import InvalidArgument, NotFound
from control_plane.page_tokens import PageTokens
from spendgate import logs
from spendgate.domain import limits
from spendgate.domain.policies import FieldViolation, text_violations
from spendgate.visible import clip, first_unsafe, visible

PAGE = Path(__file__).resolve().parents[2] / "docs" / "concepts" / "limits.md"
BEGIN, END = "<!-- limits table: generated -->\n", "<!-- end of limits table -->"


def test_the_documented_table_is_generated_from_the_code() -> None:
    text = PAGE.read_text()
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert table == limits.markdown(), "run: python -m spendgate.domain.limits"


def test_the_table_states_the_bounds_the_checks_use() -> None:
    table = limits.markdown()
    for needle in (
        "1 to 200 characters",  # names
        "at most 2000 characters",  # descriptions
        "at most 20, each 1 to 1000",  # thresholds
        "at most 64 characters",  # ids
        "at most 256 bytes (UTF-8)",  # model names
        "$100,000 per million tokens",  # prices
        "$1,000,000,000",  # amounts
        "1 to 10,000",  # window counts
        "at most 32",  # tags
    ):
        assert needle in table, needle


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("plain text", "plain text", id="plain"),
        pytest.param("\x1b[2Jred\x07", "\\x1b[2Jred\\x07", id="esc-bel"),
        pytest.param("a\x00b\r\nc", "a\\x00b\\x0d\\x0ac", id="nul-cr-lf"),
        pytest.param("x\x7fy\x9bz", "x\\x7fy\\x9bz", id="del-c1"),
        pytest.param("\u202eevil\u200b", "\\u202eevil\\u200b", id="bidi-zero-width"),
        pytest.param("caf\u00e9 \u6771\u4eac", "caf\u00e9 \u6771\u4eac", id="unicode-kept"),
        pytest.param("back\\slash", "back\\slash", id="backslash-kept"),
    ],
)
def test_visible_escapes_what_a_terminal_would_obey(value: str, expected: str) -> None:
    assert visible(value) == expected
    assert visible(expected) == expected  # escaping twice changes nothing


def test_long_values_are_clipped_with_a_marker() -> None:
    assert clip("m" * 5_000_000, 10) == "mmmmmmmmmm…[+4999990 chars]"
    assert visible("\x1b" * 3, 2) == "\\x1b\\x1b…[+1 chars]"
    assert visible("a\nb\x1b", keep_newlines=True) == "a\nb\\x1b"


def test_first_unsafe() -> None:
    assert first_unsafe("fine") is None
    assert first_unsafe("tab\there", allow="\t\n") is None
    assert first_unsafe("tab\there") == "\t"


def test_text_violations() -> None:
    assert text_violations("name", " ", 10, required=True) == [
        FieldViolation("name", "is required")
    ]
    assert text_violations("d", "x" * 11, 10) == [
        FieldViolation("d", "must be at most 10 characters (got 11)")
    ]
    assert text_violations("d", "two\nlines\tok", 20, multiline=True) == []
    assert text_violations("d", "two\nlines", 20) == [
        FieldViolation("d", "must not contain control characters (found \\x0a)")
    ]


def test_page_tokens_round_trip_and_refuse_everything_else() -> None:
    tokens = PageTokens(b"k" * 32)
    token = tokens.encode("spend", "bp_1", "alice")
    assert tokens.decode("spend", token, 2) == ["bp_1", "alice"]
    other = PageTokens(b"j" * 32)
    for kind, bad, parts in (
        ("policies", token, 2),  # another list's
        ("spend", token, 1),  # another shape
        ("spend", other.encode("spend", "bp_1", "alice"), 2),  # another key
        ("spend", token[:-2], 2),
        ("spend", "A" * 100_000, 2),
        ("spend", "é.é", 2),
        ("spend", ".", 2),
    ):
        with pytest.raises(InvalidArgument) as e:
            tokens.decode(kind, bad, parts)
        assert [v.field for v in e.value.violations] == ["page_token"]


def test_log_values_are_escaped_and_clipped() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        for as_json in (True, False):
            logs.configure(json=as_json, level="info", stream=out)
            structlog.configure(cache_logger_on_first_use=False)
            structlog.get_logger("t").info("model refused", model="\x1b]0;x\x07" + "m" * 5_000_000)
        first, second = out.getvalue().splitlines()
        model = json.loads(first)["model"]
        assert model.startswith("\\x1b]0;x\\x07mmm")
        assert model.endswith(f"…[+{5_000_006 - limits.MAX_LOG_VALUE_CHARS} chars]")
        assert len(first) < 2 * limits.MAX_LOG_VALUE_CHARS
        assert "\x1b" not in second and "\x07" not in second and "x1b]0;x" in second
        assert len(second) < 2 * limits.MAX_LOG_VALUE_CHARS
    finally:
        structlog.reset_defaults()
        root.handlers[:], level = saved
        root.setLevel(level)


def _wire_bytes(status: grpc.Status) -> int:
    """What the status costs in HTTP/2 trailers: grpc-message percent-encoded
    (worst case 3 bytes per UTF-8 byte), -bin values base64-encoded."""
    total = len("grpc-status") + 2 + len("grpc-message") + 3 * len(status.details.encode())
    for key, value in status.trailing_metadata:
        size = len(value) if isinstance(value, bytes) else len(value.encode())
        total += len(key) + (4 * -(-size // 3) if key.endswith("-bin") else size)
    return total


@pytest.mark.parametrize("count", [1, 20, 3000])
def test_an_error_answer_always_fits_grpcs_default_trailer_limit(count: int) -> None:
    """8 KiB is gRPC's default limit on received metadata: an answer over it
    reaches the client as RESOURCE_EXHAUSTED instead of the field errors."""
    worst = FieldViolation("\u00e9" * 100_000, "\x1b\u6771" * 100_000)
    status = to_status(InvalidArgument([worst] * count))
    assert _wire_bytes(status) < 8 * 1024
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details.endswith(" more") == (count > 1)
    huge_id = to_status(NotFound("policy", "x" * 1_000_000))
    assert _wire_bytes(huge_id) < 8 * 1024
