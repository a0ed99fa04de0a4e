"""Canonical identity values (spendgate/domain/members.py)."""

from __future__ import annotations

import pytest

from spendgate.domain.members import MAX_MEMBER_BYTES, MemberInvalid, canonical


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("alice", "alice", id="plain"),
        pytest.param("Alice", "alice", id="case"),
        pytest.param("  alice\t", "alice", id="surrounding-white-space"),
        pytest.param("", "", id="empty"),
        pytest.param("   ", "", id="blank"),
        pytest.param("\uff21\uff4c\uff49\uff43\uff45", "alice", id="fullwidth"),
        pytest.param("\U0001d41alice", "alice", id="mathematical-bold-a"),
        pytest.param("\u212aelvin", "kelvin", id="kelvin-sign"),
        pytest.param("Jose\u0301", "jos\u00e9", id="combining-accent-composed"),
        pytest.param("Stra\u00dfe", "strasse", id="sharp-s-folded"),
        pytest.param("team red", "team red", id="inner-space-kept"),
        pytest.param("\u5c71\u7530\u592a\u90ce", "\u5c71\u7530\u592a\u90ce", id="han"),
        pytest.param("\u3084\u307e\u3060Taro", "\u3084\u307e\u3060taro", id="hiragana-latin"),
        pytest.param("\uae40\ubbfc\uc900", "\uae40\ubbfc\uc900", id="hangul"),
        pytest.param(
            "\u0391\u0398\u0397\u039d\u0391", "\u03b1\u03b8\u03b7\u03bd\u03b1", id="greek"
        ),
        pytest.param("spiffe://Corp/ns/A", "spiffe://corp/ns/a", id="spiffe-id"),
        pytest.param("u" * MAX_MEMBER_BYTES, "u" * MAX_MEMBER_BYTES, id="at-the-bound"),
    ],
)
def test_canonical(value: str, expected: str) -> None:
    assert canonical(value, "user") == expected


@pytest.mark.parametrize(
    ("value", "description"),
    [
        pytest.param(
            "\u0430lice",
            "mixes letters of scripts that are not written together (CYRILLIC, LATIN)",
            id="cyrillic-a-in-latin",
        ),
        pytest.param(
            "\u03bfpenai",
            "mixes letters of scripts that are not written together (GREEK, LATIN)",
            id="greek-omicron-in-latin",
        ),
        pytest.param(
            "alice\u200b",
            "contains an invisible format character (U+200B), which is not allowed",
            id="zero-width-space",
        ),
        pytest.param(
            "\u202ealice",
            "contains an invisible format character (U+202E), which is not allowed",
            id="bidi-override",
        ),
        pytest.param(
            "ali\u00adce",
            "contains an invisible format character (U+00AD), which is not allowed",
            id="soft-hyphen",
        ),
        pytest.param(
            "al\x00ice",
            "contains a control character (U+0000), which is not allowed",
            id="nul",
        ),
        pytest.param(
            "al\nice", "contains a control character (U+000A), which is not allowed", id="newline"
        ),
        pytest.param(
            "al\u2028ice",
            "contains a line separator character (U+2028), which is not allowed",
            id="line-separator",
        ),
        pytest.param(
            "\ue000",
            "contains a private-use character (U+E000), which is not allowed",
            id="private-use",
        ),
        pytest.param(
            "u" * (MAX_MEMBER_BYTES + 1), "is longer than 256 bytes (UTF-8)", id="ascii-over"
        ),
        pytest.param("\u00e9" * 129, "is longer than 256 bytes (UTF-8)", id="utf8-bytes-over"),
    ],
)
def test_canonical_refuses(value: str, description: str) -> None:
    with pytest.raises(MemberInvalid) as info:
        canonical(value, "x-spendgate-user header")
    assert (info.value.field, info.value.description) == ("x-spendgate-user header", description)
    assert str(info.value) == f"x-spendgate-user header: {description}"


def test_canonical_is_idempotent() -> None:
    for value in ("Alice", "\uff21lice", "Stra\u00dfe", "Jose\u0301", "\u3084\u307e\u3060Taro"):
        once = canonical(value, "f")
        assert canonical(once, "f") == once
