"""Nothing spendgate prints carries a raw control character from a stored or
client-supplied value (issue 13, item 3), against a real stack on SQLite and
PostgreSQL: the CLI (`status`, `spend`, `policy list`, errors) and the
Prometheus labels escape them visibly (``\\x1b``).

Before: a client's model name with terminal escape sequences (a MODEL ``*``
member) was printed raw by `spendgate status`, and policy names with
ESC/BEL/CR/NUL raw by `policy list` and in metric labels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import openai
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from control_plane.store.models import PolicyRow
from spendgate.cli.main import main
from spendgate.v1 import budget_pb2 as pb
from spendgate.visible import visible
from tests.conftest import Stack, start_stack, stop_stack
from tests.harness import ADMIN_TOKEN, READ_TOKEN, wait_until

pytestmark = pytest.mark.e2e
# A model name that clears the screen, sets the window title and rings the bell.
EVIL_MODEL = "gpt-4o\x1b[2J\x1b]0;owned\x07"
# A policy name as stored before names were checked (control characters then
# passed; PostgreSQL refuses NUL in text itself, SQLite kept it).
EVIL_NAME = "team\x1b[31m red\x00\r\x07"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f]")  # anything a terminal obeys, but newline/tab


@pytest.fixture
def stack(db_url: str) -> Iterator[Stack]:
    s = start_stack(db_url, control_plane={"metrics_listen": "127.0.0.1:0"})
    yield s
    stop_stack(s)


def _policy(stack: Stack, **fields: object) -> pb.BudgetPolicy:
    p = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                amount_usd="10",
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                action=pb.ACTION_ALERT,
                **fields,  # type: ignore[arg-type]
            )
        ),
        metadata=stack.admin,
    )
    wait_until(lambda: p.id in stack.ext.state.index.policies, message="policy reaches ext_proc")
    return p


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _view(out: str, start: str) -> str:
    """The command's output; log lines of the in-process services share stdout."""
    return out[out.index(start) :]


def test_cli_and_metric_labels_escape_control_characters(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    models = _policy(stack, name="each model", scope=pb.SCOPE_MODEL, target="*")
    named = _policy(stack, name="placeholder", scope=pb.SCOPE_GLOBAL)
    engine = stack.cp.cp.engine
    evil_name = EVIL_NAME if engine.dialect.name == "sqlite" else EVIL_NAME.replace("\x00", "")
    with Session(engine) as s, s.begin():
        s.execute(update(PolicyRow).where(PolicyRow.id == named.id).values(name=evil_name))

    client = openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": "carol"},
        max_retries=0,
    )
    client.chat.completions.create(model=EVIL_MODEL, messages=[{"role": "user", "content": "hi"}])
    member = EVIL_MODEL.lower()

    def charged() -> bool:
        resp = stack.budgets.ListSpend(
            pb.ListSpendRequest(policy_id=models.id), metadata=stack.admin
        )
        return any(e.member == member for e in resp.entries)

    wait_until(charged, message="the model member reaches the control plane")
    server = f"127.0.0.1:{stack.cp.port}"
    shown_member = "gpt-4o\\x1b[2j\\x1b]0;owned\\x07"
    shown_name = visible(evil_name)
    assert shown_name.startswith("team\\x1b[31m red\\x")

    code, out, _ = _cli(capsys, "status", "--server", server, "--token", READ_TOKEN)
    view = _view(out, "spendgate status")
    assert code == 0 and not RAW.search(view), view
    assert shown_member in view and shown_name in view

    code, out, _ = _cli(capsys, "spend", "--server", server, "--token", READ_TOKEN)
    view = _view(out, "POLICY")
    assert code == 0 and not RAW.search(view)
    assert shown_member in view and shown_name in view

    code, out, _ = _cli(capsys, "policy", "list", "--server", server, "--token", READ_TOKEN)
    view = _view(out, "ID")
    assert code == 0 and not RAW.search(view)
    assert shown_name in view

    # --json stays exact JSON (escaped the JSON way), for scripts.
    code, out, _ = _cli(capsys, "spend", "--json", "--server", server, "--token", READ_TOKEN)
    assert code == 0 and "gpt-4o\\u001b[2j\\u001b]0;owned\\u0007" in out

    # An error quoting a value escapes it too.
    code, _, err = _cli(
        capsys, "policy", "update", "bp_1", "--window", "\x1b[2Jd", "--server", server
    )
    assert code == 1 and not RAW.search(err)
    assert err.startswith("spendgate: --window '\\x1b[2Jd': use a count and a unit")
    code, _, err = _cli(
        capsys, "policy", "get", "bp_\x1b[2J", "--server", server, "--token", ADMIN_TOKEN
    )
    assert code == 1 and not RAW.search(err)
    assert err == (
        "spendgate: invalid request: id: must not contain control characters (found \\x1b)\n"
    )

    # Prometheus: the policy name label is escaped; the exposition stays parseable.
    text = httpx.get(f"http://127.0.0.1:{stack.cp.metrics_port}/metrics").text
    assert not RAW.search(text)
    [info] = [line for line in text.splitlines() if named.id in line and "policy_info" in line]
    assert 'name="' + shown_name.replace("\\", "\\\\") + '"' in info


def test_a_window_count_beyond_the_bound_is_a_clean_cli_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _cli(
        capsys,
        "policy",
        "create",
        "--name",
        "n",
        "--amount",
        "1",
        "--action",
        "alert",
        "--window",
        "99999999999mo",
        "--server",
        "127.0.0.1:1",
        "--token",
        ADMIN_TOKEN,
    )
    assert (code, out) == (1, "")
    assert err == (
        "spendgate: --window '99999999999mo': the count must be 1 to 10000, "
        "e.g. 3mo for a quarter\n"
    )
