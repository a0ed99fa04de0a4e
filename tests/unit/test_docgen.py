"""The generated reference pages (spendgate/docgen.py) match the code, and the
README stays a front page: docs/reference/configuration.md lists every setting
of each settings dataclass with its environment variable and default, and
docs/reference/api.md every service, method, message and field of the protos.
Adding, renaming or re-defaulting a setting or an RPC without running
`python -m spendgate.docgen` fails here."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from control_plane.config import Settings as ControlPlaneSettings
from ext_proc.config import Settings as ExtProcSettings
from spendgate import docgen
from spendgate.v1 import budget_pb2, dataplane_pb2, pricing_pb2, secrets_pb2, webhooks_pb2

ROOT = Path(__file__).resolve().parents[2]
README_MAX_BYTES = 12 * 1024


@pytest.mark.parametrize("page", sorted(docgen.PAGES))
def test_the_committed_page_is_the_generated_one(page: str) -> None:
    current = (ROOT / "docs" / page).read_text()
    assert docgen.rendered(page, current) == current, "run: python -m spendgate.docgen"


def test_check_mode_reports_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "docs", tmp_path, dirs_exist_ok=True)
    page = tmp_path / "reference" / "configuration.md"
    stale = page.read_text()
    stale = stale.replace("| `listen` | str |", "| `listen` | int |", 1)
    page.write_text(stale)
    monkeypatch.setattr(docgen, "DOCS", tmp_path)
    assert docgen.main(["--check"]) == 1
    assert page.read_text() == stale  # --check writes nothing
    assert docgen.main([]) == 0
    assert docgen.main(["--check"]) == 0
    assert "| `listen` | str |" in page.read_text()


def test_a_page_without_markers_is_refused() -> None:
    with pytest.raises(SystemExit, match="markers"):
        docgen.rendered("reference/api.md", "# Admin API\n")


def _rows(section: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            name = cells[0].strip("`")
            assert name not in rows, f"{name} is listed twice"
            rows[name] = cells
    return rows


@pytest.mark.parametrize(
    ("cls", "title", "section"),
    [
        (ControlPlaneSettings, "## Control plane", "CONTROL_PLANE"),
        (ExtProcSettings, "## ext_proc", "EXT_PROC"),
    ],
)
def test_every_setting_is_listed_with_its_env_var_default_and_meaning(
    cls: type, title: str, section: str
) -> None:
    text = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    part = text.split(title, 1)[1].split("\n## ", 1)[0]
    rows = _rows(part)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(rows) == set(fields)
    for name, (_, kind, env, default, meaning) in rows.items():
        assert env == f"`SPENDGATE_{section}_{name.upper()}`"
        assert kind == fields[name].type
        value = fields[name].default
        if value == "":
            assert default == "—", name
        elif isinstance(value, bool):
            assert default == f"`{str(value).lower()}`", name
        elif isinstance(value, float):
            assert default == f"`{value:g}`", name
        else:
            assert default == f"`{value}`", name
        assert len(meaning) > 10, name  # the comment above the field


def test_the_api_page_lists_every_method_message_and_field() -> None:
    text = (ROOT / "docs" / "reference" / "api.md").read_text()
    headings = set(re.findall(r"^#{2,4} (\S+)$", text, re.M))
    for module in (budget_pb2, dataplane_pb2, pricing_pb2, secrets_pb2, webhooks_pb2):
        file = module.DESCRIPTOR
        assert file.name.removeprefix("spendgate/v1/") in headings
        for service in file.services_by_name.values():
            assert service.name in headings
            for method in service.methods:
                assert f"| `{method.name}` |" in text, method.full_name
        for message in file.message_types_by_name.values():
            assert message.name in headings, message.name
            part = text.split(f"\n### {message.name}\n", 1)[1].split("\n### ", 1)[0]
            assert set(_rows(part)) == {f.name for f in message.fields}, message.name


def test_proto_comments_become_descriptions() -> None:
    text = (ROOT / "docs" / "reference" / "api.md").read_text()
    # budget.proto: `// Answer further requests with HTTP 429 until the window resets.`
    assert "| `ACTION_REJECT` | 2 | Answer further requests with HTTP 429" in text
    # pricing.proto's header comment
    assert "Prices are decimal strings in US dollars per million tokens" in text


def test_the_readme_stays_a_front_page() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: move reference text to docs/"
