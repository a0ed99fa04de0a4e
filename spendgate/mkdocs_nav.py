"""MkDocs hook (mkdocs.yml ``hooks:``): the nav lists pages that other
branches are still writing; an entry whose file does not exist yet is dropped
instead of failing the strict build. Everything else about the nav stays as
mkdocs.yml says, and a page in docs/ that the nav omits still fails it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def existing(nav: list[Any], docs_dir: Path) -> list[Any]:
    """``nav`` without the pages missing from ``docs_dir`` (and sections left empty)."""
    kept: list[Any] = []
    for entry in nav:
        if isinstance(entry, dict):
            ((title, target),) = entry.items()
            if isinstance(target, list):
                children = existing(target, docs_dir)
                if children:
                    kept.append({title: children})
            elif _exists(target, docs_dir):
                kept.append(entry)
        elif _exists(entry, docs_dir):
            kept.append(entry)
    return kept


def _exists(target: str, docs_dir: Path) -> bool:
    if "://" in target:
        return True
    return (docs_dir / target.split("#", 1)[0]).is_file()


def on_config(config: Any) -> Any:
    config["nav"] = existing(config["nav"], Path(config["docs_dir"]))
    return config
