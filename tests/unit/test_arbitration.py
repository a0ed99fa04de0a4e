"""The end of an arbitration (ext_proc.protocol.processor.RequestProcessor._arbitrate):
the control plane's answer is followed; without one in time, the request is
decided again on this data plane's view as it is after the wait."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from ext_proc.admission.decide import SpendKey
from ext_proc.config import Settings
from ext_proc.metering.pricing import PriceTable
from ext_proc.protocol import envoy_codec as codec
from ext_proc.protocol.context import Context
from ext_proc.protocol.processor import RequestProcessor
from ext_proc.sync.state import LocalState
from spendgate.domain.policies import Action, Policy, PolicyIndex, Scope
from spendgate.domain.pricing import PriceBook
from spendgate.domain.windows import WindowSpec, WindowUnit, window_for
from spendgate.v1 import dataplane_pb2 as dp

USD = 10**9
NOW = datetime(2025, 3, 10, 12, tzinfo=UTC)
POLICY = Policy("bp_1", "daily", USD, WindowSpec(WindowUnit.DAYS), Action.REJECT, Scope.GLOBAL, "")
KEY: SpendKey = ("bp_1", "", int(window_for(POLICY.window, NOW).start.timestamp()))
ADMITTED = codec.REQUEST_BODY_CONTINUE


def processor(answer: dp.ReserveVerdict | None) -> RequestProcessor:
    async def arbiter(holds: list[tuple[SpendKey, int]]) -> dp.ReserveVerdict | None:
        return answer

    state = LocalState(index=PolicyIndex([POLICY]))
    ctx = Context(
        settings=Settings(data_plane_token="data-plane-token-0123"),
        state=state,
        prices=PriceTable(PriceBook.bundled()),
        clock=lambda: NOW,
        arbiter=arbiter,
    )
    proc = RequestProcessor(ctx)
    proc.matches = [(POLICY, "")]
    return proc


def hold(proc: RequestProcessor, nanos: int) -> None:
    """This request's own hold, as _reserve places it."""
    proc.held = [(KEY, nanos)]
    proc.ctx.state.reserve(proc.held)


def status(reply: codec.ProcessingResponse) -> int:
    return int(reply.immediate_response.status.code) if reply.HasField("immediate_response") else 0


def test_the_control_planes_yes_admits() -> None:
    proc = processor(dp.ReserveVerdict(admitted=True))
    hold(proc, USD // 10)
    assert asyncio.run(proc._arbitrate(ADMITTED)) is ADMITTED
    assert proc.ctx.stats.arbitrations["admitted"] == 1


def test_the_control_planes_no_rejects_naming_the_policy_and_releases_the_hold() -> None:
    proc = processor(dp.ReserveVerdict(admitted=False, policy_id="bp_1"))
    hold(proc, USD // 10)
    reply = asyncio.run(proc._arbitrate(ADMITTED))
    assert status(reply) == 429 and b"daily" in reply.immediate_response.body
    assert proc.ctx.state.reserved == {}
    assert proc.ctx.stats.arbitrations["rejected"] == 1


def test_no_answer_and_room_on_the_local_view_admits() -> None:
    proc = processor(None)
    proc.ctx.state.reserve([(KEY, 8 * USD // 10)])  # others admitted meanwhile here
    hold(proc, USD // 10)
    assert asyncio.run(proc._arbitrate(ADMITTED)) is ADMITTED  # 0.8 held before it
    assert proc.ctx.stats.arbitrations["unanswered"] == 1


def test_no_answer_and_the_local_view_full_rejects() -> None:
    """While this request waited, others on this data plane took the room:
    the local view counts their holds and rejects (no unconditional admit)."""
    proc = processor(None)
    proc.ctx.state.reserve([(KEY, USD)])
    hold(proc, USD // 10)
    reply = asyncio.run(proc._arbitrate(ADMITTED))
    assert status(reply) == 429
    assert proc.ctx.state.reserved == {KEY: USD}  # only the others' holds remain
    # Nothing is spent: the others' holds fill it, and they are 1 request (this
    # one's own hold is not counted), so the client may retry in seconds.
    headers = codec_headers(reply)
    assert (headers["x-spendgate-error"], headers["retry-after"]) == ("budget_held", "2")
    assert headers["x-should-retry"] == "true"
    assert b"held by 1 request in flight" in reply.immediate_response.body
    assert proc.ctx.stats.rejections == {("bp_1", "budget_held"): 1}


def test_the_control_planes_no_with_nothing_held_here_is_a_spent_budget() -> None:
    """The control plane saw the window spent (this view still shows room and
    no hold): the 429 tells the SDK not to retry, as before."""
    proc = processor(dp.ReserveVerdict(admitted=False, policy_id="bp_1"))
    hold(proc, USD // 10)
    reply = asyncio.run(proc._arbitrate(ADMITTED))
    headers = codec_headers(reply)
    assert (headers["x-spendgate-error"], headers["x-should-retry"]) == ("budget_exceeded", "false")
    assert proc.ctx.stats.rejections == {("bp_1", "budget_exceeded"): 1}


def codec_headers(reply: codec.ProcessingResponse) -> dict[str, str]:
    return {
        h.header.key: h.header.raw_value.decode()
        for h in reply.immediate_response.headers.set_headers
    }
