"""Human-readable tables and JSON for the CLI."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def as_json(messages: Message | Sequence[Message]) -> Any:
    def one(m: Message) -> dict[str, Any]:
        return MessageToDict(
            m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )

    if isinstance(messages, Message):
        return one(messages)
    return [one(m) for m in messages]


def echo(text: str) -> None:
    sys.stdout.write(text + "\n")
