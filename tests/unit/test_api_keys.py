"""Which API key a request carries, per provider route (ext_proc/admission/api_keys.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ext_proc.admission import api_keys
from ext_proc.admission.api_keys import Credentials
from ext_proc.protocol import dialects

SIGV4 = (
    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261204/us-east-1/bedrock/aws4_request, "
    "SignedHeaders=content-type;host;x-amz-date, Signature=2c8276cfa83dc31e"
)
CHAT = "/v1/chat/completions"
GEMINI = "/v1beta/models/gemini-2.5-flash:generateContent"
BEDROCK = "/model/m/converse"
AUTH = "authorization"


def key(value: str, source: str = AUTH) -> Credentials:
    return Credentials(key=value, source=source)


def case(id: str, route: str, headers: dict[str, str], want: Any, path: str = CHAT) -> Any:
    return pytest.param(route, headers, path, want, id=id)


READ = [
    # OpenAI and compatible: Authorization, the Bearer scheme in any case, any
    # whitespace after it.
    case("openai-bearer", "openai", {AUTH: "Bearer sk-1"}, key("sk-1")),
    case("openai-bearer-lower-spaces", "openai", {AUTH: "bearer  sk-1 "}, key("sk-1")),
    case("openai-bearer-tab", "openai", {AUTH: "Bearer\tsk-1"}, key("sk-1")),
    case("openai-bearer-upper-fold", "openai", {AUTH: "BEARER\r\n sk-1"}, key("sk-1")),
    case("openai-bearer-empty", "openai", {AUTH: "Bearer "}, Credentials(source=AUTH)),
    case("openai-no-key", "openai", {}, Credentials()),
    case("openai-other-scheme", "openai", {AUTH: "Basic dXNlcjpwdw=="}, key("dXNlcjpwdw==")),
    case("openai-bare-token", "openai", {AUTH: "sk-1"}, key("sk-1")),
    # ?key= on a route whose provider never reads it is not a key.
    case("openai-ignores-query-key", "openai", {AUTH: "Bearer sk-1"}, key("sk-1"), CHAT + "?key=x"),
    # Azure: api-key, or an Entra ID bearer token.
    case("azure-api-key", "azure-openai", {"api-key": " az-1 "}, key("az-1", "api-key")),
    case("azure-bearer", "azure-openai", {AUTH: "Bearer eyJ.x.y"}, key("eyJ.x.y")),
    # Anthropic: x-api-key, or Bearer (what the SDK sends since 2.x).
    case("anthropic-x-api-key", "anthropic", {"x-api-key": "a-1"}, key("a-1", "x-api-key")),
    case("anthropic-bearer", "anthropic", {AUTH: "Bearer a-1"}, key("a-1")),
    # Gemini: x-goog-api-key, or ?key= (percent-decoded).
    case(
        "gemini-header", "gemini", {"x-goog-api-key": "g-1"}, key("g-1", "x-goog-api-key"), GEMINI
    ),
    case("gemini-query", "gemini", {}, key("g-1", "?key="), GEMINI + "?key=g-1"),
    case("gemini-query-encoded", "gemini", {}, key("g-1", "?key="), GEMINI + "?alt=sse&key=g%2D1"),
    case("gemini-other-params", "gemini", {}, Credentials(), GEMINI + "?keys=x&monkey=y"),
    case("gemini-bearer", "gemini", {AUTH: "Bearer g-1"}, key("g-1"), "/v1beta/openai/x"),
    # Bedrock: the SigV4 access key id, or a Bedrock API key.
    case("bedrock-sigv4", "bedrock", {AUTH: SIGV4}, key("AKIDEXAMPLE"), BEDROCK),
    case("bedrock-sigv4-tight", "bedrock", {AUTH: SIGV4.replace(", ", ",")}, key("AKIDEXAMPLE")),
    case(
        "bedrock-sigv4-scheme-lower",
        "bedrock",
        {AUTH: SIGV4.replace("AWS4-HMAC-SHA256", "aws4-hmac-sha256")},
        key("AKIDEXAMPLE"),
        BEDROCK,
    ),
    case("bedrock-api-key", "bedrock", {AUTH: "Bearer ABSK-1"}, key("ABSK-1"), BEDROCK),
    # Other routes (operators' own, the demo, none): whichever one is there.
    case("any-x-api-key", "", {"x-api-key": "k"}, key("k", "x-api-key")),
    case("any-api-key", "vllm", {"api-key": "k"}, key("k", "api-key")),
    case("any-goog", "demo", {"x-goog-api-key": "k"}, key("k", "x-goog-api-key"), GEMINI),
    case("any-query", "demo", {}, key("k", "?key="), GEMINI + "?key=k"),
    case("any-sigv4", "demo", {AUTH: SIGV4}, key("AKIDEXAMPLE"), BEDROCK),
]


@pytest.mark.parametrize(("route", "headers", "path", "expected"), READ)
def test_key_is_read_as_the_provider_reads_it(
    route: str, headers: dict[str, str], path: str, expected: Credentials
) -> None:
    assert api_keys.read(route, headers, frozenset(), path) == expected


def refused(
    id: str, route: str, headers: dict[str, str], error: str, path: str = CHAT, twice: str = ""
) -> Any:
    return pytest.param(route, headers, frozenset([twice] if twice else []), path, error, id=id)


TWO = "more than one API key"
REFUSED = [
    refused(
        "bearer-plus-x-api-key",
        "anthropic",
        {AUTH: "Bearer junk", "x-api-key": "sk-blocked"},
        f"{TWO} (the authorization header and the x-api-key header)",
    ),
    refused("openai-bearer-plus-x-api-key", "openai", {AUTH: "Bearer j", "x-api-key": "k"}, TWO),
    refused("azure-both", "azure-openai", {"api-key": "a", AUTH: "Bearer b"}, TWO),
    refused(
        "gemini-header-and-query",
        "gemini",
        {"x-goog-api-key": "a"},
        f"{TWO} (the x-goog-api-key header and the ?key= query parameter)",
        GEMINI + "?key=b",
    ),
    refused("any-two-headers", "", {"api-key": "a", "x-goog-api-key": "b"}, TWO),
    refused(
        "x-api-key-twice",
        "anthropic",
        {"x-api-key": "K,K"},
        "the x-api-key header is sent more than once",
        twice="x-api-key",
    ),
    refused("x-api-key-joined", "anthropic", {"x-api-key": "K,K"}, "x-api-key header is malformed"),
    refused(
        "auth-joined", "openai", {AUTH: "Bearer a,Bearer b"}, "authorization header is malformed"
    ),
    refused("auth-twice", "openai", {AUTH: "Bearer a"}, "sent more than once", twice=AUTH),
    refused("bearer-two-words", "openai", {AUTH: "Bearer a b"}, "malformed"),
    refused(
        "query-key-twice",
        "gemini",
        {},
        "the ?key= query parameter is sent more than once",
        GEMINI + "?key=a&key=b",
    ),
    refused("sigv4-joined", "bedrock", {AUTH: f"{SIGV4},{SIGV4}"}, "not one AWS SigV4 signature"),
    refused(
        "sigv4-no-credential",
        "bedrock",
        {AUTH: "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=x"},
        "not one AWS SigV4 signature",
    ),
    refused(
        "sigv4-empty-akid",
        "bedrock",
        {AUTH: "AWS4-HMAC-SHA256 Credential=/2026/x, Signature=x"},
        "names no access key id",
    ),
    # A key in a header the route's provider does not read belongs to another
    # provider: never forwarded.
    refused(
        "google-key-to-anthropic",
        "anthropic",
        {"x-goog-api-key": "g"},
        "the x-goog-api-key header is not how the anthropic provider reads an API key",
    ),
    refused("azure-key-to-openai", "openai", {"api-key": "az"}, "not how the openai provider"),
    refused("x-api-key-to-bedrock", "bedrock", {"x-api-key": "k"}, "not how the bedrock provider"),
]


@pytest.mark.parametrize(("route", "headers", "repeated", "path", "error"), REFUSED)
def test_ambiguous_or_foreign_keys_are_refused(
    route: str, headers: dict[str, str], repeated: frozenset[str], path: str, error: str
) -> None:
    result = api_keys.read(route, headers, repeated, path)
    assert (result.key, result.source) == ("", "")
    assert error in result.error


def test_refusal_speaks_the_providers_error_shape() -> None:
    reply = api_keys.refusal("the x-api-key header is sent more than once", dialects.anthropic)
    assert reply.status == 400
    assert reply.headers["x-spendgate-error"] == "ambiguous_api_key"
    assert orjson.loads(reply.body) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "spendgate refused the request: the x-api-key header is sent more "
            "than once.",
        },
    }
    google = orjson.loads(api_keys.refusal("x", dialects.for_route("gemini")).body)
    assert google["error"]["status"] == "INVALID_ARGUMENT"
    aws = api_keys.refusal("x", dialects.for_route("bedrock"))
    assert aws.headers["x-amzn-errortype"] == "ValidationException"
    openai = orjson.loads(api_keys.refusal("x", dialects.for_route("azure-openai")).body)
    assert openai["error"]["code"] == "ambiguous_api_key"
