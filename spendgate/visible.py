"""Text that is safe to show: on a terminal, in a log line, in a metric label.

Pure. Values spendgate prints come from admins (policy names), clients (model
names, identity values) and providers; none of them may move a terminal's
cursor, ring its bell or forge a log line. ``visible`` escapes every control,
format and line-separator character so it can still be seen (``\\x1b``,
``\\u200b``), and clips long values with a marker that says how much is gone.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, the invisible format characters that reorder or
# hide text (bidi overrides, zero-width), line and paragraph separators.
_OTHERS = "\x0b-\x1f\x7f-\x9f\u00ad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
_UNSAFE = re.compile(f"[\x00-\x0a{_OTHERS}]")
_UNSAFE_BUT_NEWLINE = re.compile(f"[\x00-\x09{_OTHERS}]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clip(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, with a marker saying how many
    more there were (``…[+5242752 chars]``)."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…[+{len(value) - limit} chars]"


def visible(value: str, limit: int | None = None, *, keep_newlines: bool = False) -> str:
    """``value`` with unsafe characters escaped, clipped to ``limit``
    characters of the original first (None: not clipped)."""
    if limit is not None:
        value = clip(value, limit)
    pattern = _UNSAFE_BUT_NEWLINE if keep_newlines else _UNSAFE
    return pattern.sub(_escape, value)


def first_unsafe(value: str, *, allow: str = "") -> str | None:
    """The first character of ``value`` that ``visible`` would escape (and
    that is not in ``allow``), or None."""
    for m in _UNSAFE.finditer(value):
        if m.group() not in allow:
            return m.group()
    return None
