"""Canonical identity values: how a user, workspace, service or tag becomes a
budget member, the same way in both planes.

Pure. ext_proc canonicalises what a request says (ext_proc/admission/identity.py); the
control plane canonicalises policy targets (policies.normalize_target), so a
policy written for ``Alice`` binds the request of ``alice``.

The canonical form is Unicode's caseless identifier matching: NFKC, case
folded, NFKC again (NFKC output is NFC), stripped of surrounding white space.
NFKC also folds the compatibility look-alikes (fullwidth letters, mathematical
bold letters, the Kelvin sign). Refused, never silently repaired:
control, format (zero-width space, bidi marks), private-use, surrogate and
unassigned characters; line and paragraph separators; letters of scripts that
are not written together (a Cyrillic a, U+0430, in a Latin name, the usual
look-alike trick); and values over ``MAX_MEMBER_BYTES`` of UTF-8. Folding
two spellings into one member is the safe direction for a budget: at worst
two names share one budget, never one name gets two.
"""

from __future__ import annotations

import unicodedata

MAX_MEMBER_BYTES = 256
MAX_TAGS = 32

# Scripts that are written together in one name (Unicode TR39's "highly
# restrictive" level): Latin with Japanese, Chinese or Korean scripts.
_ALLOWED_MIXES = (
    frozenset({"LATIN", "HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"LATIN", "HAN", "BOPOMOFO"}),
    frozenset({"LATIN", "HAN", "HANGUL"}),
)
# Character-name prefixes that are not a script of their own.
_NO_SCRIPT = frozenset({"MODIFIER", "SMALL", "SUPERSCRIPT", "SUBSCRIPT", "LETTER"})


class MemberInvalid(ValueError):
    """A value cannot be a budget member; ``field`` names where it came from
    (e.g. ``x-spendgate-user header``), ``description`` says why."""

    def __init__(self, field: str, description: str) -> None:
        self.field = field
        self.description = description
        super().__init__(f"{field}: {description}")


def _script(ch: str) -> str | None:
    """The script of a letter, from its Unicode name (None: no script of its own)."""
    name = unicodedata.name(ch, "")
    first = name.split(" ", 1)[0]
    if first == "CJK":
        return "HAN"
    if first.startswith("KATAKANA"):  # KATAKANA-HIRAGANA PROLONGED SOUND MARK
        return "KATAKANA"
    if not first or first in _NO_SCRIPT:
        return None
    return first


def _check_scripts(field: str, value: str) -> None:
    scripts = {s for ch in value if unicodedata.category(ch)[0] == "L" and (s := _script(ch))}
    if len(scripts) <= 1 or any(scripts <= mix for mix in _ALLOWED_MIXES):
        return
    names = ", ".join(sorted(scripts))
    raise MemberInvalid(field, f"mixes letters of scripts that are not written together ({names})")


def canonical(value: str, field: str) -> str:
    """The canonical member for ``value`` ("" when it is empty or blank).

    Raises MemberInvalid naming ``field`` for a value that cannot be one.
    """
    if value.isascii() and value.isprintable():
        # The common case, on every request: NFKC leaves printable ASCII
        # alone, case folding is lower(), and one script (or none) is used.
        value = value.strip().lower()
        if len(value) > MAX_MEMBER_BYTES:
            raise MemberInvalid(field, f"is longer than {MAX_MEMBER_BYTES} bytes (UTF-8)")
        return value
    value = unicodedata.normalize("NFKC", value).strip()
    for ch in value:
        category = unicodedata.category(ch)
        if category[0] == "C" or category in ("Zl", "Zp"):
            kind = {
                "Cc": "a control",
                "Cf": "an invisible format",
                "Co": "a private-use",
                "Cs": "a surrogate",
                "Cn": "an unassigned",
            }.get(category, "a line separator")
            raise MemberInvalid(
                field, f"contains {kind} character (U+{ord(ch):04X}), which is not allowed"
            )
    value = unicodedata.normalize("NFKC", value.casefold()).strip()
    if len(value.encode()) > MAX_MEMBER_BYTES:
        raise MemberInvalid(field, f"is longer than {MAX_MEMBER_BYTES} bytes (UTF-8)")
    _check_scripts(field, value)
    return value
