"""Chargeback reports end to end: each provider's official SDK → real Envoy →
ext_proc → fake provider, with no budget policy at all; ReportService.QuerySpend
(read-only token) must equal, to the nano-dollar, what the provider billed,
grouped by user, provider, model and tag, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from spendgate.cli.main import main
from spendgate.domain.pricing import PriceBook, cost_nanos, format_usd, parse_usd
from spendgate.v1 import reports_pb2 as rp
from spendgate.v1 import reports_pb2_grpc
from tests.conftest import Stack, start_stack, stop_stack
from tests.e2e import test_provider_apis as apis
from tests.harness import READ_TOKEN, grpc_channel, wait_until

pytestmark = pytest.mark.e2e
PRICES = PriceBook.bundled()
READ = (("authorization", f"Bearer {READ_TOKEN}"),)
PROVIDER_OF_API = apis.PROVIDER_OF_API

# (user, tags header or None, call): several users, tagged and untagged
# traffic, every provider's SDK, streaming and not.
TRAFFIC: list[tuple[str, str | None, Callable[[Stack, dict[str, str]], None]]] = [
    ("alice", "team=red,env=prod", apis.openai_chat),
    ("alice", "team=red", apis.openai_chat_stream),
    ("alice", None, apis.anthropic_messages),
    ("bob", "team=blue", apis.anthropic_messages_stream),
    ("bob", "team=blue", apis.gemini_generate),
    ("bob", None, apis.gemini_stream),
    ("carol", "env=dev", apis.bedrock_converse),
    ("carol", "team=red", apis.bedrock_converse_stream),
    ("carol", None, apis.openai_responses),
    ("alice", "team=red", apis.openai_chat),
]


@pytest.fixture
def stack(db_url: str) -> Iterator[Stack]:
    s = start_stack(db_url)
    yield s
    stop_stack(s)


def query(stack: Stack, *group_by: str, tag_key: str = "", page_size: int = 0) -> list[tuple]:
    """Every group of a query (all pages), as (values..., cost, requests)."""
    stub = reports_pb2_grpc.ReportServiceStub(grpc_channel(stack.cp.port))
    start = Timestamp()
    start.FromDatetime(stack.clock() - timedelta(days=1))
    rows: list[tuple] = []
    token = ""
    while True:
        resp = stub.QuerySpend(
            rp.QuerySpendRequest(
                group_by=group_by,
                tag_key=tag_key,
                start_time=start,
                page_size=page_size,
                page_token=token,
            ),
            metadata=READ,
        )
        rows += [(*g.values, g.cost_nanos, g.request_count) for g in resp.groups]
        token = resp.next_page_token
        if not token:
            return rows


def test_reports_equal_the_provider_bill_by_every_dimension(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    by_user: Counter[str] = Counter()
    by_team: Counter[str] = Counter()
    by_model: Counter[tuple[str, str]] = Counter()
    requests: Counter[str] = Counter()
    run = uuid.uuid4().hex[:6]
    for user, tags, call in TRAFFIC:
        headers = {**apis.KNOBS, "x-spendgate-user": f"{user}-{run}"}
        if tags is not None:
            headers["x-spendgate-tags"] = tags
        before = len(stack.provider.log.billed)
        call(stack, headers)
        wait_until(lambda n=before: len(stack.provider.log.billed) > n, message="billed")
        for b in stack.provider.log.billed[before:]:
            price = PRICES.lookup(b.model, PROVIDER_OF_API[b.api])
            assert price is not None, b.model
            nanos = cost_nanos(b.usage, price)
            by_user[f"{user}-{run}"] += nanos
            team = dict(t.split("=") for t in (tags or "").split(",") if t).get("team", "")
            by_team[team] += nanos
            by_model[(PROVIDER_OF_API[b.api], b.model.lower())] += nanos
            requests[f"{user}-{run}"] += 1
    total = sum(by_user.values())
    assert total > 0
    wait_until(
        lambda: query(stack) == [(total, sum(requests.values()))],
        message=f"report total {total} nanos",
    )
    assert query(stack, "user") == [(u, by_user[u], requests[u]) for u in sorted(by_user)]
    teams = query(stack, tag_key="team")
    assert [(t, c) for t, c, _ in teams] == sorted(by_team.items())
    models = query(stack, "provider", "model", page_size=2)  # paged
    assert {(p, m): c for p, m, c, _ in models} == dict(by_model)
    # Nothing was charged to a budget: there is none; reports do not need one.
    assert stack.ext.state.index.policies == {}

    # The CLI prints the same numbers (read-only token), as CSV, JSON and a table.
    since = (stack.clock() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    out = cli(stack, capsys, "--by", "user", "--since", since, "--format", "csv")
    lines = out.splitlines()
    assert lines[0] == "user,cost_usd,requests,input_tokens,output_tokens,estimated"
    assert [(r.split(",")[0], parse_usd(r.split(",")[1])) for r in lines[1:]] == sorted(
        by_user.items()
    )
    rows = json.loads(cli(stack, capsys, "--since", since, "--tag", "team", "--json"))
    assert [(r["tag:team"], r["cost_nanos"]) for r in rows] == sorted(by_team.items())
    assert sum(int(r["requests"]) for r in rows) == sum(requests.values())
    text = cli(stack, capsys, "--by", "provider,model", "--since", since)
    assert text.splitlines()[0].split() == [
        "PROVIDER",
        "MODEL",
        "COST",
        "REQUESTS",
        "INPUT",
        "TOKENS",
        "OUTPUT",
        "TOKENS",
        "ESTIMATED",
    ]
    assert text.splitlines()[-1].split()[:2] == ["TOTAL", format_usd(total)]


def cli(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``spendgate report ARGS`` against the stack, with the read-only token."""
    capsys.readouterr()
    code = main(["report", *args, "--server", f"127.0.0.1:{stack.cp.port}", "--token", READ_TOKEN])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_report_service_requires_a_token_and_names_bad_fields(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    stub = reports_pb2_grpc.ReportServiceStub(grpc_channel(stack.cp.port))
    with pytest.raises(grpc.RpcError) as e:
        stub.QuerySpend(rp.QuerySpendRequest(group_by=["user"]))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.QuerySpend(rp.QuerySpendRequest(group_by=["colour"]), metadata=READ)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "group_by" in (e.value.details() or "")
    capsys.readouterr()
    cli_args = ["--server", f"127.0.0.1:{stack.cp.port}", "--token", READ_TOKEN]
    assert main(["report", "--by", "user", "--since", "soon", *cli_args]) == 1
    assert "--since: 'soon' is not a date" in capsys.readouterr().err
    assert main(["report", "--filter", "user", "--since", "2026-11-01", *cli_args]) == 1
    assert "--filter: 'user' is not DIMENSION=VALUE" in capsys.readouterr().err
    assert main(["report", "--by", "colour", "--since", "2026-11-01", *cli_args]) == 1
    assert "group_by" in capsys.readouterr().err
