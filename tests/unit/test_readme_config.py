"""README's Configuration tables are the complete reference: every setting of
each Settings dataclass, its environment variable and its default, and
nothing else. Adding, renaming or re-defaulting a setting without the README
fails here."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from control_plane.config import Settings as ControlPlaneSettings
from ext_proc.config import Settings as ExtProcSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def _section(text: str, heading: str) -> str:
    """From ``heading`` (a line) to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1 :]
    stop = re.search(rf"^#{{1,{len(level)}}} ", rest, re.MULTILINE)
    return rest[: stop.start()] if stop else rest


def _rows(section: str) -> dict[str, list[str]]:
    """Table rows keyed by the setting (the first cell, in backticks)."""
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        name = cells[0].strip("`")
        assert name not in rows, f"{name} is listed twice"
        rows[name] = cells
    return rows


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


TABLES = [
    pytest.param(ControlPlaneSettings, "### Control plane", "CONTROL_PLANE", id="control-plane"),
    pytest.param(ExtProcSettings, "### ext_proc", "EXT_PROC", id="ext_proc"),
]


@pytest.mark.parametrize(("cls", "heading", "section"), TABLES)
def test_readme_lists_every_setting_with_its_env_var_and_default(
    cls: type, heading: str, section: str
) -> None:
    configuration = _section(README.read_text(), "## Configuration")
    heading_line = next(
        line for line in configuration.splitlines() if line.startswith(heading + " ")
    )
    rows = _rows(_section(configuration, heading_line))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(rows) == set(fields)
    for name, cells in rows.items():
        assert len(cells) == 4, cells
        _, env, default, meaning = cells
        assert env == f"`SPENDGATE_{section}_{name.upper()}`"
        value = fields[name].default
        if value == "":
            assert default.startswith("—"), (name, default)
        else:
            assert default == f"`{_default_text(value)}`", (name, default)
        assert meaning, name
