"""The Docker build context leaves out local state, credentials, virtualenvs
and caches, and keeps everything the Dockerfile copies. Patterns are matched
the way Docker matches them (Go filepath.Match per path segment, ``**`` for
any number of folders, a matching folder excludes what is inside, ``!``
re-includes, the last matching line wins)."""

from __future__ import annotations

import re

from tests.deploy.files import ROOT


def _regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def _rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _regex(line.lstrip("!").strip("/"))))
    return rules


def excluded(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, rx in _rules():
        if any(rx.match(p) for p in prefixes):
            result = not negate
    return result


def test_local_state_credentials_and_caches_stay_out() -> None:
    for path in (
        ".venv/bin/python",
        ".venv/lib/python3.11/site-packages/envoy/envoy",
        ".spendgate/credentials.json",
        ".spendgate/secrets.key",
        ".spendgate/spendgate.db",
        "deploy/.spendgate/credentials.json",
        "credentials.json",
        "deploy/kubernetes/tls.key",
        ".env",
        ".git/HEAD",
        "spendgate/__pycache__/settings.cpython-311.pyc",
        "control_plane/store/__pycache__/repo.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/0.6/x",
        ".pytest_cache/v/cache/lastfailed",
        "spendgate.egg-info/PKG-INFO",
    ):
        assert excluded(path), f"{path} would be sent to the Docker daemon"


def test_everything_the_dockerfile_copies_is_sent() -> None:
    copied: list[str] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    assert "spendgate" in copied and "pyproject.toml" in copied
    for source in copied:
        top = ROOT / source
        files = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        sent = [
            p
            for p in files
            if "__pycache__" not in p.parts and not excluded(str(p.relative_to(ROOT)))
        ]
        assert sent, f"COPY {source}: nothing of it is in the build context"
        for p in files:
            rel = str(p.relative_to(ROOT))
            if "__pycache__" not in p.parts and not rel.endswith((".pyc", ".key")):
                assert not excluded(rel), f"{rel} is copied by the Dockerfile but ignored"
