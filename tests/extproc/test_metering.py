"""ext_proc over the real protocol: what it meters and how it answers each phase
(tests/extproc/protocol.py drives it as Envoy does)."""

from __future__ import annotations

import gzip
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc.metering.meters.base import estimate_tokens_from_chars
from ext_proc.protocol import envoy_codec as codec
from ext_proc.sync.state import Increment
from spendgate.domain.policies import hash_api_key
from spendgate.domain.usage import Usage
from spendgate.v1 import budget_pb2 as pb
from tests.extproc.protocol import (
    API_KEY,
    COMPLETION,
    CONTINUE_REQUEST_BODY,
    CONTINUE_RESPONSE_BODY,
    CONTINUE_RESPONSE_HEADERS,
    DAY_START,
    ENDED,
    FIXTURES,
    GLOBAL_KEY,
    MINI,
    ROUTE,
    SKIP_REST,
    STREAM_RESPONSE_BODY,
    Ext,
    Mode,
    chat_body,
    chat_headers,
    chunks,
    header_map,
    headers_removed,
    policy,
    price,
    request_body,
    request_headers,
    response_body,
    response_headers,
    running,
    set_header,
    spent,
    wait_for,
)

# ---- unmetered requests ----


async def test_get_is_answered_once_and_skips_the_rest(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    s = ext.stream()
    resp = await s.answer_and_end(
        request_headers("GET", "/v1/models", {"x-spendgate-user": "alice"}, end_of_stream=True)
    )
    assert resp == headers_removed("x-spendgate-user", mode=SKIP_REST)
    await s.close()
    assert ext.stats_changed() == {"unmetered_requests": 1}
    assert ext.pending() == {}


async def test_custom_identity_headers_are_read_and_removed() -> None:
    async with running(
        user_header="x-user", workspace_header="x-team", tags_header="x-labels"
    ) as ext:
        ext.set_policies(
            policy("each-user", pb.SCOPE_USER, "*"),
            policy("each-team", pb.SCOPE_WORKSPACE, "*"),
            policy("each-env", pb.SCOPE_TAG, "env=*"),
        )
        body = chat_body()
        headers = chat_headers(
            body, x_user="carol", x_team="ml", x_labels="env=prod", x_spendgate_debug="1"
        )
        s = ext.stream()
        assert await s.send(request_headers(headers=headers)) == headers_removed(
            "x-user", "x-team", "x-labels", "x-spendgate-debug", "accept-encoding"
        )
        await s.send(request_body(body))
        await s.send(response_headers())
        await s.send(response_body(COMPLETION, end_of_stream=True))
        await s.close()
        charged = Increment(price(Usage(19, 0, 10, None, 10)), 1, 0)
        assert ext.pending() == {
            ("each-team", "ml", DAY_START): charged,
            ("each-user", "carol", DAY_START): charged,
            ("each-env", "prod", DAY_START): charged,
        }


async def test_unmetered_post_without_spendgate_headers_has_no_mutation(ext: Ext) -> None:
    s = ext.stream()
    resp = await s.answer_and_end(request_headers("POST", "/v1/images/generations", chat_headers()))
    expected = ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=ep.CommonResponse()), mode_override=SKIP_REST
    )
    assert resp == expected
    await s.close()


async def test_metered_post_without_body_is_checked_counted_and_metered(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    s = ext.stream()
    resp = await s.send(request_headers(headers=chat_headers(), end_of_stream=True))
    assert resp == headers_removed("accept-encoding", mode=codec.METERED_NO_REQUEST_BODY)
    # A provider that answers anyway is charged what it reports.
    assert await s.send(response_body(COMPLETION, end_of_stream=True)) is ENDED
    await s.close()
    assert ext.pending() == {GLOBAL_KEY: Increment(price(Usage(19, 0, 10, None, 10)), 1, 0)}
    assert ext.stats_changed() == {
        "unparsed_requests": 1,
        "metered_responses": 1,
        "input_tokens": 19,
        "output_tokens": 10,
        "cost_nanos": price(Usage(19, 0, 10, None, 10)),
    }


async def test_metered_post_without_body_is_rejected_by_a_spent_budget(ext: Ext) -> None:
    ext.set_policies(policy("global"), spend=[spent("global", 11 * 10**9)])
    s = ext.stream()
    resp = await s.answer_and_end(request_headers(headers=chat_headers(), end_of_stream=True))
    assert resp.immediate_response.status.code == 429
    await s.close()


# ---- metering ----


async def test_chat_completion_is_metered_and_charged(ext: Ext) -> None:
    ext.set_policies(
        policy("global"),
        policy("each-user", pb.SCOPE_USER, "*", action=pb.ACTION_ALERT),
        policy("team", pb.SCOPE_TAG, "team=*"),
        policy("key", pb.SCOPE_API_KEY, hash_api_key(API_KEY)),
        policy("route", pb.SCOPE_ENDPOINT, ROUTE),
        policy("other-route", pb.SCOPE_ENDPOINT, "anthropic"),
    )
    body = chat_body()
    s = ext.stream()
    headers = chat_headers(
        body, x_spendgate_user="alice", x_spendgate_tags="team=search", x_request_id="r1"
    )
    assert await s.send(request_headers(headers=headers)) == headers_removed(
        "x-spendgate-user", "x-spendgate-tags", "accept-encoding"
    )
    assert await s.send(request_body(body)) == CONTINUE_REQUEST_BODY
    assert await s.send(response_headers(200, "application/json")) == STREAM_RESPONSE_BODY
    completion = COMPLETION
    parts = [completion[:7], completion[7:300], completion[300:]]
    for part in parts[:-1]:
        assert await s.send(response_body(part)) == CONTINUE_RESPONSE_BODY
    assert await s.send(response_body(parts[-1], end_of_stream=True)) is ENDED
    await s.close()

    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert cost > 0
    charged = Increment(cost, 1, 0)
    assert ext.pending() == {
        ("global", "", DAY_START): charged,
        ("route", "", DAY_START): charged,
        ("each-user", "alice", DAY_START): charged,
        ("key", "", DAY_START): charged,
        ("team", "search", DAY_START): charged,
    }
    assert ext.server.state.spent(GLOBAL_KEY) == cost
    assert ext.stats_changed() == {
        "metered_responses": 1,
        "input_tokens": 19,
        "output_tokens": 10,
        "cost_nanos": cost,
    }


async def test_empty_last_chunk_ends_the_response(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    await s.send(response_headers())
    completion = COMPLETION
    assert await s.send(response_body(completion)) == CONTINUE_RESPONSE_BODY
    assert await s.send(response_body(b"", end_of_stream=True)) is ENDED
    # Charged at end of body, before the stream closes.
    assert ext.pending() == {GLOBAL_KEY: Increment(price(Usage(19, 0, 10, None, 10)), 1, 0)}
    await s.close()
    assert ext.stats.metered_responses == 1


@pytest.mark.parametrize(
    ("extra", "with_length"),
    [
        pytest.param({"stream": True}, True, id="no-stream-options"),
        pytest.param({"stream": True}, False, id="no-content-length"),
        pytest.param(
            {"stream": True, "stream_options": {"include_usage": False}},
            True,
            id="include-usage-false",
        ),
        pytest.param({"stream": True, "stream_options": None}, True, id="stream-options-null"),
        # What pydantic-validated servers (vLLM, LiteLLM) stream for.
        pytest.param({"stream": "true"}, True, id="stream-string-true"),
        pytest.param({"stream": " TRUE "}, True, id="stream-string-upper"),
        pytest.param({"stream": 1}, True, id="stream-one"),
        pytest.param({"stream": 1.0}, True, id="stream-one-float"),
        pytest.param({"stream": "yes"}, True, id="stream-yes"),
    ],
)
async def test_streaming_request_asks_for_usage(
    ext: Ext, extra: dict[str, Any], with_length: bool
) -> None:
    body = chat_body(max_tokens=50, temperature=0.5, **extra)
    s = ext.stream()
    headers = chat_headers(body) if with_length else chat_headers()
    await s.send(request_headers(headers=headers))
    resp = await s.send(request_body(body))
    new = resp.request_body.response.body_mutation.body
    assert orjson.loads(new) == {
        **orjson.loads(body),
        "stream_options": {"include_usage": True},
    }
    set_headers = [set_header("content-length", str(len(new)))] if with_length else []
    expected = ep.ProcessingResponse(
        request_body=ep.BodyResponse(
            response=ep.CommonResponse(
                header_mutation=ep.HeaderMutation(set_headers=set_headers) if with_length else None,
                body_mutation=ep.BodyMutation(body=new),
            )
        )
    )
    assert resp == expected
    await s.close()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"stream": True, "stream_options": {"include_usage": True}}, id="already"),
        pytest.param({"stream": False}, id="not-streaming"),
        pytest.param({"stream": "no"}, id="stream-string-false"),
        pytest.param({"stream": 0}, id="stream-zero"),
        pytest.param({"stream": 2}, id="stream-two"),
        pytest.param({"stream": None}, id="stream-null"),
        pytest.param({"stream": ["true"]}, id="stream-list"),
    ],
)
async def test_request_body_left_alone(ext: Ext, extra: dict[str, Any]) -> None:
    body = chat_body(**extra)
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    assert await s.send(request_body(body)) == CONTINUE_REQUEST_BODY
    await s.close()


async def test_sse_response_is_metered(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    await sse_exchange(ext)
    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert ext.pending() == {GLOBAL_KEY: Increment(cost, 1, 0)}
    assert ext.stats_changed() == {
        "metered_responses": 1,
        "input_tokens": 19,
        "output_tokens": 10,
        "cost_nanos": cost,
    }


async def sse_exchange(ext: Ext) -> None:
    """A streaming chat completion with a usage chunk, cut at arbitrary points."""
    body = chat_body(stream=True)
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    resp = await s.send(response_headers(200, "text/event-stream; charset=utf-8"))
    assert resp == STREAM_RESPONSE_BODY
    events = (FIXTURES / "chat_stream_usage.sse").read_bytes()
    for part in chunks(events, 97):  # cuts events and JSON at arbitrary points
        assert await s.send(response_body(part)) == CONTINUE_RESPONSE_BODY
    assert await s.send(response_body(b"", end_of_stream=True)) is ENDED
    await s.close()


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)


def delta(content: str) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }


async def test_stream_cancelled_by_the_client_is_charged_an_estimate(ext: Ext) -> None:
    ext.set_policies(policy("global"), policy("each-user", pb.SCOPE_USER, "*"))
    body = chat_body("gpt-4o", stream=True)
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body, x_spendgate_user="bob")))
    await s.send(request_body(body))
    await s.send(response_headers(200, "text/event-stream"))
    for text in ("Hello", " there,", " friend"):  # 19 characters generated
        assert await s.send(response_body(sse(delta(text)))) == CONTINUE_RESPONSE_BODY
    assert ext.pending() == {}  # nothing charged while the stream runs
    s.call.cancel()
    await wait_for(lambda: ext.stats.estimated_responses == 1, "the aborted stream's charge")

    usage = Usage(
        input_tokens=estimate_tokens_from_chars(len(body)),
        output_tokens=estimate_tokens_from_chars(19),
        estimated=True,
    )
    assert usage.output_tokens == 5
    cost = price(usage, "gpt-4o-2024-08-06")
    assert cost > 0
    assert ext.pending() == {
        GLOBAL_KEY: Increment(cost, 1, 1),
        ("each-user", "bob", DAY_START): Increment(cost, 1, 1),
    }
    assert ext.stats_changed() == {
        "metered_responses": 1,
        "estimated_responses": 1,
        "input_tokens": usage.input_tokens,
        "output_tokens": 5,
        "cost_nanos": cost,
    }


async def test_stream_half_closed_mid_response_is_charged_an_estimate(ext: Ext) -> None:
    # Envoy ends the ext_proc stream when the downstream client goes away.
    ext.set_policies(policy("global"))
    body = chat_body("gpt-4o", stream=True)
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    await s.send(response_headers(200, "text/event-stream"))
    await s.send(response_body(sse(delta("12345678"))))
    await s.close()
    usage = Usage(estimate_tokens_from_chars(len(body)), output_tokens=2, estimated=True)
    assert ext.pending() == {GLOBAL_KEY: Increment(price(usage, "gpt-4o"), 1, 1)}
    assert ext.stats.estimated_responses == 1


async def test_trailers_each_get_a_trailers_response(ext: Ext) -> None:
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body, end_of_stream=False))
    trailers = header_map({"x-checksum": "abc"})
    assert await s.send(
        ep.ProcessingRequest(request_trailers=ep.HttpTrailers(trailers=trailers))
    ) == ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
    await s.send(response_headers())
    await s.send(response_body(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}'))
    assert await s.send(
        ep.ProcessingRequest(response_trailers=ep.HttpTrailers(trailers=trailers))
    ) == ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
    await s.close()
    assert ext.stats.internal_errors == 0


async def test_non_json_request_body_passes_and_the_next_request_works(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers()))
    for bad in (b"model=gpt-4o", b"\xff\xfe\x00not utf-8", b"[1, 2]", b'{"model": "gpt'):
        assert await s.send(request_body(bad)) == CONTINUE_REQUEST_BODY
    assert await s.send(response_headers(400)) == CONTINUE_RESPONSE_HEADERS
    await s.close()
    assert ext.stats_changed() == {"unparsed_requests": 4}
    assert ext.pending() == {}

    await sse_exchange(ext)
    cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
    assert ext.pending() == {GLOBAL_KEY: Increment(cost, 1, 0)}
    assert ext.stats.metered_responses == 1


async def test_2mb_request_body_is_handled(ext: Ext) -> None:
    big = "word " * (2 * 1024 * 1024 // 5)
    body = orjson.dumps({"model": MINI, "messages": [{"role": "user", "content": big}]})
    assert len(body) > 2 * 1024 * 1024
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    assert await s.send(request_body(body)) == CONTINUE_REQUEST_BODY
    await s.close()

    streaming = orjson.dumps({**orjson.loads(body), "stream": True})
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(streaming)))
    resp = await s.send(request_body(streaming))
    new = resp.request_body.response.body_mutation.body
    assert orjson.loads(new)["stream_options"] == {"include_usage": True}
    assert len(new) == len(streaming) + len(b',"stream_options":{"include_usage":true}')
    await s.close()
    assert ext.stats.internal_errors == 0


async def test_request_body_in_chunks_is_joined(ext: Ext) -> None:
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    parts = chunks(body, 10)
    for part in parts[:-1]:
        assert await s.send(request_body(part, end_of_stream=False)) == CONTINUE_REQUEST_BODY
    assert await s.send(request_body(parts[-1])) == CONTINUE_REQUEST_BODY
    await s.send(response_headers())
    assert await s.send(response_body(COMPLETION, end_of_stream=True)) is ENDED
    await s.close()
    assert ext.stats_changed() == {
        "metered_responses": 1,
        "input_tokens": 19,
        "output_tokens": 10,
        "cost_nanos": price(Usage(19, 0, 10, None, 10)),
    }


async def test_request_never_answered_is_charged_its_input(ext: Ext) -> None:
    """The client gave up (a timeout) or the connection broke before any
    answer: the provider read the prompt all the same."""
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    assert await s.send(request_body(body)) == CONTINUE_REQUEST_BODY
    await s.close()
    usage = Usage(estimate_tokens_from_chars(len(body)), output_tokens=0, estimated=True)
    assert ext.pending() == {GLOBAL_KEY: Increment(price(usage), 1, 1)}
    assert ext.stats_changed() == {
        "metered_responses": 1,
        "estimated_responses": 1,
        "input_tokens": usage.input_tokens,
        "cost_nanos": price(usage),
    }


async def test_request_refused_before_it_left_is_not_charged(ext: Ext) -> None:
    ext.set_policies(policy("global"), spend=[spent("global", 11 * 10**9)])
    s = ext.stream()
    resp = await s.answer_and_end(request_headers(headers=chat_headers(chat_body())))
    assert resp.immediate_response.status.code == 429
    await s.close()
    assert ext.pending() == {}


@pytest.mark.parametrize("status", [500, 429, 400, 302, 100])
async def test_error_status_costs_nothing(ext: Ext, status: int) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    assert await s.send(response_headers(status)) == CONTINUE_RESPONSE_HEADERS
    await s.close()
    assert ext.pending() == {}
    assert ext.stats_changed() == {}


async def test_gzip_response_is_decoded_and_metered(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    resp = await s.send(response_headers(200, content_encoding="gzip"))
    assert resp.mode_override.response_body_mode == Mode.STREAMED
    packed = gzip.compress(COMPLETION)
    for part in chunks(packed, 7):
        await s.send(response_body(part))
    await s.send(response_body(b"", end_of_stream=True))
    await s.close()
    assert ext.stats_changed()["metered_responses"] == 1
    assert ext.pending() != {}


async def test_undecodable_encoding_is_counted_unmetered(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    resp = await s.send(response_headers(200, content_encoding="br"))
    assert resp == CONTINUE_RESPONSE_HEADERS
    await s.close()
    assert ext.pending() == {}
    assert ext.stats_changed() == {"unmetered_responses": 1}


async def test_response_headers_ending_the_stream_finish_metering(ext: Ext) -> None:
    ext.set_policies(policy("global"))
    body = chat_body()
    s = ext.stream()
    await s.send(request_headers(headers=chat_headers(body)))
    await s.send(request_body(body))
    req = response_headers()
    req.response_headers.end_of_stream = True
    assert await s.send(req) == CONTINUE_RESPONSE_HEADERS
    await s.close()
    assert ext.pending() == {}
    assert ext.stats_changed() == {"unmetered_responses": 1}
