"""Requests of no metered API shape: which ones were already logged.

Every such request on a provider route is counted (or refused, with
``unmetered_requests: reject``); the operator also gets one log line per
distinct path, so a new API that spendgate does not meter shows up once, not
once per request. Paths carry ids (``/v1/batches/batch_6a1f…``,
``/v1/files/file-…``), so a path is first reduced to a template with id-like
segments replaced by ``{id}``, and the set of templates is bounded: past
``MAX_PATHS`` distinct templates, no new one is logged (one line says so).
Pure: no I/O; the processor logs.
"""

from __future__ import annotations

import re

MAX_PATHS = 1024  # distinct path templates remembered (and logged once each)
MAX_PATH_CHARS = 256  # a logged path is cut to this length
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT"})
# A segment that is an id: has a digit and is long, or is very long.
_ID = re.compile(r"^(?=.*\d).{12,}$|^.{41,}$")


def path_template(path: str) -> str:
    """``path`` without its query, id-like segments replaced by ``{id}``, and
    cut to ``MAX_PATH_CHARS``: a bounded name for log lines."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    return "/".join(map(_segment, path.split("/")))[:MAX_PATH_CHARS]


def _segment(segment: str) -> str:
    # "gemini-2.5-flash:countTokens": the name is an id, the method is not.
    name, colon, method = segment.partition(":")
    return ("{id}" if _ID.match(name) else name) + colon + method


def method_label(method: str) -> str:
    """A bounded metrics label for an HTTP method: the method, or ``other``."""
    return method if method in KNOWN_METHODS else "other"


class UnmeteredPaths:
    """The path templates of unmetered requests seen so far (bounded)."""

    def __init__(self, limit: int = MAX_PATHS) -> None:
        self.limit = limit
        self._seen: set[tuple[str, str, str]] = set()
        self.full_reported = False  # the "no more paths logged" line was given

    def first_time(self, route: str, method: str, template: str) -> bool:
        """True the first time (route, method, template) is seen, while fewer
        than ``limit`` are remembered; False otherwise."""
        key = (route, method, template)
        if key in self._seen or len(self._seen) >= self.limit:
            return False
        self._seen.add(key)
        return True

    @property
    def full(self) -> bool:
        return len(self._seen) >= self.limit
