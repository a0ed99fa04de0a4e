"""`make run` installs only what the services need; `make test` and `make lint`
add the dev extra. Checked with ``make -n`` against a venv in a temp folder,
so nothing is installed, and by what the packages import."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.files import ROOT

DEV_ONLY = {
    "openai",
    "anthropic",
    "google.genai",
    "boto3",
    "botocore",
    "standardwebhooks",
    "jwt",
    "pytest",
    "hypothesis",
    "ruff",
    "mypy",
    "mkdocs",
    "material",
}


def _dev_only(module: str) -> bool:
    return any(module == d or module.startswith(d + ".") for d in DEV_ONLY)


def _plan(target: str, venv: Path) -> str:
    done = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target, f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _installs(plan: str) -> list[str]:
    return re.findall(r"pip install --quiet -e (\S+)", plan)


def test_run_installs_without_the_dev_extra(tmp_path: Path) -> None:
    plan = _plan("run", tmp_path / "venv")
    assert _installs(plan) == ["."], plan
    assert "spendgate up --demo" in plan


@pytest.mark.parametrize("target", ["test", "lint", "docs"])
def test_tests_lint_and_docs_install_the_dev_extra(tmp_path: Path, target: str) -> None:
    assert _installs(_plan(target, tmp_path / "venv")) == ["'.[dev]'"]


def test_lint_builds_the_docs_strictly_and_docs_regenerates_the_reference(tmp_path: Path) -> None:
    (build,) = re.findall(r".*mkdocs build.*", _plan("lint", tmp_path / "venv"))
    assert "--strict" in build
    assert "--quiet" not in build and " -q" not in build  # it would hide what --strict counts
    plan = _plan("docs", tmp_path / "venv")
    assert plan.index("-m spendgate.docgen") < plan.index("mkdocs build --strict")


def test_run_after_a_dev_install_installs_nothing(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    for stamp in (".installed-dev", ".installed-run"):
        (venv / stamp).touch()
        later = (ROOT / "pyproject.toml").stat().st_mtime + 10
        os.utime(venv / stamp, (later, later))
    assert _installs(_plan("run", venv)) == []
    assert _installs(_plan("test", venv)) == []


def test_the_services_import_no_dev_dependency() -> None:
    found = []
    for package in ("spendgate", "control_plane", "ext_proc"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and node.level == 0
                    else []
                )
                found += [f"{path}: {n}" for n in names if _dev_only(n)]
    assert not found
