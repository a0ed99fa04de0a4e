"""`spendgate apply` and `spendgate export` (issue 16, policies as code)
against a real control plane on SQLite and on PostgreSQL: examples/budgets.yaml
(10 policies, 2 webhooks, 3 price overrides) applied to a fresh database,
re-applied without a change, edited and diffed exactly, exported and applied
to an empty database with an identical result."""

from __future__ import annotations

import base64
import contextlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import psycopg
import pytest
import yaml

from spendgate.cli import apply as apply_cli
from spendgate.cli import apply_files
from spendgate.cli.main import main
from tests.api.apiserver import Api, running_api
from tests.conftest import PG_ADMIN_URL
from tests.harness import ADMIN_TOKEN, READ_TOKEN, SECRETS_KEY

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "budgets.yaml"
ENV = {
    "PD_ROUTING_KEY": "R0123456789abcdef",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/first-token",
}
# What the CLI prints (log lines of the in-process server share stdout).
_OURS = re.compile(r"^(\+ |~ |= |- |  not declared |plan: |applied: |exported )")


@contextlib.contextmanager
def control_plane(url: str) -> Iterator[Api]:
    with running_api(url, secrets_key=SECRETS_KEY) as api:
        yield api


def cli(capsys: pytest.CaptureFixture[str], api: Api, *argv: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main([*argv, "--server", api.server.settings.listen, "--token", ADMIN_TOKEN])
    out, err = capsys.readouterr()
    return code, [line for line in out.splitlines() if _OURS.match(line)], err


def state(api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> str:
    """The control plane's objects as export writes them, without the header."""
    target = tmp_path / f"state-{api.server.settings.listen.rsplit(':', 1)[1]}.yaml"
    code, _, err = cli(capsys, api, "export", "-o", str(target))
    assert code == 0, err
    return "\n".join(
        line
        for line in target.read_text().splitlines()
        if not line.startswith("# spendgate export")
    )


@contextlib.contextmanager
def empty_database(like: str, tmp_path: Path) -> Iterator[str]:
    """A new, empty database of the kind ``like`` names (dropped afterwards)."""
    if like.startswith("sqlite"):
        yield f"sqlite:///{tmp_path}/second.db"
        return
    name = f"spendgate_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_by_hand(capsys: pytest.CaptureFixture[str], api: Api) -> None:
    """A policy made with `spendgate policy create`, not by apply."""
    argv = ("policy", "create", "--name", "by-hand", "--amount", "1", "--action", "alert")
    code, _, err = cli(capsys, api, *argv)
    assert code == 0, err


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    return ENV


def test_example_and_export_match_the_schema(tmp_path: Path) -> None:
    validator = jsonschema.Draft202012Validator(apply_files.schema())
    validator.check_schema(apply_files.schema())
    data = yaml.safe_load(EXAMPLE.read_text())
    assert list(validator.iter_errors(data)) == []
    assert (len(data["policies"]), len(data["webhooks"]), len(data["price_overrides"])) == (
        10,
        2,
        3,
    )
    shipped = Path(__file__).resolve().parents[2] / "schemas" / "budgets.schema.json"
    assert (
        shipped.read_text()
        == apply_files.resources.files("spendgate").joinpath("data/budgets.schema.json").read_text()
    )


def test_apply_reapply_edit_export_roundtrip(
    capsys: pytest.CaptureFixture[str],
    db_url: str,
    tmp_path: Path,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with control_plane(db_url) as api:
        code, out, err = cli(capsys, api, "apply", "-f", str(EXAMPLE))
        assert code == 0, err
        assert out[-1] == "applied: 15 created, 0 updated, 0 unchanged, 0 deleted"
        assert "+ created webhook oncall" in out and "+ created policy org-monthly" in out
        assert "+ created price override llama-3.1-70b * self-hosted" in out

        # Again: nothing to do, and --dry-run says so with exit status 0.
        code, out, err = cli(capsys, api, "apply", "-f", str(EXAMPLE), "--dry-run")
        assert code == 0, err
        assert out[-1] == "plan: 0 to create, 0 to update, 15 unchanged, 0 to delete"
        assert all(line.startswith("= unchanged ") for line in out[:-1])

        # A policy made by hand is never pruned by --prune, only by --prune-all.
        create_by_hand(capsys, api)

        # Edit: one amount, one policy gone, one new, the Slack URL (a secret),
        # one price.
        data = yaml.safe_load(EXAMPLE.read_text())
        data["policies"][0]["amount"] = "6000"
        data["policies"][0]["thresholds"] = [50, 90, 100]
        data["policies"][4]["enforcement"] = "enforced"  # a shadow policy promoted
        del data["policies"][9]
        data["policies"].append(
            {"name": "late-night", "amount": 10, "window": "1h", "action": "reject"}
        )
        data["price_overrides"][0]["output"] = "8.50"
        edited = tmp_path / "edited" / "budgets.yaml"
        edited.parent.mkdir()
        edited.write_text(yaml.safe_dump(data, sort_keys=False))
        monkeypatch.setenv("SLACK_WEBHOOK_URL", ENV["SLACK_WEBHOOK_URL"].replace("first", "new"))
        code, out, err = cli(capsys, api, "apply", "-f", str(edited.parent), "--dry-run", "--prune")
        assert code == 2, err
        changed = [line for line in out if not line.startswith("= unchanged ")]
        assert changed == [
            "~ would update price override gpt-4o * *: output 9 -> 8.5",
            "~ would update webhook finops-slack: secrets (url, secret or routing key)",
            "~ would update policy org-monthly: amount 5000.00 -> 6000.00, "
            "thresholds [50, 80, 100] -> [50, 90, 100]",
            "~ would update policy each-user-daily: enforcement shadow -> enforced",
            "+ would create policy late-night",
            "  not declared policy by-hand (kept: not created by apply; --prune-all deletes it)",
            "- would delete policy experiments",
            "plan: 1 to create, 4 to update, 10 unchanged, 1 to delete, 1 not declared (kept)",
        ]
        code, out, err = cli(capsys, api, "apply", "-f", str(edited.parent), "--prune")
        assert code == 0, err
        assert (
            out[-1]
            == "applied: 1 created, 4 updated, 10 unchanged, 1 deleted, 1 not declared (kept)"
        )
        code, out, _ = cli(capsys, api, "apply", "-f", str(edited), "--dry-run", "--prune")
        assert code == 0 and out[-1].startswith("plan: 0 to create, 0 to update, 15 unchanged")

        # Export: the schema's format, secrets as references with their
        # variables named, never the values.
        exported = tmp_path / "exported.yaml"
        code, _, err = cli(capsys, api, "export", "-o", str(exported))
        assert code == 0, err
        text = exported.read_text()
        assert ENV["PD_ROUTING_KEY"] not in text and "new-token" not in text
        assert "routing_key: ${env:SPENDGATE_WEBHOOK_ONCALL_ROUTING_KEY}" in text
        assert "# oncall: set SPENDGATE_WEBHOOK_ONCALL_ROUTING_KEY" in text
        assert "url: ${env:SPENDGATE_WEBHOOK_FINOPS_SLACK_URL}" in text
        assert "forecast_alert: 2h00m,window-end" in text and "expose_to_clients: true" in text
        jsonschema.validate(yaml.safe_load(text), apply_files.schema())
        before = state(api, capsys, tmp_path)

        # Applying the export to the same control plane changes nothing once
        # the variables hold the same secrets, but adopting what was made by
        # hand (it is declared now)...
        monkeypatch.setenv("SPENDGATE_WEBHOOK_ONCALL_ROUTING_KEY", ENV["PD_ROUTING_KEY"])
        monkeypatch.setenv(
            "SPENDGATE_WEBHOOK_FINOPS_SLACK_URL", ENV["SLACK_WEBHOOK_URL"].replace("first", "new")
        )
        code, out, err = cli(capsys, api, "apply", "-f", str(exported), "--dry-run")
        assert code == 2, err
        assert [line for line in out if not line.startswith("= unchanged ")] == [
            "~ would update policy by-hand: adopted (it was not created by apply)",
            "plan: 0 to create, 1 to update, 15 unchanged, 0 to delete",
        ]

    # ... and to an empty one (of the same kind) it makes the same objects.
    with empty_database(db_url, tmp_path) as url, control_plane(url) as second:
        code, out, err = cli(capsys, second, "apply", "-f", str(exported))
        assert code == 0, err
        assert out[-1] == "applied: 16 created, 0 updated, 0 unchanged, 0 deleted"
        assert state(second, capsys, tmp_path) == before
        code, out, _ = cli(capsys, second, "apply", "-f", str(exported), "--dry-run")
        assert code == 0 and out[-1] == "plan: 0 to create, 0 to update, 16 unchanged, 0 to delete"


def test_prune_all_and_concurrent_change(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with control_plane(f"sqlite:///{tmp_path}/cp.db") as api:
        assert cli(capsys, api, "apply", "-f", str(EXAMPLE))[0] == 0
        create_by_hand(capsys, api)

        # apply reads the state, someone changes org-monthly, apply writes:
        # the change is reported, not overwritten.
        data = yaml.safe_load(EXAMPLE.read_text())
        data["policies"][0]["amount"] = "7000"
        edited = tmp_path / "b.yaml"
        edited.write_text(yaml.safe_dump(data))
        read = apply_cli.current_state

        def stale(client: Any) -> Any:
            found = read(client)
            code, _, err = cli(capsys, api, "policy", "update", "org-monthly", "--amount", "5500")
            assert code == 0, err
            return found

        monkeypatch.setattr(apply_cli, "current_state", stale)
        code, _, err = cli(capsys, api, "apply", "-f", str(edited))
        assert code == 1
        assert "policy 'org-monthly' was changed by someone else after apply read it" in err
        assert f"{edited}: policies[0]" in err
        monkeypatch.setattr(apply_cli, "current_state", read)

        # The concurrent amount survived (it is what apply now changes), and
        # --prune-all also deletes what was made by hand.
        code, out, err = cli(capsys, api, "apply", "-f", str(edited), "--prune-all")
        assert code == 0, err
        assert "- deleted policy by-hand" in out
        assert "~ updated policy org-monthly: amount 5500.00 -> 7000.00" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("policies:\n  - name: a\n    amount: 5\n", "policies[0]: 'action' is a required property"),
        (
            "policies:\n  - {name: a, amount: 5, action: alert}\n"
            "  - {name: a, amount: 6, action: alert}\n",
            "policies[1]: the name 'a' is also declared at",
        ),
        ("policies:\n  - {name: a, amount: 1e30, action: alert}\n", "policies[0].amount"),
        ("policies:\n  - {name: a, amount: -1, action: alert}\n", "policies[0].amount"),
        (
            "policies:\n  - {name: a, amount: 2000000000, action: alert}\n",
            "policies[0].amount: must be at most",
        ),
        ("policies:\n  - {name: a, amount: 1, action: alert, window: 0d}\n", "policies[0].window"),
        (
            "policies:\n  - {name: a, amount: 1, action: alert, timezone: Mars/Olympus}\n",
            "policies[0].timezone: unknown IANA timezone 'Mars/Olympus'",
        ),
        (
            "policies:\n  - {name: a, amount: 1, action: alert, scope: global, target: x}\n",
            "policies[0].target",
        ),
        (
            "price_overrides:\n  - {model: m, input: '1', output: '1', cached_input: '1e5'}\n",
            "price_overrides[0].cached_input",
        ),
        (
            "webhooks:\n  - {name: w, format: pagerduty, routing_key: R012}\n",
            "webhooks[0].routing_key",
        ),
        (
            "webhooks:\n  - {name: w, format: pagerduty, routing_key: '${env:SG_TEST_UNSET}'}\n",
            "webhooks[0].routing_key: the environment variable SG_TEST_UNSET is not set",
        ),
        ("policies: []\npolicies: []\n", "key 'policies' is given twice"),
        ("", "the file is empty"),
        ('policies:\n  - {name: "a\\x1b", amount: 1, action: alert}\n', "policies[0].name"),
        (
            "policies:\n  - {name: a, amount: 1, action: alert, enforcement: shadow}\n",
            "policies[0].enforcement: shadow applies to reject policies only",
        ),
        (
            "policies:\n  - {name: a, amount: 1, action: alert, forecast_alert: soon}\n",
            "policies[0].forecast_alert",
        ),
        (
            "policies:\n  - {name: a, amount: 1, action: alert, forecast_alert: 400000d}\n",
            "forecast_alert.within",
        ),
    ],
)
def test_bad_files_name_the_file_and_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    # No control plane is needed to refuse a file: the error comes first.
    code = main(["apply", "-f", str(bad), "--server", "127.0.0.1:1", "--token", "t"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"spendgate: {bad}: ") and message in err, err


def test_commands_take_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, env: dict[str, str]
) -> None:
    with control_plane(f"sqlite:///{tmp_path}/cp.db") as api:
        assert cli(capsys, api, "apply", "-f", str(EXAMPLE))[0] == 0
        capsys.readouterr()
        argv = ["--server", api.server.settings.listen, "--token", ADMIN_TOKEN]
        # A key changed by hand: the control plane marks apply's fingerprint stale.
        new_key = ["--routing-key", "Rchangedbyhand"]
        assert main(["webhook", "update", "oncall", "--description", "pager", *new_key, *argv]) == 0
        assert main(["webhook", "get", "oncall", "--json", *argv]) == 0
        assert '"description": "pager"' in capsys.readouterr().out
        assert main(["spend", "--policy", "org-monthly", *argv]) == 0
        adjust = ["spend", "adjust", "org-monthly", "--amount", "1.5", "--reason", "invoice"]
        assert main([*adjust, *argv]) == 0
        assert main(["spend", "adjustments", "--policy", "org-monthly", "--json", *argv]) == 0
        assert '"reason": "invoice"' in capsys.readouterr().out
        assert main(["price", "delete", "llama-3.1-70b", "--route", "self-hosted", *argv]) == 0
        assert main(["webhook", "delete", "finops-slack", *argv]) == 0
        assert main(["webhook", "get", "finops-slack", *argv]) == 1
        assert "no webhook has the id or name 'finops-slack'" in capsys.readouterr().err
        # What was changed by hand, apply puts back; what was deleted, it
        # creates again.
        code, out, _ = cli(capsys, api, "apply", "-f", str(EXAMPLE), "--dry-run")
        assert code == 2
        assert [line for line in out if not line.startswith("= unchanged ")] == [
            "+ would create price override llama-3.1-70b * self-hosted",
            "~ would update webhook oncall: description pager -> '', "
            "secrets (url, secret or routing key)",
            "+ would create webhook finops-slack",
            "plan: 2 to create, 1 to update, 12 unchanged, 0 to delete",
        ]


def test_a_read_only_token_plans_but_does_not_write(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, env: dict[str, str]
) -> None:
    with control_plane(f"sqlite:///{tmp_path}/cp.db") as api:
        argv = ["apply", "-f", str(EXAMPLE), "--server", api.server.settings.listen]
        assert main([*argv, "--token", READ_TOKEN, "--dry-run"]) == 2
        assert capsys.readouterr().out.count("+ would create ") == 15
        assert main([*argv, "--token", READ_TOKEN]) == 1
        err = capsys.readouterr().err
        assert err.startswith("spendgate: not allowed: ") and err.count("\n") == 1, err
        assert main([*argv, "--token", ADMIN_TOKEN, "--dry-run"]) == 2


def test_a_folder_and_file_references(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "budgets"
    (folder / "hooks").mkdir(parents=True)
    (folder / "policies.yaml").write_text(
        "policies:\n  - {name: team, amount: '12.5', action: alert, thresholds: [80]}\n"
    )
    secret = folder / "hooks" / "signing.secret"
    secret.write_text("whsec_" + base64.b64encode(b"k" * 32).decode() + "\n")
    (folder / "hooks" / "generic.json").write_text(
        '{"webhooks": [{"name": "ops", "format": "generic", '
        '"url": "https://93.184.216.34/hook", "secret": "${file:signing.secret}"}]}'
    )
    with control_plane(f"sqlite:///{tmp_path}/cp.db") as api:
        code, out, err = cli(capsys, api, "apply", "-f", str(folder))
        assert code == 0, err
        assert out == [
            "+ created webhook ops",
            "+ created policy team",
            "applied: 2 created, 0 updated, 0 unchanged, 0 deleted",
        ]
        argv = ["--server", api.server.settings.listen, "--token", ADMIN_TOKEN, "--json"]
        assert main(["webhook", "get", "ops", *argv]) == 0
        assert '"has_secret": true' in capsys.readouterr().out
        secret.write_text("whsec_" + base64.b64encode(b"n" * 32).decode())
        code, out, _ = cli(capsys, api, "apply", "-f", str(folder), "--dry-run")
        assert code == 2
        assert "~ would update webhook ops: secrets (url, secret or routing key)" in out
        secret.unlink()
        code, _, err = cli(capsys, api, "apply", "-f", str(folder), "--dry-run")
        assert code == 1
        assert err.startswith(
            f"spendgate: {folder / 'hooks' / 'generic.json'}: webhooks[0].secret: "
        )
        assert "cannot read" in err
