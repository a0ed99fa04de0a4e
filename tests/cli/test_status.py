"""`spendgate status` against a real stack (control plane, ext_proc, Envoy,
fake provider): traffic crosses a REJECT policy's thresholds and a wildcard
ALERT policy's, then the view must show exactly what the admin API says."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

import grpc
import httpx
import pytest

from spendgate.cli.main import main
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.v1 import webhooks_pb2_grpc
from tests.conftest import Stack, start_stack, stop_stack
from tests.harness import (
    ADMIN_TOKEN,
    READ_TOKEN,
    bearer,
    env_without_spendgate,
    free_port,
    grpc_channel,
    wait_until,
)

pytestmark = pytest.mark.e2e
SPENDGATE = [sys.executable, "-m", "spendgate.cli.main"]
# With these fake-provider knobs a gpt-4o-mini answer costs exactly $0.00045.
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}
HEADER = "spendgate status  ·  control plane"


@dataclass
class Crossed:
    stack: Stack
    server: str
    team: pb.BudgetPolicy  # GLOBAL, REJECT, $0.001/day in Europe/Berlin, 50/80 %
    users: pb.BudgetPolicy  # USER *, ALERT, $0.0005/hour, 50 %
    rejected: httpx.Response

    def spend(self) -> dict[tuple[str, str], pb.SpendEntry]:
        resp = self.stack.budgets.ListSpend(
            pb.ListSpendRequest(page_size=1000), metadata=self.stack.admin, timeout=10
        )
        return {(e.policy_id, e.member): e for e in resp.entries}

    def events(self) -> list[wpb.BudgetEvent]:
        stub = webhooks_pb2_grpc.WebhookServiceStub(grpc_channel(self.stack.cp.port))
        return list(
            stub.ListEvents(
                wpb.ListEventsRequest(page_size=100), metadata=self.stack.admin, timeout=10
            ).events
        )


def _policy(stack: Stack, **fields: object) -> pb.BudgetPolicy:
    return stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(policy=pb.BudgetPolicy(**fields)),  # type: ignore[arg-type]
        metadata=stack.admin,
        timeout=10,
    )


@pytest.fixture(scope="module")
def crossed() -> Iterator[Crossed]:
    stack = start_stack()
    try:
        team = _policy(
            stack,
            name="team cap",
            amount_usd="0.001",
            window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
            timezone="Europe/Berlin",
            action=pb.ACTION_REJECT,
            scope=pb.SCOPE_GLOBAL,
            alert_thresholds=[50, 80],
        )
        users = _policy(
            stack,
            name="per user",
            amount_usd="0.0005",
            window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_HOURS, count=1),
            action=pb.ACTION_ALERT,
            scope=pb.SCOPE_USER,
            target="*",
            alert_thresholds=[50],
        )
        wait_until(
            lambda: {team.id, users.id} <= set(stack.ext.state.index.policies),
            message="policies reach ext_proc",
        )

        def send(user: str) -> httpx.Response:
            return httpx.post(
                stack.envoy.base_url + "/v1/chat/completions",
                headers={**BIG, "x-spendgate-user": user, "authorization": "Bearer sk-test"},
                json={
                    "model": "gpt-4o-mini",
                    "max_tokens": 1,  # a small reservation: the third request fits
                    "messages": [{"role": "user", "content": "hi"}],
                },
                timeout=30,
            )

        # $0.00045 each: team at 45 %, 90 %, 135 % (exceeded); alice 180 %, bob 90 %.
        for user in ("alice", "alice", "bob"):
            assert send(user).status_code == 200
        c = Crossed(stack, f"127.0.0.1:{stack.cp.port}", team, users, httpx.Response(0))

        def settled() -> bool:
            spend = c.spend()
            members = [e for (pid, _), e in spend.items() if pid == users.id]
            return (
                spend[(team.id, "")].request_count == 3
                and sum(e.request_count for e in members) == 3
                and len(c.events()) == 6  # team 50, 80, exceeded; alice 50, exceeded; bob 50
            )

        wait_until(settled, message="the control plane has every request and event")
        # ext_proc charged all three before it reported them: the next is refused.
        c.rejected = send("carol")
        assert c.rejected.status_code == 429
        yield c
    finally:
        stop_stack(stack)


def _percent(e: pb.SpendEntry) -> int:
    return int((Decimal(e.spent_usd) * 100 / Decimal(e.limit_usd)).to_integral_value(ROUND_FLOOR))


def _bar(percent: int) -> str:
    filled = min(10, percent // 10)
    return "[" + "█" * filled + "░" * (10 - filled) + "]"


def _spend_text(e: pb.SpendEntry, state: str) -> str:
    p = _percent(e)
    return (
        f"{state.ljust(8)}  {_bar(p)} {p:>3}%  "
        f"spent ${e.spent_usd} of ${e.limit_usd}, remaining ${e.remaining_usd}"
    )


def _assert_view(text: str, c: Crossed) -> None:
    spend = c.spend()
    team = spend[(c.team.id, "")]
    alice, bob = spend[(c.users.id, "alice")], spend[(c.users.id, "bob")]
    # The numbers are the API's; 0.00135 of 0.001 is 135 %, a full bar.
    assert (team.spent_usd, team.remaining_usd, team.exceeded) == ("0.00135", "0.00", True)
    assert _percent(team) == 135 and _percent(alice) == 180 and _percent(bob) == 90
    lines = text.splitlines()
    assert lines[0].startswith(HEADER) and c.server in lines[0]
    assert lines[1] == "2 policies: 2 EXCEEDED"
    team_at = lines.index(next(line for line in lines if line.startswith("team cap  ")))
    assert lines[team_at] == f"team cap  {c.team.id}"
    assert lines[team_at + 1] == ("  scope global · action reject · window 1 day, Europe/Berlin")
    # The window's bounds in its own time zone: local midnight to midnight.
    assert re.fullmatch(
        r"  current window \d{4}-\d\d-\d\d 00:00 → \d{4}-\d\d-\d\d 00:00, "
        r"resets in (\d+h\d\dm|\d+m\d\ds|\d+s)",
        lines[team_at + 2],
    ), lines[team_at + 2]
    assert lines[team_at + 3] == "  " + _spend_text(team, "EXCEEDED")
    users_at = lines.index(f"per user  {c.users.id}")
    assert lines[users_at + 1] == "  scope user=* · action alert · window 1 hour, UTC"
    assert lines[users_at + 3] == "  2 members, 1 EXCEEDED, 1 ALERTING; top 2 by spend:"
    assert lines[users_at + 4] == "    alice  " + _spend_text(alice, "EXCEEDED")
    assert lines[users_at + 5] == "    bob    " + _spend_text(bob, "ALERTING")
    # Recent events, newest first: what ListEvents returns.
    events_at = lines.index("Recent events (UTC, newest first)")
    shown = lines[events_at + 1 :]
    assert len(shown) == 6
    expected = []
    for e in c.events():
        kind = (
            "exceeded"
            if e.type == "budget_policy.exceeded"
            else (f"threshold {e.threshold_percent}% crossed")
        )
        member = f" member {e.member}" if e.member else ""
        expected.append((kind, f"{e.policy_name} {e.policy_id}{member}", e.spent_usd))
    for line, (kind, who, spent) in zip(shown, expected, strict=True):
        assert f"  {kind} " in line and f" {who}  (spent ${spent} of $" in line, line
    assert any(
        "  exceeded " in line and f"team cap {c.team.id}  (spent $" in line for line in shown
    )


def test_status_shows_the_apis_numbers(
    crossed: Crossed, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--server", crossed.server, "--token", ADMIN_TOKEN]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: no colour
    _assert_view(out, crossed)
    # The 429 the client got names the policy the view shows as EXCEEDED.
    assert crossed.rejected.headers["x-spendgate-policy"] == crossed.team.id


def test_status_json(crossed: Crossed, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--server", crossed.server, "--token", ADMIN_TOKEN, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    spend = crossed.spend()
    by_id = {p["id"]: p for p in data["policies"]}
    team = by_id[crossed.team.id]
    assert (team["state"], team["window"], team["action"]) == (
        "EXCEEDED",
        "1 day, Europe/Berlin",
        "reject",
    )
    api = spend[(crossed.team.id, "")]
    [shown] = team["spend"]
    assert (shown["spent_usd"], shown["limit_usd"], shown["remaining_usd"], shown["percent"]) == (
        api.spent_usd,
        api.limit_usd,
        api.remaining_usd,
        135,
    )
    users = by_id[crossed.users.id]
    assert users["member_count"] == 2 and users["wildcard"] is True
    assert [(m["member"], m["state"], m["spent_usd"]) for m in users["spend"]] == [
        ("alice", "EXCEEDED", spend[(crossed.users.id, "alice")].spent_usd),
        ("bob", "ALERTING", spend[(crossed.users.id, "bob")].spent_usd),
    ]
    assert [e["id"] for e in data["events"]] == [e.id for e in crossed.events()]


def test_status_top_one_counts_every_member_on_the_server(
    crossed: Crossed, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["status", "--server", crossed.server, "--token", ADMIN_TOKEN, "--top", "1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    users_at = lines.index(f"per user  {crossed.users.id}")
    alice = crossed.spend()[(crossed.users.id, "alice")]
    # Only alice was fetched (top_members=1); the counts are the control plane's.
    assert lines[users_at + 3 : users_at + 6] == [
        "  2 members, 1 EXCEEDED, 1 ALERTING; top 1 by spend:",
        "    alice  " + _spend_text(alice, "EXCEEDED"),
        "",
    ]


def test_list_spend_top_members(crossed: Crossed) -> None:
    def call(**fields: object) -> pb.ListSpendResponse:
        return crossed.stack.budgets.ListSpend(  # type: ignore[no-any-return]
            pb.ListSpendRequest(**fields),  # type: ignore[arg-type]
            metadata=crossed.stack.admin,
            timeout=10,
        )

    resp = call(policy_id=crossed.users.id, top_members=1)
    assert [(e.member, e.spent_usd) for e in resp.entries] == [("alice", "0.0009")]
    assert [(c.policy_id, c.members, c.exceeded, c.alerting) for c in resp.member_counts] == [
        (crossed.users.id, 2, 1, 1)
    ]
    assert resp.next_page_token == ""
    first = call(top_members=1, page_size=1)
    second = call(top_members=1, page_size=1, page_token=first.next_page_token)
    assert {e.policy_id for e in [*first.entries, *second.entries]} == {
        crossed.team.id,
        crossed.users.id,
    }
    assert second.next_page_token == ""
    for fields, message in (
        ({"top_members": -1}, "top_members: must be between 0 and 1000"),
        ({"top_members": 1001}, "top_members: must be between 0 and 1000"),
        ({"top_members": 1, "member": "alice"}, "top_members: cannot be combined with member"),
        ({"top_members": 1, "page_token": "forged"}, "page_token: is not a token"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(**fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert message in (err.value.details() or ""), err.value.details()


def test_status_as_a_subprocess_with_the_read_token(crossed: Crossed) -> None:
    result = subprocess.run(
        [*SPENDGATE, "status", "--server", crossed.server, "--token", READ_TOKEN],
        capture_output=True,
        text=True,
        env=env_without_spendgate(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    _assert_view(result.stdout, crossed)


def test_list_events_filters_and_pages(crossed: Crossed) -> None:
    stub = webhooks_pb2_grpc.WebhookServiceStub(grpc_channel(crossed.stack.cp.port))
    everything = crossed.events()
    pages: list[wpb.BudgetEvent] = []
    token = ""
    while True:
        resp = stub.ListEvents(
            wpb.ListEventsRequest(page_size=4, page_token=token),
            metadata=crossed.stack.admin,
            timeout=10,
        )
        pages += resp.events
        token = resp.next_page_token
        if not token:
            break
    assert [e.id for e in pages] == [e.id for e in everything]
    assert [e.id for e in everything] == sorted((e.id for e in everything), reverse=True)
    exceeded = stub.ListEvents(
        wpb.ListEventsRequest(policy_id=crossed.team.id, type="budget_policy.exceeded"),
        metadata=crossed.stack.admin,
        timeout=10,
    ).events
    assert [(e.policy_id, e.type, e.amount_usd) for e in exceeded] == [
        (crossed.team.id, "budget_policy.exceeded", "0.001")
    ]
    # Read-only, so the read token may list them; a wrong filter names its field.
    as_reader = stub.ListEvents(
        wpb.ListEventsRequest(page_size=1000), metadata=bearer(READ_TOKEN), timeout=10
    )
    assert [e.id for e in as_reader.events] == [e.id for e in everything]
    with pytest.raises(grpc.RpcError) as bad:
        stub.ListEvents(
            wpb.ListEventsRequest(type="budget_policy.window_reset"),
            metadata=crossed.stack.admin,
            timeout=10,
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "type" in (bad.value.details() or "")


class Frames:
    """Reads a `status --watch` subprocess's stdout on a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.text += line

    def count(self) -> int:
        with self._lock:
            return self.text.count(HEADER)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(30)
        self._thread.join(10)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code, stderr


def _watch(server: str) -> Frames:
    return Frames(
        subprocess.Popen(
            [
                *SPENDGATE,
                "status",
                "--watch",
                "--interval",
                "0.2",
                "--server",
                server,
                "--token",
                ADMIN_TOKEN,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_without_spendgate(),
        )
    )


def test_watch_redraws_until_ctrl_c(crossed: Crossed) -> None:
    frames = _watch(crossed.server)
    wait_until(lambda: frames.count() >= 2, timeout=60, message="two frames")
    code, stderr = frames.stop()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    first = frames.text.split("\n\n" + HEADER)[0]
    _assert_view(first.rstrip("\n"), crossed)


def test_watch_keeps_trying_while_the_control_plane_is_down() -> None:
    server = f"127.0.0.1:{free_port()}"  # nothing listens
    frames = _watch(server)
    wait_until(lambda: frames.count() >= 2, timeout=60, message="two frames")
    code, stderr = frames.stop()
    assert code == 0, stderr
    assert f"! cannot reach the control plane at {server}" in frames.text
    assert frames.text.count("  retrying") >= 2
