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
    ControlPlaneError,
    EtagMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

log = structlog.get_logger("spendgate.control_plane")
R = TypeVar("R")


def to_status(e: ControlPlaneError) -> grpc.Status:
    if isinstance(e, InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in e.violations
                ]
            )
        )
        return rpc_status.to_status(
            status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(e), details=[detail])
        )
    code = {
        NotFound: code_pb2.NOT_FOUND,
        EtagMismatch: code_pb2.ABORTED,
        FailedPrecondition: code_pb2.FAILED_PRECONDITION,
        Unavailable: code_pb2.UNAVAILABLE,
    }.get(type(e), code_pb2.INTERNAL)
    return rpc_status.to_status(status_pb2.Status(code=code, message=str(e)))


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
