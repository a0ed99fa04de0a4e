"""Who is calling: the facts ext_proc reads from a request's headers."""

from __future__ import annotations

MAX_TAGS = 32


def parse_tags(value: str) -> dict[str, str]:
    """``team=search,env=prod`` -> {"team": "search", "env": "prod"} (bounded)."""
    tags: dict[str, str] = {}
    for part in value.split(",")[:MAX_TAGS]:
        key, sep, val = part.partition("=")
        if sep and key.strip() and val.strip():
            tags[key.strip()] = val.strip()
    return tags
