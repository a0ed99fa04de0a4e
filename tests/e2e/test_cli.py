"""`spendgate up --demo` and the CLI, as a newcomer runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from control_plane.keyring import load as load_keyring
from tests.harness import env_without_spendgate, free_port, start_spendgate_up, wait_until

pytestmark = pytest.mark.e2e
SPENDGATE = [sys.executable, "-m", "spendgate.cli.main"]


@dataclass
class Up:
    proc: subprocess.Popen[str]
    cwd: Path
    port: int
    server: str
    output: list[str]

    def cli(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = ["--server", self.server] + (["--token", token] if token else [])
        return subprocess.run(
            [*SPENDGATE, *args, *extra],
            cwd=self.cwd,
            capture_output=True,
            text=True,
            env=env_without_spendgate(),
            timeout=30,
        )


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    cwd = tmp_path_factory.mktemp("up")
    ports = {
        name: free_port()
        for name in (
            "port",
            "envoy-admin-port",
            "control-plane-port",
            "ext-proc-port",
            "demo-port",
            "control-plane-metrics-port",
            "ext-proc-metrics-port",
        )
    }
    args = [f"--{k}={v}" for k, v in ports.items()]
    proc, output = start_spendgate_up(["--demo", *args], cwd)
    u = Up(proc, cwd, ports["port"], f"127.0.0.1:{ports['control-plane-port']}", output)
    yield u
    if proc.poll() is None:
        proc.kill()


def test_up_says_where_everything_listens(up: Up) -> None:
    text = "".join(up.output)
    for needle in (f"http://127.0.0.1:{up.port}", "/demo/v1", up.server, "credentials.json"):
        assert needle in text
    creds = up.cwd / ".spendgate" / "credentials.json"
    assert oct(creds.stat().st_mode & 0o777) == "0o600"
    # `make run` logs for people: console lines, not JSON.
    [listening] = [line for line in up.output if "control plane listening" in line]
    assert listening.startswith("control-plane | ") and "[info     ]" in listening
    assert "{" not in listening


def test_up_serves_both_services_metrics(up: Up) -> None:
    [line] = [line for line in up.output if "metrics (Prometheus)" in line]
    urls = re.findall(r"http://127\.0\.0\.1:\d+/metrics", line)
    assert len(urls) == 2
    for url, name in zip(
        urls, ("spendgate_database_up", "spendgate_ext_proc_policies"), strict=True
    ):
        with urllib.request.urlopen(url, timeout=10) as r:
            assert f"\n{name} ".encode() in r.read()


def test_up_stores_webhook_secrets_encrypted_with_its_key_file(up: Up) -> None:
    state = up.cwd / ".spendgate"
    key_file, db = state / "secrets.key", state / "spendgate.db"
    for f in (key_file, db, db.with_name("spendgate.db-wal"), db.with_name("spendgate.db-shm")):
        assert oct(f.stat().st_mode & 0o777) == "0o600", f
    created = up.cli(
        "webhook",
        "create",
        "--name",
        "ops",
        "--url",
        "https://93.184.216.34/hook?token=qu3ryT0ken",
        "--generate-secret",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    secret = json.loads(created.stdout)["secret"]
    with sqlite3.connect(db) as conn:
        ((url, stored),) = conn.execute("SELECT url, secret FROM webhooks").fetchall()
    ring = load_keyring(str(key_file), "")
    assert ring is not None
    for value in (url, stored):
        assert value.startswith(f"enc:v1:{ring.current_id}:")
        assert "qu3ryT0ken" not in value and secret.removeprefix("whsec_") not in value
    status = up.cli("secrets", "status")
    assert status.returncode == 0, status.stderr
    assert f"current key: {ring.current_id}" in status.stdout
    rotated = up.cli("secrets", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert f"re-encrypted 0 stored value(s) under key {ring.current_id}; 2 already were" in (
        rotated.stdout
    )


def test_quickstart_policy_then_requests_then_429(up: Up) -> None:
    created = up.cli(
        "policy",
        "create",
        "--name",
        "quickstart",
        "--amount",
        "0.00005",
        "--action",
        "reject",
        "--window",
        "1d",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    policy = json.loads(created.stdout)
    assert policy["name"] == "quickstart" and policy["amount_usd"] == "0.00005"
    listed = up.cli("policy", "list")
    assert "quickstart" in listed.stdout and policy["id"] in listed.stdout
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.port}/demo/v1", api_key="demo")

    def send() -> None:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )

    # Each demo answer costs $0.0000111; the policy's snapshot reaches ext_proc
    # within milliseconds, so after a handful of requests the 429 must come.
    with pytest.raises(openai.RateLimitError) as exc:
        for _ in range(20):
            send()
    assert "quickstart" in exc.value.message

    def exceeded() -> bool:
        spend = up.cli("spend", "--json")
        entry = next(e for e in json.loads(spend.stdout) if e["policy_id"] == policy["id"])
        return bool(entry["exceeded"])

    # ext_proc reports usage every 100 ms: the control plane catches up.
    wait_until(exceeded, message="control plane sees the policy exceeded")
    table = up.cli("spend")
    assert "EXCEEDED (rejecting)" in table.stdout
    updated = up.cli("policy", "update", policy["id"], "--amount", "1000")
    assert updated.returncode == 0 and "$1000.00" in updated.stdout
    wait_until(lambda: _admitted(send), message="raised limit admits")
    deleted = up.cli("policy", "delete", policy["id"])
    assert deleted.stdout.strip() == f"deleted {policy['id']}"


def _admitted(send: object) -> bool:
    try:
        send()  # type: ignore[operator]
        return True
    except openai.RateLimitError:
        return False


@pytest.mark.parametrize(
    ("args", "token", "expected"),
    [
        pytest.param(
            [
                "policy",
                "create",
                "--name",
                "bad",
                "--amount",
                "-5",
                "--action",
                "reject",
                "--window",
                "0d",
                "--timezone",
                "Mars/Olympus",
            ],
            None,
            ["invalid request", "amount_usd", "window.count", "timezone"],
            id="invalid-policy-names-each-field",
        ),
        pytest.param(
            ["policy", "list"], "wrong-token-0123456789", ["rejected the token"], id="wrong-token"
        ),
        pytest.param(["policy", "get", "bp_doesnotexist"], None, ["not found"], id="unknown-id"),
        pytest.param(
            [
                "policy",
                "create",
                "--name",
                "x",
                "--amount",
                "1",
                "--action",
                "reject",
                "--window",
                "fortnight",
            ],
            None,
            ["--window 'fortnight'"],
            id="bad-window-text",
        ),
    ],
)
def test_cli_errors_are_one_line(
    up: Up, args: list[str], token: str | None, expected: list[str]
) -> None:
    result = up.cli(*args, token=token)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for needle in expected:
        assert needle in result.stderr


def test_unreachable_control_plane_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*SPENDGATE, "policy", "list", "--server", f"127.0.0.1:{free_port()}", "--token", "x" * 20],
        capture_output=True,
        text=True,
        env=env_without_spendgate(),
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("spendgate: cannot reach the control plane")
    assert len(result.stderr.strip().splitlines()) == 1


def test_price_override_from_the_cli(up: Up) -> None:
    set_ = up.cli(
        "price", "set", "gpt-4o-mini", "--input", "100", "--output", "200", "--note", "test"
    )
    assert set_.returncode == 0, set_.stderr
    override_id = set_.stdout.split(":")[0]
    assert set_.stdout.strip() == (
        f"{override_id}: gpt-4o-mini now $100 in / $200 out per million tokens; kept from its "
        "current price: cached-input $0.075, cache-write none (priced as input), "
        "cache-write-1h none (priced as input)"
    )
    listed = json.loads(up.cli("price", "list", "--model", "gpt-4o-mini", "--json").stdout)
    mini = next(p for p in listed if p["model"] == "gpt-4o-mini")
    assert (mini["price"]["input"], mini["override_id"]) == ("100", override_id)
    assert override_id in up.cli("price", "overrides").stdout
    bad = up.cli("price", "set", "gpt-4o-mini", "--input", "-1", "--output", "2")
    assert bad.returncode == 1 and "override.price.input" in bad.stderr
    assert up.cli("price", "delete", override_id).stdout.strip() == f"deleted {override_id}"


def test_demo_trusts_identity_headers_from_this_machine(up: Up) -> None:
    def create(*args: str) -> dict[str, str]:
        created = up.cli("policy", "create", "--action", "reject", "--json", *args)
        assert created.returncode == 0, created.stderr
        return dict(json.loads(created.stdout))

    per_user = create(
        "--name", "per-user", "--amount", "0.00001", "--scope", "user", "--target", "*"
    )
    service = create(
        "--name", "svc", "--amount", "5", "--scope", "service", "--target", "spiffe://Demo/checkout"
    )
    assert (service["scope"], service["target"]) == ("SCOPE_SERVICE", "spiffe://demo/checkout")
    url = f"http://127.0.0.1:{up.port}/demo/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    try:
        # `up --demo` trusts x-spendgate-* from 127.0.0.1: the header names the
        # user, and its case does not make a second one.
        assert httpx.post(url, json=body, headers={"x-spendgate-user": "dana"}).status_code == 200
        wait_until(
            lambda: (
                httpx.post(url, json=body, headers={"x-spendgate-user": "Dana"}).status_code == 429
            ),
            message="dana's budget refuses",
        )
        anonymous = httpx.post(url, json=body)
        assert anonymous.status_code == 403
        assert anonymous.headers["x-spendgate-error"] == "identity_required"
    finally:
        for p in (per_user, service):
            up.cli("policy", "delete", p["id"])


def test_ctrl_c_stops_everything_cleanly(up: Up) -> None:
    # Runs last in this module: it stops the stack.
    children = subprocess.run(
        ["pgrep", "-P", str(up.proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 4  # control plane, ext_proc, fake provider, envoy
    up.proc.send_signal(signal.SIGINT)
    rest, _ = up.proc.communicate(timeout=60)
    assert up.proc.returncode == 0, rest
    assert "stopping spendgate" in rest and "ext_proc stopped" in rest
    # Envoy's access log (JSON, on its stdout) names spendgate's 429s.
    access = [
        json.loads(line.split(" | ", 1)[1])
        for line in rest.splitlines()
        if line.startswith("        envoy | {")
    ]
    assert {a["details"] for a in access if a["status"] == 429} == {"spendgate_budget_exceeded"}
    for pid in children:
        wait_until(lambda pid=pid: not _alive(int(pid)), message=f"child {pid} exits")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
