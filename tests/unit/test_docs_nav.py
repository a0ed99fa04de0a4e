"""The docs nav (mkdocs.yml) and its hook (spendgate/mkdocs_nav.py): pages
other branches are still writing are listed before they exist, and the hook
drops exactly those, so `mkdocs build --strict` (make lint) stays green while
every page that does exist is reachable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spendgate.mkdocs_nav import existing, on_config

ROOT = Path(__file__).resolve().parents[2]


def _pages(nav: list[Any]) -> list[str]:
    found: list[str] = []
    for entry in nav:
        target = next(iter(entry.values())) if isinstance(entry, dict) else entry
        found += _pages(target) if isinstance(target, list) else [target]
    return found


def test_missing_pages_and_empty_sections_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# B\n")
    nav = [
        {"Home": "a.md"},
        {"Later": "later.md"},
        {"Section": [{"B": "sub/b.md"}, {"Gone": "sub/gone.md"}]},
        {"Empty": [{"Gone": "gone.md"}]},
        "sub/b.md#part",
        {"Elsewhere": "https://example.com/"},
    ]
    assert existing(nav, tmp_path) == [
        {"Home": "a.md"},
        {"Section": [{"B": "sub/b.md"}]},
        "sub/b.md#part",
        {"Elsewhere": "https://example.com/"},
    ]
    config = {"nav": nav, "docs_dir": str(tmp_path)}
    assert on_config(config)["nav"] == existing(nav, tmp_path)


def test_every_page_in_docs_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = _pages(config["nav"])
    assert len(listed) == len(set(listed)), "a page is listed twice"
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages - set(listed) == set(), "add these pages to mkdocs.yml's nav"
    assert set(_pages(existing(config["nav"], ROOT / "docs"))) == pages
