"""Which API key a request carries, per provider route (ext_proc/api_keys.py)."""

from __future__ import annotations

import orjson
import pytest

from ext_proc import api_keys, dialects
from ext_proc.api_keys import Credentials

SIGV4 = (
    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261204/us-east-1/bedrock/aws4_request, "
    "SignedHeaders=content-type;host;x-amz-date, Signature=2c8276cfa83dc31e"
)
CHAT = "/v1/chat/completions"
GEMINI = "/v1beta/models/gemini-2.5-flash:generateContent"


def key(value: str, source: str) -> Credentials:
    return Credentials(key=value, source=source)


@pytest.mark.parametrize(
    ("route", "headers", "path", "expected"),
    [
        # OpenAI and compatible: Authorization, the Bearer scheme in any case,
        # any whitespace after it.
        pytest.param(
            "openai",
            {"authorization": "Bearer sk-1"},
            CHAT,
            key("sk-1", "authorization"),
            id="openai-bearer",
        ),
        pytest.param(
            "openai",
            {"authorization": "bearer  sk-1 "},
            CHAT,
            key("sk-1", "authorization"),
            id="openai-bearer-lower-spaces",
        ),
        pytest.param(
            "openai",
            {"authorization": "Bearer\tsk-1"},
            CHAT,
            key("sk-1", "authorization"),
            id="openai-bearer-tab",
        ),
        pytest.param(
            "openai",
            {"authorization": "BEARER\r\n sk-1"},
            CHAT,
            key("sk-1", "authorization"),
            id="openai-bearer-upper-fold",
        ),
        pytest.param(
            "openai",
            {"authorization": "Bearer "},
            CHAT,
            Credentials(source="authorization"),
            id="openai-bearer-empty",
        ),
        pytest.param("openai", {}, CHAT, Credentials(), id="openai-no-key"),
        pytest.param(
            "openai",
            {"authorization": "Basic dXNlcjpwdw=="},
            CHAT,
            key("dXNlcjpwdw==", "authorization"),
            id="openai-other-scheme",
        ),
        # Azure: api-key, or an Entra ID bearer token.
        pytest.param(
            "azure-openai", {"api-key": " az-1 "}, CHAT, key("az-1", "api-key"), id="azure-api-key"
        ),
        pytest.param(
            "azure-openai",
            {"authorization": "Bearer eyJ.x.y"},
            CHAT,
            key("eyJ.x.y", "authorization"),
            id="azure-bearer",
        ),
        # Anthropic: x-api-key, or Bearer (what the SDK sends since 2.x).
        pytest.param(
            "anthropic",
            {"x-api-key": "sk-ant-1"},
            "/v1/messages",
            key("sk-ant-1", "x-api-key"),
            id="anthropic-x-api-key",
        ),
        pytest.param(
            "anthropic",
            {"authorization": "Bearer sk-ant-1"},
            "/v1/messages",
            key("sk-ant-1", "authorization"),
            id="anthropic-bearer",
        ),
        # Gemini: x-goog-api-key or ?key= (percent-decoded).
        pytest.param(
            "gemini",
            {"x-goog-api-key": "gk-1"},
            GEMINI,
            key("gk-1", "x-goog-api-key"),
            id="gemini-header",
        ),
        pytest.param("gemini", {}, GEMINI + "?key=gk-1", key("gk-1", "?key="), id="gemini-query"),
        pytest.param(
            "gemini",
            {},
            GEMINI + "?alt=sse&key=gk%2D1",
            key("gk-1", "?key="),
            id="gemini-query-percent-encoded",
        ),
        pytest.param(
            "gemini", {}, GEMINI + "?keys=x&monkey=y", Credentials(), id="gemini-query-other-names"
        ),
        # Bedrock: the SigV4 access key id, or a Bedrock API key.
        pytest.param(
            "bedrock",
            {"authorization": SIGV4},
            "/model/m/converse",
            key("AKIDEXAMPLE", "authorization"),
            id="bedrock-sigv4",
        ),
        pytest.param(
            "bedrock",
            {"authorization": SIGV4.replace(", ", ",")},
            "/model/m/converse",
            key("AKIDEXAMPLE", "authorization"),
            id="bedrock-sigv4-no-spaces",
        ),
        pytest.param(
            "bedrock",
            {"authorization": SIGV4.replace("AWS4-HMAC-SHA256", "aws4-hmac-sha256")},
            "/model/m/converse",
            key("AKIDEXAMPLE", "authorization"),
            id="bedrock-sigv4-lower",
        ),
        pytest.param(
            "bedrock",
            {"authorization": "Bearer ABSK-1"},
            "/model/m/converse",
            key("ABSK-1", "authorization"),
            id="bedrock-api-key",
        ),
        # Other routes (operators' own, the demo, none): whichever one is there.
        pytest.param("", {"x-api-key": "k"}, CHAT, key("k", "x-api-key"), id="any-x-api-key"),
        pytest.param("vllm", {"api-key": "k"}, CHAT, key("k", "api-key"), id="any-api-key"),
        pytest.param(
            "demo", {"x-goog-api-key": "k"}, GEMINI, key("k", "x-goog-api-key"), id="any-goog"
        ),
        pytest.param("demo", {}, GEMINI + "?key=k", key("k", "?key="), id="any-query"),
        pytest.param(
            "demo",
            {"authorization": SIGV4},
            "/model/m/converse",
            key("AKIDEXAMPLE", "authorization"),
            id="any-sigv4",
        ),
        # ?key= on a route whose provider never reads it is not a key.
        pytest.param(
            "openai",
            {"authorization": "Bearer sk-1"},
            CHAT + "?key=x",
            key("sk-1", "authorization"),
            id="openai-ignores-query-key",
        ),
    ],
)
def test_key_is_read_as_the_provider_reads_it(
    route: str, headers: dict[str, str], path: str, expected: Credentials
) -> None:
    assert api_keys.read(route, headers, frozenset(), path) == expected


@pytest.mark.parametrize(
    ("route", "headers", "repeated", "path", "error"),
    [
        pytest.param(
            "anthropic",
            {"authorization": "Bearer junk", "x-api-key": "sk-blocked"},
            (),
            "/v1/messages",
            "more than one API key (the authorization header and the x-api-key header)",
            id="bearer-plus-x-api-key",
        ),
        pytest.param(
            "openai",
            {"authorization": "Bearer junk", "x-api-key": "sk-blocked"},
            (),
            CHAT,
            "more than one API key",
            id="openai-bearer-plus-x-api-key",
        ),
        pytest.param(
            "azure-openai",
            {"api-key": "a", "authorization": "Bearer b"},
            (),
            CHAT,
            "more than one API key",
            id="azure-both",
        ),
        pytest.param(
            "gemini",
            {"x-goog-api-key": "a"},
            (),
            GEMINI + "?key=b",
            "more than one API key (the x-goog-api-key header and the ?key= query parameter)",
            id="gemini-header-and-query",
        ),
        pytest.param(
            "",
            {"api-key": "a", "x-goog-api-key": "b"},
            (),
            CHAT,
            "more than one API key",
            id="any-two-headers",
        ),
        pytest.param(
            "anthropic",
            {"x-api-key": "K,K"},
            ("x-api-key",),
            "/v1/messages",
            "the x-api-key header is sent more than once",
            id="x-api-key-twice",
        ),
        pytest.param(
            "anthropic",
            {"x-api-key": "K,K"},
            (),
            "/v1/messages",
            "the x-api-key header is malformed",
            id="x-api-key-joined",
        ),
        pytest.param(
            "openai",
            {"authorization": "Bearer a,Bearer b"},
            (),
            CHAT,
            "the authorization header is malformed",
            id="authorization-joined",
        ),
        pytest.param(
            "openai",
            {"authorization": "Bearer a"},
            ("authorization",),
            CHAT,
            "sent more than once",
            id="authorization-twice",
        ),
        pytest.param(
            "openai", {"authorization": "Bearer a b"}, (), CHAT, "malformed", id="bearer-two-words"
        ),
        pytest.param(
            "gemini",
            {},
            (),
            GEMINI + "?key=a&key=b",
            "the ?key= query parameter is sent more than once",
            id="query-key-twice",
        ),
        pytest.param(
            "bedrock",
            {"authorization": SIGV4 + "," + SIGV4},
            (),
            "/model/m/converse",
            "not one AWS SigV4 signature",
            id="sigv4-joined",
        ),
        pytest.param(
            "bedrock",
            {"authorization": "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=x"},
            (),
            "/model/m/converse",
            "not one AWS SigV4 signature",
            id="sigv4-no-credential",
        ),
        pytest.param(
            "bedrock",
            {"authorization": "AWS4-HMAC-SHA256 Credential=/2026/x, Signature=x"},
            (),
            "/model/m/converse",
            "names no access key id",
            id="sigv4-empty-akid",
        ),
        # A key in a header the route's provider does not read belongs to
        # another provider: never forwarded.
        pytest.param(
            "anthropic",
            {"x-goog-api-key": "g"},
            (),
            "/v1/models",
            "x-goog-api-key header is not how the anthropic provider reads",
            id="google-key-to-anthropic",
        ),
        pytest.param(
            "openai",
            {"api-key": "az"},
            (),
            CHAT,
            "api-key header is not how the openai provider reads",
            id="azure-key-to-openai",
        ),
        pytest.param(
            "bedrock",
            {"x-api-key": "k"},
            (),
            "/model/m/converse",
            "not how the bedrock provider reads",
            id="x-api-key-to-bedrock",
        ),
    ],
)
def test_ambiguous_or_foreign_keys_are_refused(
    route: str, headers: dict[str, str], repeated: tuple[str, ...], path: str, error: str
) -> None:
    result = api_keys.read(route, headers, frozenset(repeated), path)
    assert result.key == ""
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
