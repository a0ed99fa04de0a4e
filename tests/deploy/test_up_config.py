"""`spendgate up --config FILE` hands the file to both services, and each
takes the settings of its own section from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.files import effective_settings, spendgate_up_commands

ENV = {
    "SPENDGATE_ADMIN_TOKEN": "a" * 32,
    "SPENDGATE_DATA_PLANE_TOKEN": "d" * 32,
}


def test_config_reaches_both_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "spendgate.yaml").write_text(
        "control_plane:\n  webhook_allow_http: true\next_proc:\n  unmetered_requests: reject\n"
    )
    monkeypatch.chdir(tmp_path)
    commands = spendgate_up_commands(tmp_path, monkeypatch, ["--config", "spendgate.yaml"])
    for name in ("control-plane", "ext_proc"):
        argv = commands[name]
        # Absolute, so the file is found whatever the child's working folder.
        assert argv[argv.index("--config") + 1] == str(tmp_path / "spendgate.yaml")
    assert "--config" not in commands["fake-provider"]
    cp = effective_settings("control_plane", commands["control-plane"], ENV)
    ep = effective_settings("ext_proc", commands["ext_proc"], ENV)
    assert cp.webhook_allow_http is True and ep.unmetered_requests == "reject"


def test_without_config_no_file_is_passed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = spendgate_up_commands(tmp_path, monkeypatch)
    assert all("--config" not in argv for argv in commands.values())
    cp = effective_settings("control_plane", commands["control-plane"], ENV)
    assert cp.webhook_allow_http is False
