"""docs/alerts.md's walkthrough, run as written against a real `spendgate up
--demo` (what `make run` runs): its shell blocks are taken from the file and
run with bash; only the ports are changed (free ones instead of 10000 and
8787) and `.venv/bin/spendgate` is this checkout's CLI. The receiver prints
the events the file says it prints, refuses a forged delivery, and removes
its webhook on Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    UP_PORT_OPTIONS,
    env_without_spendgate,
    free_port,
    start_spendgate_up,
    wait_until,
)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "alerts.md"
README = ROOT / "README.md"
CLI = f"{sys.executable} -m spendgate.cli.main"
EVENT = re.compile(r"(budget_policy\.\w+)  policy (\S+) .*?(?:(\d+)% threshold)?  \$")


def walkthrough() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the walkthrough section."""
    text = DOC.read_text()
    section = text.split("## Walkthrough", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.DOTALL)


def events(lines: list[str]) -> list[tuple[str, str, str | None]]:
    found = []
    for line in lines:
        m = EVENT.search(line)
        if m:
            found.append((m.group(1), m.group(2), m.group(3)))
    return found


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    blocks = walkthrough()
    shells = [body for lang, body in blocks if lang == "sh"]
    expected_output = [body for lang, body in blocks if lang == "text"]
    assert len(shells) == 3 and len(expected_output) == 2
    # The README's alert section shows the same receiver command.
    readme = README.read_text().split("## Alerts", 1)[1].split("\n## ", 1)[0]
    assert shells[1].strip() in readme and "docs/alerts.md" in readme
    # 1. `make run` is `spendgate up --demo`.
    assert shells[0].strip() == "make run"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: .*\n\t\$\(BIN\)/spendgate up --demo \$\(ARGS\)$", makefile, re.M)
    ports = {name: free_port() for name in (*UP_PORT_OPTIONS, "demo-port")}
    proc, _ = start_spendgate_up(["--demo", *(f"--{k}={v}" for k, v in ports.items())], tmp_path)
    listen_port = free_port()
    env = {
        **env_without_spendgate(),
        "SPENDGATE_SERVER": f"127.0.0.1:{ports['control-plane-port']}",
    }

    def as_here(block: str) -> str:
        block = block.replace(".venv/bin/spendgate", CLI)
        block = block.replace("127.0.0.1:10000", f"127.0.0.1:{ports['port']}")
        return block.replace("webhook listen", f"webhook listen --port {listen_port}")

    listener = None
    try:
        # 2. The receiver, in its own "terminal".
        assert "webhook listen" in shells[1]
        listener = subprocess.Popen(
            ["bash", "-c", f"exec {as_here(shells[1]).strip()}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out: list[str] = []
        err: list[str] = []
        for stream, sink in ((listener.stdout, out), (listener.stderr, err)):
            threading.Thread(
                target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True
            ).start()
        wait_until(lambda: any("listening on" in line for line in out), message=f"listener: {err}")
        first = expected_output[0].strip().replace("8787", str(listen_port))
        shown = out[0].strip()
        assert re.fullmatch(re.escape(first).replace("wh_…", r"wh_\w+"), shown), shown

        # 3. The budget and the traffic.
        done = subprocess.run(
            ["bash", "-c", as_here(shells[2])],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-5:] == ["200"] * 5

        # The receiver prints the events the file shows, in its order.
        wanted = events(expected_output[1].splitlines())
        assert [w[0] for w in wanted] == [
            "budget_policy.threshold_crossed",
            "budget_policy.threshold_crossed",
            "budget_policy.exceeded",
        ]
        wait_until(lambda: events(out) == wanted, timeout=60, message=f"events: {out} {err}")

        # A delivery not signed with its secret is refused.
        forged = httpx.post(
            f"http://127.0.0.1:{listen_port}/spendgate",
            content=json.dumps({"entity": "budget_policy", "action": "exceeded"}),
            headers={
                "webhook-id": "msg_forged",
                "webhook-timestamp": str(int(__import__("time").time())),
                "webhook-signature": "v1,Zm9yZ2VkIHNpZ25hdHVyZSBvZiAzMiBieXRlcyAhIQ==",
            },
        )
        assert forged.status_code == 401
        wait_until(lambda: any("does not match the secret" in line for line in err))
        assert events(out) == wanted  # nothing printed for it

        # Ctrl-C stops it and deletes its webhook.
        listener.send_signal(signal.SIGINT)
        assert listener.wait(30) == 0
        wait_until(lambda: any(line.startswith("deleted webhook wh_") for line in out))
        listed = subprocess.run(
            ["bash", "-c", f"{CLI} webhook list --json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout
    finally:
        if listener is not None and listener.poll() is None:
            listener.kill()
            listener.wait(10)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
