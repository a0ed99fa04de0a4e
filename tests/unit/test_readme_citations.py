"""Every README section a file cites exists: `README "Upgrading"` in a
manifest or a comment, `README.md#anchor` links, and the README's own
`(#anchor)` links. A renamed section fails here, not on a reader."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# README "Name", README's "Name", README ("Name"), README, "Name"; the name
# may follow on the next comment line (`# (README\n# "Name")`).
CITATION = re.compile(r"README(?:\.md)?(?:'s)?[\s#,(]*\"([^\"\n]+)\"")
LINK = re.compile(r"README\.md#([A-Za-z0-9_-]+)")
OWN_LINK = re.compile(r"\]\(#([^)\s]+)\)")


def _headings(text: str) -> list[str]:
    in_code = False
    found = []
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.+)", line)):
            found.append(m.group(1).strip())
    return found


def _slug(title: str) -> str:
    """The anchor GitHub (and MkDocs' default toc) gives a heading."""
    text = re.sub(r"[^\w\- ]", "", title.lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(headings: list[str]) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings:
        slug = _slug(h)
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


def _section_names(text: str, headings: list[str]) -> set[str]:
    """Headings, their short form before a colon ("Routes" for "Routes: which
    provider gets a request"), and bold paragraph leads (**Usage is never lost**)."""
    names = set(headings) | {h.split(":")[0] for h in headings}
    names |= {m.group(1) for m in re.finditer(r"^\*\*([^*]+?)\.?\*\*", text, re.M)}
    return names


def _repo_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    skip = {"README.md", str(Path(__file__).relative_to(ROOT))}  # this file shows the forms
    return [ROOT / p for p in listed if p and p not in skip and (ROOT / p).is_file()]


def test_every_cited_readme_section_exists() -> None:
    text = README.read_text()
    headings = _headings(text)
    names, anchors = _section_names(text, headings), _anchors(headings)
    missing: list[str] = []
    cited = 0
    for path in _repo_files():
        try:
            body = path.read_text()
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(ROOT)
        for m in CITATION.finditer(body):
            cited += 1
            name = m.group(1).lstrip("#").strip()
            if name not in names:
                missing.append(f'{rel}: README "{name}"')
        for m in LINK.finditer(body):
            cited += 1
            if m.group(1) not in anchors:
                missing.append(f"{rel}: README.md#{m.group(1)}")
    assert cited > 10  # the patterns still find the citations
    assert not missing, "cited README sections that do not exist:\n" + "\n".join(missing)


def test_the_readme_links_to_its_own_sections() -> None:
    text = README.read_text()
    anchors = _anchors(_headings(text))
    links = OWN_LINK.findall(text)
    assert links
    assert sorted(set(links) - anchors) == []


def test_the_slugs_are_githubs() -> None:
    assert _slug("Routes: which provider gets a request") == "routes-which-provider-gets-a-request"
    assert _slug("Quickstart (no provider key needed)") == "quickstart-no-provider-key-needed"
    assert _slug("Who is the caller?") == "who-is-the-caller"
    assert _slug("Alerts: webhooks, Slack, PagerDuty") == "alerts-webhooks-slack-pagerduty"
    assert _anchors(["A", "A"]) == {"a", "a-1"}
