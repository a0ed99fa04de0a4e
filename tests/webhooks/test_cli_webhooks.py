"""`spendgate webhook ...` against a real control plane (the CLI runs
as a subprocess; its output is what a person reads)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from standardwebhooks import Webhook as StandardWebhook

from tests.harness import ADMIN_TOKEN, READ_TOKEN, FakeClock, env_without_spendgate, wait_until
from tests.webhooks.conftest import USD, Api, running_api
from tests.webhooks.receiver import Receiver, Reply

CLI = [sys.executable, "-m", "spendgate.cli.main", "webhook"]


class Cli:
    """Runs the installed CLI as a subprocess, as an operator would."""

    def __init__(self, api: Api) -> None:
        self.server = f"127.0.0.1:{api.server.port}"

    def __call__(self, *args: str, token: str = ADMIN_TOKEN) -> tuple[int, str, str]:
        done = subprocess.run(
            [*CLI, *args, "--server", self.server, "--token", token],
            capture_output=True,
            text=True,
            env=env_without_spendgate(),
            timeout=30,
        )
        return done.returncode, done.stdout, done.stderr

    def json(self, *args: str) -> object:
        code, out, err = self(*args, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock) -> Iterator[Api]:
    """The CLI does not care which database is behind the server: SQLite only."""
    with running_api(f"sqlite:///{tmp_path}/spendgate.db", clock) as a:
        yield a


@pytest.fixture
def cli(api: Api) -> Cli:
    return Cli(api)


def test_one_command_for_pagerduty_and_for_slack(cli: Cli) -> None:
    code, out, err = cli("create", "--name", "oncall", "--routing-key", "R0123456789abcdef")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "FORMAT", "URL", "EVENTS", "SIGNED", "ENABLED"]
    assert lines[1].split()[1:] == [
        "oncall",
        "pagerduty",
        "https://events.pagerduty.com/v2/enqueue",
        "exceeded,threshold_crossed",
        "-",
        "yes",
    ]
    slack = cli.json(
        "create", "--name", "chat", "--url", "https://hooks.slack.com/services/T1/B1/tok3n"
    )
    assert isinstance(slack, dict)
    assert (slack["format"], slack["url"]) == (
        "WEBHOOK_FORMAT_SLACK",
        "https://hooks.slack.com/services/T1/B1/****",
    )
    assert "R0123456789abcdef" not in json.dumps(cli.json("list"))
    listed = cli.json("list")
    assert isinstance(listed, list)
    assert [w["name"] for w in listed] == ["oncall", "chat"]


def test_generic_with_generated_secret_test_update_and_delete(cli: Cli, receiver: Receiver) -> None:
    code, out, _ = cli(
        "create",
        "--name",
        "ops",
        "--url",
        receiver.url,
        "--events",
        "exceeded",
        "--generate-secret",
    )
    assert code == 0
    secret = re.search(r"whsec_\S+", out)
    assert secret is not None and "shown once" in out
    webhook_id = out.splitlines()[1].split()[0]
    code, out, _ = cli("test", webhook_id)
    assert code == 0 and re.fullmatch(r"delivered: HTTP 200 in \d+ ms\n", out)
    (got,) = receiver.received()
    assert StandardWebhook(secret.group(0)).verify(got.body, got.headers)["action"] == "test"

    receiver.reply(Reply(500, b"nope"))
    code, out, err = cli("test", webhook_id)
    assert (code, out, err) == (
        1,
        "",
        "spendgate: test delivery failed (HTTP 500): HTTP 500: nope\n",
    )

    code, out, _ = cli("update", webhook_id, "--disable", "--name", "ops-2")
    assert code == 0 and out.splitlines()[1].split()[1] == "ops-2"
    assert out.splitlines()[1].split()[-1] == "no"
    code, _, err = cli("update", webhook_id)
    assert (code, err) == (
        1,
        "spendgate: nothing to update: give at least one field, e.g. --url or --disable\n",
    )
    code, out, _ = cli("get", webhook_id, token=READ_TOKEN)
    assert code == 0 and "ops-2" in out
    code, _, err = cli("delete", webhook_id, token=READ_TOKEN)
    assert code == 1 and err.startswith("spendgate: not allowed:")
    assert cli("delete", webhook_id)[:2] == (0, f"deleted {webhook_id}\n")
    code, _, err = cli("get", webhook_id)
    assert (code, err) == (1, f"spendgate: not found: webhook '{webhook_id}' not found\n")


def test_errors_name_the_field(cli: Cli) -> None:
    code, out, err = cli("create", "--name", "x", "--url", "ftp://example.com/hook")
    assert (code, out) == (1, "")
    assert err == "spendgate: invalid request: url: must be an https:// URL\n"
    code, _, err = cli("create", "--name", "x", "--url", "https://x.test", "--events", "deleted")
    assert err == (
        "spendgate: --events 'deleted': use exceeded, threshold_crossed, anomaly, forecast\n"
    )


def test_deliveries_table_and_json(api: Api, cli: Cli, receiver: Receiver) -> None:
    _, out, _ = cli("create", "--name", "ops", "--url", receiver.url)
    webhook_id = out.splitlines()[1].split()[0]
    policy = api.policy("10", name="search", alert_thresholds=[50])
    api.report(policy.id, 11 * USD)
    wait_until(lambda: len(api.deliveries(state=2)) == 2, message="delivered")
    _, out, _ = cli("deliveries", "--webhook", webhook_id)
    header, *rows = out.splitlines()
    assert header.split() == [
        "ID",
        "WEBHOOK",
        "EVENT",
        "POLICY",
        "STATE",
        "TRIES",
        "STATUS",
        "WHEN",
        "ERROR",
    ]
    assert [r.split()[1:4] for r in rows] == [
        [webhook_id, "exceeded", "search"],
        [webhook_id, "threshold_crossed", "50%"],
    ]
    assert all(" delivered " in r and r.rstrip().endswith("-") for r in rows)
    data = cli.json("deliveries", "--state", "delivered", "--limit", "1")
    assert isinstance(data, list) and len(data) == 1
    assert data[0]["event"]["type"] == "budget_policy.exceeded"
    assert data[0]["attempts"][0]["status_code"] == 200
    assert cli.json("deliveries", "--state", "failed") == []
