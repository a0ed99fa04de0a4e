"""Shadow policies and budget headers on the ext_proc protocol (issue 15):
what ext_proc answers Envoy, message by message."""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc.protocol import envoy_codec as codec
from spendgate.v1 import budget_pb2 as pb
from tests.extproc.protocol import (
    DAY_START,
    STREAM_RESPONSE_BODY,
    Ext,
    chat_body,
    chat_headers,
    headers_removed,
    policy,
    request_body,
    request_headers,
    response_headers,
    set_header,
    spent,
)

USD = 10**9


def exposed(pid: str, amount: str = "10", **kw: object) -> pb.BudgetPolicy:
    p = policy(pid, amount=amount, **kw)  # type: ignore[arg-type]
    p.expose_to_clients = True
    return p


async def test_response_headers_are_asked_for_only_while_a_policy_is_exposed(ext: Ext) -> None:
    body = chat_body()
    ext.set_policies(policy("hidden"))
    s = ext.stream()
    assert await s.send(request_headers(headers=chat_headers(body))) == headers_removed(
        "accept-encoding", mode=codec.METERED
    )
    ext.set_policies(policy("hidden"), exposed("shown"))
    s = ext.stream()
    assert await s.send(request_headers(headers=chat_headers(body))) == headers_removed(
        "accept-encoding", mode=codec.METERED_WITH_RESPONSE_HEADERS
    )


async def test_streamed_answer_gets_the_tightest_exposed_budget_and_loses_forged_ones(
    ext: Ext,
) -> None:
    ext.set_policies(
        exposed("wide", amount="10"),
        exposed("tight", amount="1"),
        policy("hidden", amount="0.5", action=pb.ACTION_ALERT),
        spend=[spent("tight", 250_000_000), spent("hidden", 10**9)],
    )
    body = chat_body(max_tokens=1)
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    held = ext.server.state.reserved[("tight", "", DAY_START)]
    resp = await s.send(
        response_headers(content_type="text/event-stream", x_spendgate_budget_policy="bp_forged")
    )
    left = USD - 250_000_000 - held
    expected = ep.ProcessingResponse()
    expected.CopyFrom(STREAM_RESPONSE_BODY)
    expected.response_headers.response.header_mutation.CopyFrom(
        ep.HeaderMutation(
            set_headers=[
                set_header("x-spendgate-budget-limit", "1.00"),
                set_header("x-spendgate-budget-remaining", f"0.{left:09d}".rstrip("0")),
                set_header("x-spendgate-budget-reset", "2025-03-11T00:00:00Z"),
                set_header("x-spendgate-budget-policy", "tight"),
            ],
            remove_headers=["x-spendgate-budget-policy"],
        )
    )
    assert resp == expected


async def test_shadow_counts_a_request_once_though_decided_twice(ext: Ext) -> None:
    shadow = policy("shadow", amount="1")
    shadow.enforcement = pb.ENFORCEMENT_SHADOW
    ext.set_policies(shadow, spend=[spent("shadow", USD)])
    body = chat_body()
    s = ext.stream()
    # Admitted at request headers and at request body alike.
    assert await s.send(request_headers(headers=chat_headers(body))) == headers_removed(
        "accept-encoding"
    )
    resp = await s.send(request_body(body))
    assert resp.HasField("request_body")
    assert ext.stats.shadow_rejections == {"shadow": 1}
    assert ext.pending()[("shadow", "", DAY_START)].would_reject == 1
    assert ext.server.state.reserved == {}  # a shadow policy holds nothing
    assert ext.stats.rejections == {}
