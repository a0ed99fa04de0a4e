"""Human-readable tables and JSON for the CLI.

Every value printed came from somewhere else (an admin, a client request, a
provider), so text output escapes control characters visibly (``\x1b``):
a policy name or model name cannot move the cursor, recolour the terminal
or rewrite earlier lines. JSON output escapes them the JSON way.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from decimal import ROUND_FLOOR, Decimal
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from spendgate.visible import visible

M = TypeVar("M", bound=Message)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return "(none)"
    rows = [[visible(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def percent_of(spent_usd: str, limit_usd: str) -> int:
    """Spent / limit in whole percent, rounded down (99.99 % is 99, not yet
    exceeded; 109.5 % is 109). Every command prints percentages with this."""
    limit = Decimal(limit_usd)
    if limit <= 0:
        return 0
    return int((Decimal(spent_usd) * 100 / limit).to_integral_value(ROUND_FLOOR))


def percent_text(spent_usd: str, limit_usd: str) -> str:
    return f"{percent_of(spent_usd, limit_usd)}%"


def as_json(messages: Message | Sequence[Message]) -> Any:
    def one(m: Message) -> dict[str, Any]:
        return MessageToDict(
            m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )

    if isinstance(messages, Message):
        return one(messages)
    return [one(m) for m in messages]


def visible_message(message: M) -> M:
    """A copy of ``message`` with every string field (nested, repeated, map
    values too) escaped by :func:`spendgate.visible.visible`, for text views
    that format values themselves."""
    out = type(message)()
    out.CopyFrom(message)
    _escape_fields(out)
    return out


def _escape_fields(m: Message) -> None:
    for field, value in m.ListFields():
        entry = field.message_type
        if entry is not None:
            if entry.GetOptions().map_entry:
                entry_value = entry.fields_by_name["value"]
                for key in list(value):
                    if entry_value.type == FieldDescriptor.TYPE_STRING:
                        value[key] = visible(value[key])
                    elif entry_value.type == FieldDescriptor.TYPE_MESSAGE:
                        _escape_fields(value[key])
            elif field.is_repeated:
                for item in value:
                    _escape_fields(item)
            else:
                _escape_fields(value)
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                value[:] = [visible(v) for v in value]
            else:
                setattr(m, field.name, visible(value))


def echo(text: str, *, raw: bool = False) -> None:
    """Print ``text``; control characters but newlines escaped unless
    ``raw`` (a view that escaped its values and adds its own colours)."""
    sys.stdout.write((text if raw else visible(text, keep_newlines=True)) + "\n")
