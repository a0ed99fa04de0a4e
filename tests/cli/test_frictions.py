"""Daily CLI frictions (issue 16), against a real control plane: policies by
name, one percentage everywhere, `price set` keeping the prices it is not
given, the real SOURCE in `price list`, and where the CLI finds its token."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from spendgate.cli.credentials import client_token
from spendgate.cli.main import main
from spendgate.cli.output import percent_text
from tests.conftest import Stack
from tests.harness import ADMIN_TOKEN, wait_until

pytestmark = pytest.mark.e2e


def _cli(capsys: pytest.CaptureFixture[str], stack: Stack, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*argv, "--server", f"127.0.0.1:{stack.cp.port}", "--token", ADMIN_TOKEN])
    out, err = capsys.readouterr()
    return code, out, err


def _json(out: str) -> Any:
    """The command's JSON; log lines of the in-process services share stdout."""
    start = re.search(r"^[\[{]$", out, re.M)
    assert start is not None, out
    return json.JSONDecoder().raw_decode(out[start.start() :])[0]


def _create(capsys: pytest.CaptureFixture[str], stack: Stack, name: str, amount: str) -> str:
    code, out, err = _cli(
        capsys,
        stack,
        *("policy", "create", "--name", name, "--amount", amount),
        *("--action", "alert", "--json"),
    )
    assert code == 0, err
    return str(_json(out)["id"])


def test_policy_get_update_delete_by_name(capsys: pytest.CaptureFixture[str], stack: Stack) -> None:
    first = _create(capsys, stack, "by-name", "5")
    code, out, _ = _cli(capsys, stack, "policy", "get", "by-name", "--json")
    assert code == 0 and _json(out)["id"] == first
    code, out, _ = _cli(capsys, stack, "policy", "update", "by-name", "--amount", "7", "--json")
    assert code == 0 and _json(out)["amount_usd"] == "7.00"

    # Names are unique: a second "by-name" is refused, naming the field and the holder.
    code, _, err = _cli(
        capsys, stack, "policy", "create", "--name", "by-name", "--amount", "6", "--action", "alert"
    )
    assert code == 1
    assert err.strip() == (
        f"spendgate: already exists: name: a policy named 'by-name' already exists ({first})"
    )
    code, out, _ = _cli(capsys, stack, "policy", "delete", "by-name")
    assert code == 0 and out.strip().endswith(f"deleted {first}")
    code, _, err = _cli(capsys, stack, "policy", "get", "by-name")
    assert code == 1 and "no policy has the id or name 'by-name'" in err
    # An unknown id is still the control plane's own answer.
    code, _, err = _cli(capsys, stack, "policy", "get", "bp_00000000000000000000000000")
    assert code == 1 and err.startswith("spendgate: not found")


def test_spend_and_status_print_the_same_percentage(
    capsys: pytest.CaptureFixture[str], stack: Stack
) -> None:
    assert percent_text("0.0001095", "0.0001") == "109%"
    assert percent_text("0.00009999", "0.0001") == "99%"
    policy = _create(capsys, stack, "pct", "0.0001")
    code, _, err = _cli(
        capsys, stack, "spend", "adjust", policy, "--amount", "0.0001095", "--reason", "test"
    )
    assert code == 0, err

    def spend_says() -> bool:
        out = _cli(capsys, stack, "spend", "--policy", policy)[1]
        return "109%" in out

    wait_until(spend_says, message="spend shows 109%")
    out = _cli(capsys, stack, "spend", "--policy", policy)[1]
    assert "110%" not in out
    out = _cli(capsys, stack, "status")[1]
    [line] = [x for x in out.splitlines() if "spent $0.0001095 of $0.0001" in x and "%" in x]
    assert " 109%" in line
    assert _cli(capsys, stack, "policy", "delete", policy)[0] == 0


def test_price_set_keeps_the_prices_it_is_not_given(
    capsys: pytest.CaptureFixture[str], stack: Stack
) -> None:
    def gpt_4o() -> dict[str, str]:
        _, out, _ = _cli(capsys, stack, "price", "list", "--model", "gpt-4o", "--json")
        listed = _json(out)
        [entry] = [p for p in listed if p["model"] == "gpt-4o"]
        return dict(entry["price"]) | {"override_id": entry.get("override_id", "")}

    assert gpt_4o()["cached_input"] == "1.25"
    code, out, err = _cli(
        capsys, stack, "price", "set", "gpt-4o", "--input", "2.00", "--output", "8.00"
    )
    assert code == 0, err
    [said] = [line for line in out.splitlines() if ": gpt-4o now $" in line]
    override_id = said.split(":")[0]
    assert said == (
        f"{override_id}: gpt-4o now $2 in / $8 out per million tokens; kept from its current "
        "price: cached-input $1.25, cache-write none (priced as input), "
        "cache-write-1h none (priced as input)"
    ), said
    price = gpt_4o()
    assert (price["input"], price["output"], price["cached_input"]) == ("2", "8", "1.25")
    # A later change keeps the override's other prices, not the catalog's.
    assert _cli(capsys, stack, "price", "set", "gpt-4o", "--output", "9")[0] == 0
    price = gpt_4o()
    assert (price["input"], price["output"], price["cached_input"]) == ("2", "9", "1.25")
    assert price["override_id"] == override_id

    code, out, _ = _cli(capsys, stack, "price", "list", "--model", "gpt-4o")
    rows = out[out.index("PROVIDER") :].splitlines()
    assert rows[0].split()[-2:] == ["SOURCE", "CHECKED"]
    [catalog] = [r for r in rows if r.split()[1] == "gpt-4o-mini"]
    assert catalog.split()[-2:] == [
        "https://github.com/BerriAI/litellm/blob/main/model_prices_and_context_window.json",
        "2026-11-28",
    ]
    [overridden] = [r for r in rows if r.split()[1] == "gpt-4o"]
    assert f"override {override_id}" in overridden
    assert _cli(capsys, stack, "price", "delete", override_id)[0] == 0

    code, _, err = _cli(capsys, stack, "price", "set", "my-own-model", "--input", "1")
    assert (
        code == 1
        and err.strip() == "spendgate: spendgate has no price for my-own-model: give --output"
    )


def test_the_token_is_found_in_the_state_dir_and_parent_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SPENDGATE_TOKEN", "SPENDGATE_ADMIN_TOKEN", "SPENDGATE_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    project = tmp_path / "project"
    (project / ".spendgate").mkdir(parents=True)
    (project / ".spendgate" / "credentials.json").write_text('{"admin_token": "from-parent"}')
    deep = project / "src" / "pkg"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert client_token(None) == "from-parent"
    elsewhere = tmp_path / "state"
    elsewhere.mkdir()
    (elsewhere / "credentials.json").write_text('{"admin_token": "from-state-dir"}')
    assert client_token(None, str(elsewhere)) == "from-state-dir"
    monkeypatch.setenv("SPENDGATE_STATE_DIR", str(elsewhere))
    assert client_token(None) == "from-state-dir"
    # An explicit folder without credentials is not second-guessed.
    monkeypatch.setenv("SPENDGATE_STATE_DIR", str(tmp_path / "empty"))
    assert client_token(None) == ""
    assert client_token("flag") == "flag"
    monkeypatch.delenv("SPENDGATE_STATE_DIR")
    monkeypatch.chdir(tmp_path)
    assert client_token(None) == ""
