"""Budget headers for clients (issue 15, item 3) through the real Envoy, read
with the official openai and anthropic SDKs (``with_raw_response``), on
SQLite and PostgreSQL.

Every admitted response under a policy with ``expose_to_clients`` carries
the tightest such budget (least remaining USD, spend and holds counted);
a policy without the flag never shows, however tight; a provider's own
``x-spendgate-budget-*`` headers never reach the client.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import anthropic
import openai
import pytest

from spendgate.cli.main import main
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack, start_stack, stop_stack
from tests.e2e.budgets import create_policy
from tests.harness import ADMIN_TOKEN, FakeClock, wait_until

pytestmark = pytest.mark.e2e
# A gpt-4o-mini answer with these fake-provider knobs costs exactly $0.00045.
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}
NOW = datetime(2026, 6, 15, 10, 30, tzinfo=UTC)
RESET = "2026-06-16T00:00:00Z"
NAMES = (
    "x-spendgate-budget-limit",
    "x-spendgate-budget-remaining",
    "x-spendgate-budget-reset",
    "x-spendgate-budget-policy",
)


@pytest.fixture
def stack(db_url: str) -> Iterator[Stack]:
    s = start_stack(db_url, clock=FakeClock(NOW))
    yield s
    stop_stack(s)


def create(stack: Stack, **fields: object) -> pb.BudgetPolicy:
    """An ALERT budget per day unless ``fields`` say otherwise."""
    fields.setdefault("action", pb.ACTION_ALERT)
    return create_policy(stack, **fields)


def oai(stack: Stack, user: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": user, **BIG, **headers},
        max_retries=0,
    )


def claude(stack: Stack, user: str, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=stack.envoy.base_url,
        api_key="sk-ant-test",
        default_headers={"x-spendgate-user": user, **headers},
        max_retries=0,
    )


def budget(headers: object) -> dict[str, str]:
    """The x-spendgate-budget-* headers of a response (httpx.Headers)."""
    return {n: headers[n] for n in NAMES if n in headers}  # type: ignore[index,operator]


def chat_headers(c: openai.OpenAI, **kw: object) -> dict[str, str]:
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello spendgate"}],
        **kw,  # type: ignore[arg-type]
    )
    parsed = raw.parse()
    if kw.get("stream"):
        for _ in parsed:  # type: ignore[attr-defined]
            pass
    return budget(raw.headers)


def test_tightest_exposed_budget_reaches_both_sdks_and_only_spendgates_headers_pass(
    stack: Stack,
) -> None:
    openai_wide = create(
        stack, name="openai", amount_usd="10", scope=pb.SCOPE_PROVIDER, target="openai",
        expose_to_clients=True,
    )  # fmt: skip
    alice = create(
        stack, name="alice", amount_usd="0.01", scope=pb.SCOPE_USER, target="alice",
        expose_to_clients=True,
    )  # fmt: skip
    # Tighter still, but not to be shown.
    create(stack, name="hidden", amount_usd="0.001", scope=pb.SCOPE_USER, target="alice")

    c = oai(stack, "alice")
    first = chat_headers(c)
    assert first == {
        "x-spendgate-budget-limit": "0.01",
        "x-spendgate-budget-remaining": "0.01",  # before this answer's cost
        "x-spendgate-budget-reset": RESET,
        "x-spendgate-budget-policy": alice.id,
    }
    # The next answer shows the first one's cost spent; streaming included
    # (its headers come before the body).
    stats = stack.ext.ctx.stats
    metered = stats.metered_responses
    assert chat_headers(c, stream=True)["x-spendgate-budget-remaining"] == "0.00955"
    # A stream is metered beside it (response_metering: observe): its client
    # can return a moment before the charge lands.
    wait_until(lambda: stats.metered_responses == metered + 1, message="the stream charged")
    assert chat_headers(c)["x-spendgate-budget-remaining"] == "0.0091"

    # Bob has only the provider-wide budget; a provider's own budget header
    # is replaced by spendgate's.
    evil = {"x-fake-response-header": "x-spendgate-budget-limit: 999"}
    bob = chat_headers(oai(stack, "bob", **evil))
    assert bob == {
        "x-spendgate-budget-limit": "10.00",
        "x-spendgate-budget-remaining": "9.99865",  # alice's three answers
        "x-spendgate-budget-reset": RESET,
        "x-spendgate-budget-policy": openai_wide.id,
    }

    # The anthropic SDK reads them too (alice's budget spans providers).
    raw = claude(stack, "alice").messages.with_raw_response.create(
        model="claude-3-5-haiku-20241022",
        max_tokens=64,
        messages=[{"role": "user", "content": "hello"}],
    )
    raw.parse()
    got = budget(raw.headers)
    assert got["x-spendgate-budget-policy"] == alice.id
    assert got["x-spendgate-budget-limit"] == "0.01"
    assert got["x-spendgate-budget-remaining"] == "0.00865"
    # No exposed policy applies to bob on Anthropic: no budget headers at
    # all, and the provider's own are not passed on.
    raw = claude(
        stack, "bob", **{"x-fake-response-header": "x-spendgate-budget-policy: bp_forged"}
    ).messages.with_raw_response.create(
        model="claude-3-5-haiku-20241022",
        max_tokens=64,
        messages=[{"role": "user", "content": "hello"}],
    )
    raw.parse()
    assert budget(raw.headers) == {}


def test_holds_count_and_exposure_is_switched_by_an_update(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    """A REJECT budget's remaining counts what running requests hold (this
    one's estimate too); ``policy update --hide-from-clients`` hides it."""
    carol = create(
        stack, name="carol", amount_usd="1", scope=pb.SCOPE_USER, target="carol",
        action=pb.ACTION_REJECT, expose_to_clients=True,
    )  # fmt: skip
    c = oai(stack, "carol")
    got = chat_headers(c)
    assert got["x-spendgate-budget-policy"] == carol.id
    remaining = Decimal(got["x-spendgate-budget-remaining"])
    assert 0 < remaining < 1  # the request's own hold is counted
    server = f"127.0.0.1:{stack.cp.port}"
    assert main(["policy", "update", carol.id, "--server", server, "--token", ADMIN_TOKEN,
                 "--hide-from-clients"]) == 0  # fmt: skip
    wait_until(
        lambda: not stack.ext.state.index.policies[carol.id].expose_to_clients,
        message="update reaches ext_proc",
    )
    assert chat_headers(c) == {}
    # With no policy exposed ext_proc does not even read response headers:
    # Envoy's route config drops a provider's budget headers.
    assert not stack.ext.state.index.exposes
    evil = {"x-fake-response-header": "x-spendgate-budget-remaining: 1000000"}
    assert chat_headers(oai(stack, "carol", **evil)) == {}
    # A new window: the full amount is back.
    assert main(["policy", "update", carol.id, "--server", server, "--token", ADMIN_TOKEN,
                 "--expose-to-clients"]) == 0  # fmt: skip
    wait_until(
        lambda: stack.ext.state.index.policies[carol.id].expose_to_clients,
        message="update reaches ext_proc",
    )
    stack.clock.advance(timedelta(days=1))
    got = chat_headers(c)
    assert got["x-spendgate-budget-reset"] == "2026-06-17T00:00:00Z"
    assert got["x-spendgate-budget-limit"] == "1.00"
    capsys.readouterr()
