"""Small pure helpers shared by the meters that read JSON bodies and events."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson


def count(value: object) -> int | None:
    """A token count: a non-negative int. Anything else (null, missing, bool,
    float, string, negative) is "not reported"."""
    return value if type(value) is int and value >= 0 else None


def detail(details: object, key: str) -> int | None:
    """The count at ``details[key]``, where ``details`` should be an object
    (a ``*_tokens_details`` breakdown); None when it is not or has no count."""
    return count(details.get(key)) if isinstance(details, dict) else None


def add_counts(*values: int | None) -> int | None:
    """Sum of the reported counts; None when none of them was reported."""
    present = [value for value in values if value is not None]
    return sum(present) if present else None


def text_chars(texts: Iterable[object]) -> int:
    """Characters in those of ``texts`` that are strings (generated text)."""
    return sum(len(text) for text in texts if isinstance(text, str))


def loads(data: bytes | bytearray) -> object:
    """The JSON value in ``data``; None when it is not valid JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def loads_object(data: bytes | bytearray) -> dict[str, Any] | None:
    """The JSON object in ``data``; None when it is not valid JSON or not an object."""
    try:  # not via loads(): this runs for every stream event
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def json_chars(value: object) -> int:
    """Length of ``value`` serialised as compact JSON (generated tool arguments),
    0 when it cannot be serialised or is absent."""
    if value is None:
        return 0
    try:
        return len(orjson.dumps(value))
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return 0
