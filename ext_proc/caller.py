"""Who is calling: the facts ext_proc reads from a request's headers."""

from __future__ import annotations

_API_KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")


def api_key_of(headers: dict[str, str]) -> str:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for name in _API_KEY_HEADERS:
        if name in headers:
            return headers[name].strip()
    return ""
