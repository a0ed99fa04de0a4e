"""Every README section and docs page a file cites exists: `README "Quickstart"`
or `docs/operations/upgrading.md` in a manifest or a comment, with an anchor
(`docs/concepts/identity.md#canonical-members`) or a section name
(`docs/operations/secrets.md "Replacing a key"`), `README.md#anchor` links, and
the README's own links. A renamed section or moved page fails here, not on a
reader. Links inside docs/ are checked by `mkdocs build --strict` (make lint)."""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# README "Name", README's "Name", README ("Name"), README, "Name"; the name
# may follow on the next comment line (`# (README\n# "Name")`).
CITATION = re.compile(r"README(?:\.md)?(?:'s)?[\s#,(]*\"([^\"\n]+)\"")
LINK = re.compile(r"README\.md#([A-Za-z0-9_-]+)")
OWN_LINK = re.compile(r"\]\(#([^)\s]+)\)")
# docs/page.md, docs/page.md#anchor, docs/page.md "Name" (or on the next comment line).
DOC = re.compile(r"\bdocs/([\w./-]+?\.md)(?:#([\w-]+)|[\s#,(]*\"([^\"\n]+)\")?")
README_DOC_LINK = re.compile(r"\]\((docs/[^)\s#]+)(?:#([^)\s]+))?\)")


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
    """The anchor GitHub gives a heading (the README, read there)."""
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


def _site_slug(title: str) -> str:
    """The anchor MkDocs' toc extension gives a heading (docs/, read on the site)."""
    text = unicodedata.normalize("NFKD", title.replace("`", ""))
    text = text.encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _site_anchors(text: str) -> set[str]:
    out: set[str] = set()
    for h in _headings(text):
        slug, n = _site_slug(h), 0
        while (slug if n == 0 else f"{slug}_{n}") in out:
            n += 1
        out.add(slug if n == 0 else f"{slug}_{n}")
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


def _doc_missing(page: str, anchor: str | None, name: str | None) -> str | None:
    """Why a citation of docs/``page`` does not resolve, or None."""
    path = DOCS / page
    if not path.is_file():
        return "no such page"
    text = path.read_text()
    if anchor and anchor not in _site_anchors(text):
        return f"no anchor #{anchor}"
    if name and name.lstrip("#").strip() not in _section_names(text, _headings(text)):
        return f'no section "{name}"'
    return None


def test_every_cited_section_exists() -> None:
    text = README.read_text()
    headings = _headings(text)
    names, anchors = _section_names(text, headings), _anchors(headings)
    missing: list[str] = []
    cited = docs_cited = 0
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
        if rel.parts[0] == "docs":
            continue  # links between pages: mkdocs build --strict
        for m in DOC.finditer(body):
            docs_cited += 1
            if why := _doc_missing(*m.groups()):
                missing.append(f"{rel}: {m.group(0)}: {why}")
    assert cited + docs_cited > 10  # the patterns still find the citations
    assert not missing, "cited sections that do not exist:\n" + "\n".join(missing)


def test_the_readme_links_resolve() -> None:
    text = README.read_text()
    anchors = _anchors(_headings(text))
    assert sorted(set(OWN_LINK.findall(text)) - anchors) == []
    links = README_DOC_LINK.findall(text)
    assert links
    broken = [
        f"{page}#{anchor}" if anchor else page
        for page, anchor in links
        if _doc_missing(page.removeprefix("docs/"), anchor or None, None)
    ]
    assert broken == []


def test_the_slugs_are_githubs_and_mkdocs() -> None:
    assert _slug("Routes: which provider gets a request") == "routes-which-provider-gets-a-request"
    assert _slug("Quickstart (no provider key needed)") == "quickstart-no-provider-key-needed"
    assert _slug("Who is the caller?") == "who-is-the-caller"
    assert _anchors(["A", "A"]) == {"a", "a-1"}
    assert _site_slug("Control plane (`python -m control_plane`)") == (
        "control-plane-python-m-control_plane"
    )
    assert _site_slug("Alerts: webhooks, Slack, PagerDuty") == "alerts-webhooks-slack-pagerduty"
    assert _site_anchors("# A\n## A\n```\n# not a heading\n```\n### A") == {"a", "a_1", "a_2"}


def test_the_patterns_read_each_form() -> None:
    found = [
        m.groups()
        for m in DOC.finditer(
            "see docs/deployment.md. (docs/concepts/identity.md#canonical-members)\n"
            '# docs/operations/secrets.md "Replacing a key"\n'
            '# (docs/operations/upgrading.md,\n#  "Upgrading")'
        )
    ]
    assert found == [
        ("deployment.md", None, None),
        ("concepts/identity.md", "canonical-members", None),
        ("operations/secrets.md", None, "Replacing a key"),
        ("operations/upgrading.md", None, "Upgrading"),
    ]
