"""Which API key a request carries, read the way its provider reads it.

The key is what an API_KEY policy targets (hashed), so it must be the
credential the provider will actually bill, and a request must not be able
to show spendgate one key while the provider uses another:

  route          key read from                        note
  openai         Authorization: Bearer <key>          also OpenAI-compatible servers
  azure-openai   api-key, or Authorization: Bearer    Entra ID tokens ride in Bearer
  anthropic      x-api-key, or Authorization: Bearer  the 2.x SDK sends Bearer
  gemini         x-goog-api-key, or ?key=, or Bearer  ?key= is percent-decoded
  bedrock        Authorization: AWS4-HMAC-SHA256      the SigV4 access key id
                 Credential=<AKID>/..., or Bearer     (or a Bedrock API key)
  other routes   whichever one of these is present

The Bearer scheme is case-insensitive and may be followed by any whitespace;
the key itself is trimmed. A request is refused (``Credentials.error``) when
it is ambiguous which key the provider would use: two key-bearing headers
(``Authorization`` plus ``x-api-key``), one sent twice (Envoy hands
duplicates to ext_proc as separate entries, or joins some with ','), a
malformed value, or — on a known provider route — a key in a header that
provider does not read (the key belongs to another provider, and must not be
sent to this one).

Pure: takes header values and the path, returns values.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from ext_proc.protocol.dialects import Dialect, ErrorReply

AUTHORIZATION = "authorization"
QUERY_KEY = "?key="
# Every header a provider reads an API key from (the ambiguity check sees them
# all, whatever the route).
KEY_HEADERS = (AUTHORIZATION, "x-api-key", "api-key", "x-goog-api-key")

# Route name (the ENDPOINT budget name) -> the key sources its provider reads.
PROVIDER_SOURCES: dict[str, tuple[str, ...]] = {
    "openai": (AUTHORIZATION,),
    "azure-openai": ("api-key", AUTHORIZATION),
    "anthropic": ("x-api-key", AUTHORIZATION),
    "gemini": ("x-goog-api-key", QUERY_KEY, AUTHORIZATION),
    "bedrock": (AUTHORIZATION,),
}
_ANY_ROUTE = (*KEY_HEADERS, QUERY_KEY)

_SCHEME = re.compile(r"\s*(\S+)(?:\s+(.*?))?\s*", re.DOTALL)
_SIGV4 = "aws4-hmac-sha256"
_CREDENTIAL = re.compile(r"(?:^|[\s,])Credential=([^,\s]*)")
_BAD_IN_KEY = re.compile(r"[\s,]")


@dataclass(frozen=True, slots=True)
class Credentials:
    """The key the provider will bill ("" when the request carries none),
    where it was read from, or why the request must be refused."""

    key: str = ""
    source: str = ""
    error: str = ""


def read(
    route: str, headers: Mapping[str, str], repeated: Collection[str], path: str
) -> Credentials:
    """The API key of a request on ``route``.

    headers: lower-case name -> value; repeated: names that occurred more than
    once; path: ``:path`` with its query string.
    """
    reads = PROVIDER_SOURCES.get(route, _ANY_ROUTE)
    present = [name for name in KEY_HEADERS if name in headers]
    query_keys: list[str] = []
    if QUERY_KEY in reads:
        query_keys = _query_values(path, "key")
        if query_keys:
            present.append(QUERY_KEY)
    for name in present:
        if name in repeated or (name == QUERY_KEY and len(query_keys) > 1):
            return Credentials(error=f"{_label(name)} is sent more than once")
    if len(present) > 1:
        both = " and ".join(_label(n) for n in present)
        return Credentials(
            error=f"the request carries more than one API key ({both}); send exactly one"
        )
    if not present:
        return Credentials()
    source = present[0]
    if source not in reads:
        return Credentials(
            error=f"{_label(source)} is not how the {route} provider reads an API key; "
            "spendgate does not forward another provider's credentials"
        )
    if source == QUERY_KEY:
        return _plain(source, query_keys[0])
    if source == AUTHORIZATION:
        return _authorization(headers[source])
    return _plain(source, headers[source])


def _label(source: str) -> str:
    return "the ?key= query parameter" if source == QUERY_KEY else f"the {source} header"


def _query_values(path: str, name: str) -> list[str]:
    _, sep, query = path.partition("?")
    if not sep:
        return []
    return [v for k, v in parse_qsl(query, keep_blank_values=True) if k == name]


def _plain(source: str, value: str) -> Credentials:
    key = value.strip()
    if _BAD_IN_KEY.search(key):
        # 'K,K' is what a duplicated header becomes; no provider key has
        # whitespace or commas in it.
        return Credentials(error=f"{_label(source)} is malformed (a comma or space in the key)")
    return Credentials(key=key, source=source)


def _authorization(value: str) -> Credentials:
    m = _SCHEME.fullmatch(value)
    if m is None:
        return Credentials(source=AUTHORIZATION)  # empty: no key
    scheme, rest = m.group(1), m.group(2) or ""
    lowered = scheme.lower()
    if lowered == "bearer":
        if not rest:
            return Credentials(source=AUTHORIZATION)
        return _plain(AUTHORIZATION, rest)
    if lowered == _SIGV4:
        return _sigv4(rest)
    if not rest:
        # A bare value with no scheme: take it as the key.
        return _plain(AUTHORIZATION, scheme)
    # Another scheme (Basic, …): no provider here bills it, but its
    # credentials still identify the caller.
    return _plain(AUTHORIZATION, rest)


def _sigv4(params: str) -> Credentials:
    """The access key id of ``Credential=AKID/date/region/service/aws4_request``."""
    credentials = _CREDENTIAL.findall(params)
    if len(credentials) != 1 or _SIGV4 in params.lower():
        # Two signatures in one header is a duplicated Authorization.
        return Credentials(error="the Authorization header is not one AWS SigV4 signature")
    access_key_id = credentials[0].split("/", 1)[0]
    if not access_key_id:
        return Credentials(error="the AWS SigV4 Authorization header names no access key id")
    return Credentials(key=access_key_id, source=AUTHORIZATION)


REJECT_REASON = "ambiguous_api_key"


def refusal(error: str, dialect: Dialect) -> ErrorReply:
    """The 400 a refused request gets, in its provider's error shape."""
    reply = dialect(400, REJECT_REASON, f"spendgate refused the request: {error}.")
    return ErrorReply(
        reply.status, {**reply.headers, "x-spendgate-error": REJECT_REASON}, reply.body
    )
