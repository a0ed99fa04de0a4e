"""Webhook URLs as the admin API shows them: the parts that act as
credentials (query values, the token of a Slack hooks URL) masked. Shared by
the control plane (what it returns) and `spendgate apply` (what it compares a
declared URL with)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "****"


def masked_url(url: str) -> str:
    """``url`` with query values and the token of a Slack hooks URL masked."""
    parts = urlsplit(url)
    path = parts.path
    if parts.hostname == "hooks.slack.com":
        head, sep, last = path.rstrip("/").rpartition("/")
        if sep and last:
            path = f"{head}/{MASK}"
    query = "&".join(
        f"{k}={MASK}" if v else k for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))
