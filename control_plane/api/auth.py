"""Bearer-token auth and request ids, as gRPC server interceptors.

Roles: the admin token may call everything; the read-only token may call
Get*/List*/Query* methods; the data-plane token may call DataPlaneService. Health
and reflection need no token, so orchestrators and grpcurl can probe.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

ADMIN, READ, DATA_PLANE = "admin", "read", "data-plane"
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
_DATA_PLANE_PREFIX = "/spendgate.v1.DataPlaneService/"


def required_roles(method: str) -> frozenset[str] | None:
    """Roles allowed to call ``method`` (full gRPC path); None = no token needed."""
    if method.startswith(_OPEN_PREFIXES):
        return None
    if method.startswith(_DATA_PLANE_PREFIX):
        return frozenset({ADMIN, DATA_PLANE})
    name = method.rsplit("/", 1)[-1]
    if name.startswith(("Get", "List", "Query")):
        return frozenset({ADMIN, READ})
    return frozenset({ADMIN})


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: dict[str, str]) -> None:
        """tokens: role -> token; empty tokens are ignored."""
        self._tokens = [(role, tok.encode()) for role, tok in tokens.items() if tok]

    def role_of(self, metadata: tuple[tuple[str, str | bytes], ...]) -> str | None:
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    return None
                given = token.strip().encode()
                for role, expected in self._tokens:
                    if hmac.compare_digest(given, expected):
                        return role
        return None

    def author(self, context: grpc.aio.ServicerContext) -> str:
        """Who made a call, for created_by/updated_by: the role of its token."""
        return self.role_of(tuple(context.invocation_metadata() or ())) or "unknown"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        roles = required_roles(details.method)
        if roles is None:
            return await continuation(details)
        role = self.role_of(tuple(details.invocation_metadata or ()))
        if role is None:
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token (metadata 'authorization: Bearer <token>')",
            )
        if role not in roles:
            return _deny(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the {role} token may not call {details.method.rsplit('/', 1)[-1]}",
            )
        structlog.contextvars.bind_contextvars(principal=role)
        return await continuation(details)


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Binds a request id (the caller's x-request-id, or a new one) to the logs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        rid = next((v for k, v in details.invocation_metadata or () if k == "x-request-id"), None)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            request_id=str(rid) if rid else uuid.uuid4().hex, method=details.method
        )
        return await continuation(details)


def principal() -> str:
    return str(structlog.contextvars.get_contextvars().get("principal", "unknown"))
