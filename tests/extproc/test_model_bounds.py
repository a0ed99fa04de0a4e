"""Model names stay bounded inside ext_proc (issue 13, item 1): an answer
naming a model over MAX_MODEL_BYTES is charged under the request's model,
and clients inventing model names cannot grow the set of warned-about
unpriced models (or the log) without end."""

from __future__ import annotations

import orjson
import pytest

from ext_proc.metering import charge
from spendgate.domain.limits import MAX_MODEL_BYTES
from spendgate.v1 import budget_pb2 as pb
from tests.extproc.protocol import (
    CONTINUE_REQUEST_BODY,
    DAY_START,
    ENDED,
    STREAM_RESPONSE_BODY,
    Ext,
    chat_body,
    chat_headers,
    policy,
    request_body,
    request_headers,
    response_body,
    response_headers,
)


def completion(model: str) -> bytes:
    return orjson.dumps(
        {
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
    )


async def exchange(ext: Ext, request_model: str, answer_model: str) -> None:
    body = chat_body(request_model)
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    assert await s.send(request_body(body)) == CONTINUE_REQUEST_BODY
    assert await s.send(response_headers(200, "application/json")) == STREAM_RESPONSE_BODY
    assert await s.send(response_body(completion(answer_model), end_of_stream=True)) is ENDED
    await s.close()


async def test_a_provider_reported_model_over_the_bound_is_not_used(ext: Ext) -> None:
    ext.set_policies(policy("models", pb.SCOPE_MODEL, "*", action=pb.ACTION_ALERT))
    await exchange(ext, "gpt-4o-mini", "x" * (MAX_MODEL_BYTES + 1))
    [(key, _)] = ext.pending().items()
    assert key == ("models", "gpt-4o-mini", DAY_START)


async def test_unpriced_model_warnings_are_bounded(
    ext: Ext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(charge, "MAX_WARNED_MODELS", 3)
    for i in range(6):
        await exchange(ext, f"invented-{i}", f"invented-{i}")
    assert ext.server.ctx.warned_models == {"invented-0", "invented-1", "invented-2"}
    assert ext.server.ctx.stats.unpriced_responses == 6
