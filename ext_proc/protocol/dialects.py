"""Errors spendgate answers itself, in each provider's own error shape, so the
client's official SDK raises its usual exception with spendgate's message:

  OpenAI     {"error": {"message", "type", "param", "code"}}   openai.RateLimitError
  Anthropic  {"type": "error", "error": {"type", "message"}}   anthropic.RateLimitError
  Google     {"error": {"code", "message", "status", "details"}}  google.genai errors.ClientError
  AWS        {"message"} + x-amzn-errortype header               botocore ClientError
                                                                  (ThrottlingException)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    headers: dict[str, str]
    body: bytes


# (status, spendgate error code, human message) -> reply
Dialect = Callable[[int, str, str], ErrorReply]
JSON = {"content-type": "application/json"}


def openai(status: int, code: str, message: str) -> ErrorReply:
    return ErrorReply(
        status,
        JSON,
        orjson.dumps({"error": {"message": message, "type": code, "param": None, "code": code}}),
    )


def anthropic(status: int, code: str, message: str) -> ErrorReply:
    # Anthropic's documented error types; spendgate's own code stays in the
    # x-spendgate-error header.
    kind = {429: "rate_limit_error", 403: "permission_error"}.get(status, "invalid_request_error")
    return ErrorReply(
        status, JSON, orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    )


_GOOGLE_STATUS = {429: "RESOURCE_EXHAUSTED", 403: "PERMISSION_DENIED", 400: "INVALID_ARGUMENT"}


def google(status: int, code: str, message: str) -> ErrorReply:
    return ErrorReply(
        status,
        JSON,
        orjson.dumps(
            {
                "error": {
                    "code": status,
                    "message": message,
                    "status": _GOOGLE_STATUS.get(status, "UNKNOWN"),
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": code.upper(),
                            "domain": "spendgate",
                        }
                    ],
                }
            }
        ),
    )


_AWS_TYPE = {429: "ThrottlingException", 403: "AccessDeniedException"}


def aws(status: int, code: str, message: str) -> ErrorReply:
    kind = _AWS_TYPE.get(status, "ValidationException")
    return ErrorReply(
        status, {**JSON, "x-amzn-errortype": kind}, orjson.dumps({"message": message})
    )


_BY_ROUTE: dict[str, Dialect] = {"anthropic": anthropic, "gemini": google, "bedrock": aws}


def for_route(route: str) -> Dialect:
    """The error shape of the provider behind one of envoy/envoy.yaml's routes
    (OpenAI's for any other route: Azure OpenAI and OpenAI-compatible servers)."""
    return _BY_ROUTE.get(route, openai)
