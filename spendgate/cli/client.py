"""The CLI's gRPC client: every library error becomes one readable line here."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from spendgate.v1 import (
    budget_pb2_grpc,
    pricing_pb2_grpc,
    reports_pb2_grpc,
    secrets_pb2_grpc,
    webhooks_pb2_grpc,
)

TIMEOUT_S = 10.0


class CliError(Exception):
    """A failure to show the user as one line (exit status 1). ``retryable``:
    the control plane could not be reached (trying again may succeed).
    ``code``: the gRPC status of a failed call, else None."""

    def __init__(
        self, message: str, *, retryable: bool = False, code: grpc.StatusCode | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code


class AdminClient:
    def __init__(self, server: str, token: str, *, tls: bool = False) -> None:
        self.server = server
        self.token = token
        self.tls = tls
        self._connect()

    def _connect(self) -> None:
        self.channel = (
            grpc.secure_channel(self.server, grpc.ssl_channel_credentials())
            if self.tls
            else grpc.insecure_channel(self.server)
        )
        self.budgets = budget_pb2_grpc.BudgetServiceStub(self.channel)
        self.webhooks = webhooks_pb2_grpc.WebhookServiceStub(self.channel)
        self.pricing = pricing_pb2_grpc.PricingServiceStub(self.channel)
        self.secrets = secrets_pb2_grpc.SecretsServiceStub(self.channel)
        self.reports = reports_pb2_grpc.ReportServiceStub(self.channel)
        self._stubs = (self.budgets, self.webhooks, self.pricing, self.secrets, self.reports)

    def reconnect(self) -> None:
        """A new channel. After the server was unreachable a channel waits out
        gRPC's reconnect backoff (up to minutes); a long-running view calls
        this after an error so it sees the server as soon as it is back."""
        self.channel.close()
        self._connect()

    def call(self, method: str, request: Any) -> Any:
        if not self.token:
            raise CliError(
                "no token: pass --token, set SPENDGATE_TOKEN, or run in (or below) the folder "
                "where `spendgate up` keeps .spendgate/credentials.json (or give its "
                "--state-dir / SPENDGATE_STATE_DIR)"
            )
        stub = next(s for s in self._stubs if hasattr(s, method))
        try:
            return getattr(stub, method)(
                request, metadata=(("authorization", f"Bearer {self.token}"),), timeout=TIMEOUT_S
            )
        except grpc.RpcError as e:
            retryable = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            raise CliError(self.describe(e), retryable=retryable, code=e.code()) from None

    def describe(self, e: grpc.RpcError) -> str:
        code = e.code()
        details = e.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return (
                f"cannot reach the control plane at {self.server} "
                "(is `spendgate up` running? set --server or SPENDGATE_SERVER)"
            )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return f"the control plane at {self.server} rejected the token: {details}"
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return f"not allowed: {details}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            status = rpc_status.from_call(e)
            fields = []
            for detail in status.details if status else []:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    fields += [f"{v.field}: {v.description}" for v in bad.field_violations]
            return "invalid request: " + ("; ".join(fields) if fields else details)
        return f"{code.name.lower().replace('_', ' ')}: {details}"

    def close(self) -> None:
        self.channel.close()
