"""Domain errors -> gRPC status, in this one place.

INVALID_ARGUMENT carries google.rpc.BadRequest field violations in the rich
status details, so clients can point at the field without parsing text.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from control_plane.errors import (
    AlreadyExists,
    ControlPlaneError,
    EtagMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from spendgate.domain.limits import (
    MAX_ERROR_DETAILS_BYTES,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_FIELD_CHARS,
    MAX_ID_CHARS,
    MAX_VIOLATION_CHARS,
    MAX_VIOLATIONS,
)
from spendgate.visible import clip, first_unsafe, visible

log = structlog.get_logger("spendgate.control_plane")

R = TypeVar("R")


def check_id(field: str, value: str, *, required: bool = True) -> None:
    """Refuse a missing (when ``required``), over-long or control-character
    id in a request."""
    if not value:
        if required:
            raise InvalidArgument.one(field, "is required")
        return
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument.one(
            field, f"must be at most {MAX_ID_CHARS} characters (got {len(value)})"
        )
    check_text(field, value)


def check_text(field: str, value: str) -> None:
    """Refuse control characters in a request value used in a query (an id,
    a filter): PostgreSQL refuses NUL in text, and none is in a stored value."""
    if (ch := first_unsafe(value)) is not None:
        raise InvalidArgument.one(
            field, f"must not contain control characters (found {visible(ch)})"
        )


def _utf8_clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8 (with a marker)."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode(errors="ignore") + "…"


def to_status(e: ControlPlaneError) -> grpc.Status:
    """The status for ``e``, bounded: a request full of bad values (3,000
    thresholds, a 1 MB id) still gets an answer that fits gRPC's trailers
    (8 KiB by default), never RESOURCE_EXHAUSTED from the transport. The
    details carry the first violations (at most MAX_VIOLATIONS, each
    clipped, MAX_ERROR_DETAILS_BYTES in all); the message names them as far as
    MAX_ERROR_MESSAGE_CHARS (bytes) go and says how many more there are."""
    if isinstance(e, InvalidArgument):
        shown: list[tuple[str, str]] = []
        used = 0
        for v in e.violations[:MAX_VIOLATIONS]:
            f, d = clip(v.field, MAX_FIELD_CHARS), clip(v.description, MAX_VIOLATION_CHARS)
            size = len(f.encode()) + len(d.encode())
            if shown and used + size > MAX_ERROR_DETAILS_BYTES:
                break
            shown.append((f, d))
            used += size
        parts: list[str] = []
        budget = MAX_ERROR_MESSAGE_CHARS - 30  # room for "; and N more"
        for f, d in shown:
            part = f"{f}: {d}"
            if parts and len("; ".join([*parts, part]).encode()) > budget:
                break
            parts.append(part)
        message = _utf8_clip("; ".join(parts), budget)
        if len(parts) < len(e.violations):
            message += f"; and {len(e.violations) - len(parts)} more"
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in shown
                ]
            )
        )
        return rpc_status.to_status(
            status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
        )
    code = {
        NotFound: code_pb2.NOT_FOUND,
        EtagMismatch: code_pb2.ABORTED,
        AlreadyExists: code_pb2.ALREADY_EXISTS,
        FailedPrecondition: code_pb2.FAILED_PRECONDITION,
        Unavailable: code_pb2.UNAVAILABLE,
    }.get(type(e), code_pb2.INTERNAL)
    message = _utf8_clip(clip(str(e), MAX_ERROR_MESSAGE_CHARS), MAX_ERROR_MESSAGE_CHARS)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message))


def unary(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except ControlPlaneError as e:
            await context.abort_with_status(to_status(e))
            raise AssertionError("unreachable") from e

    return wrapper


def streaming(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[R]]:
    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[R]:
        try:
            async for item in fn(self, request, context):
                yield item
        except ControlPlaneError as e:
            await context.abort_with_status(to_status(e))

    return wrapper
