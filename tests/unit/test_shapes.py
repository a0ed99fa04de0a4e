"""ext_proc/metering/shapes.py and ext_proc/metering/coverage.py: which shape a request is, how
its ``stream`` flag reads, which methods are never billable, and how requests
of no metered shape are named in logs and errors."""

from __future__ import annotations

import orjson
import pytest

from ext_proc.metering import shapes
from ext_proc.metering.coverage import UnmeteredPaths, method_label, path_template
from ext_proc.metering.shapes import (
    NEVER_BILLABLE_METHODS,
    detect,
    dialect_for,
    dialect_for_path,
    stream_flag,
)
from ext_proc.protocol import dialects


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/chat/completions", "openai_chat"),
        ("POST", "/v1/completions", "openai_completions"),
        ("POST", "/v1/completions/", "openai_completions"),
        ("POST", "/openai/deployments/d/completions?api-version=2024-10-21", "openai_completions"),
        ("POST", "/demo/v1/completions", "openai_completions"),
        ("POST", "/openai/deployments/d/chat/completions", "openai_chat"),
        ("POST", "/model/meta.llama3-3-70b-instruct-v1:0/invoke", "bedrock_invoke"),
        ("POST", "/model/m/invoke-with-response-stream", "bedrock_invoke"),
        ("POST", "/model/m/converse", "bedrock_converse"),
        ("POST", "/model/m/invoke/extra", None),
        ("GET", "/v1/completions", None),
        ("POST", "/v1/images/generations", None),
        ("POST", "/v1/audio/speech", None),
        ("POST", "/v1/batches", None),
        ("POST", "/v1/messages/batches", None),
    ],
)
def test_detect(method: str, path: str, expected: str | None) -> None:
    shape = detect(method, path)
    assert (shape.name if shape else None) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (1, True),
        (1.0, True),
        ("true", True),
        ("True", True),
        (" TRUE ", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("t", True),
        ("y", True),
        (False, False),
        (0, False),
        (2, False),
        (0.5, False),
        ("false", False),
        ("no", False),
        ("", False),
        ("truthy", False),
        (None, False),
        ([True], False),
        ({"stream": True}, False),
    ],
)
def test_stream_flag(value: object, expected: bool) -> None:
    assert stream_flag(value) is expected


def test_never_billable_methods_are_the_documented_ones() -> None:
    assert {"OPTIONS", "HEAD"} == NEVER_BILLABLE_METHODS


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        ("/v1/images/generations", dialects.openai),
        ("/v1/audio/speech", dialects.openai),
        ("/openai/deployments/d/images/generations", dialects.openai),
        ("/v1/messages/batches", dialects.anthropic),
        ("/v1/messages/count_tokens", dialects.anthropic),
        ("/v1/complete", dialects.anthropic),
        ("/v1beta/models/gemini-2.5-flash:countTokens", dialects.google),
        ("/v1/models/gemini-2.5-flash:embedContent?key=k", dialects.google),
        ("/model/m/apply-guardrail", dialects.aws),
        ("/model/m/async-invoke", dialects.aws),
    ],
)
def test_dialect_for_path(path: str, dialect: dialects.Dialect) -> None:
    assert dialect_for_path(path) is dialect
    assert dialect_for("demo", path) is dialect  # a route that names no provider


@pytest.mark.parametrize(
    ("route", "path", "dialect"),
    [
        ("anthropic", "/v1/files", dialects.anthropic),
        ("anthropic", "/v1/models", dialects.anthropic),
        ("gemini", "/v1/files", dialects.google),
        ("bedrock", "/async-invoke", dialects.aws),
        ("openai", "/v1/messages/batches", dialects.openai),
        ("azure-openai", "/openai/deployments/d/images/generations", dialects.openai),
        ("", "/v1/messages/batches", dialects.anthropic),
    ],
)
def test_dialect_for_route(route: str, path: str, dialect: dialects.Dialect) -> None:
    assert dialect_for(route, path) is dialect


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/images/generations", "/v1/images/generations"),
        ("/v1/batches/batch_6a1f0c3e9b2d4e5f?after=x", "/v1/batches/{id}"),
        ("/v1/files/file-abc123def456/content", "/v1/files/{id}/content"),
        ("/v1beta/models/gemini-2.5-flash:countTokens", "/v1beta/models/{id}:countTokens"),
        ("/v1/x/" + "a" * 60, "/v1/x/{id}"),
        ("/" + "a/" * 400, ("/" + "a/" * 400)[:256]),
    ],
)
def test_path_template(path: str, expected: str) -> None:
    assert path_template(path) == expected


def test_method_label_is_bounded() -> None:
    assert [method_label(m) for m in ("GET", "POST", "PROPFIND", "")] == [
        "GET",
        "POST",
        "other",
        "other",
    ]


def test_unmetered_paths_are_remembered_up_to_a_limit() -> None:
    paths = UnmeteredPaths(limit=2)
    assert paths.first_time("openai", "POST", "/v1/images/generations")
    assert not paths.first_time("openai", "POST", "/v1/images/generations")
    assert paths.first_time("demo", "POST", "/v1/images/generations")  # another route
    assert paths.full
    assert not paths.first_time("openai", "POST", "/v1/audio/speech")  # full: not logged


def test_completions_prepare_asks_streams_for_usage() -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": "true"}
    assert shapes.OPENAI_COMPLETIONS.prepare_request(body)
    assert body["stream_options"] == {"include_usage": True}
    plain = {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}
    assert not shapes.OPENAI_COMPLETIONS.prepare_request(plain)
    assert orjson.dumps(plain) == b'{"model":"gpt-3.5-turbo-instruct","prompt":"hi"}'
