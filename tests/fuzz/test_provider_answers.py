"""Provider answers with extreme usage values reach the client byte for
byte and never stop usage delivery: after each example spendgate is proven
whole (tests/fuzz/proof.py) — a normal request is charged exactly, health is
SERVING, no ext_proc stream failed."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import httpx
import pytest
from hypothesis import given

from spendgate.domain.pricing import NANOS_PER_USD, PriceBook, cost_nanos
from tests.fuzz import answers
from tests.fuzz.conftest import PROFILE, explore
from tests.fuzz.proof import FuzzStack
from tests.fuzz.provider import MARK, REPLIES
from tests.harness import wait_until

PRICES = PriceBook.bundled()

pytestmark = pytest.mark.e2e


def call(fuzz: FuzzStack, a: answers.Answer, member: str) -> None:
    path, model, credentials = answers.CALLS[a.api]
    path = path.format(method="streamGenerateContent?alt=sse" if a.stream else "generateContent")
    body: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}], "model": model}
    if a.api == "anthropic":
        body["max_tokens"] = 100
    if a.api == "gemini":
        body = {"contents": [{"parts": [{"text": "hi"}]}]}
    elif a.stream:
        body["stream"] = True
    key = REPLIES.add(a.reply)
    headers = [*credentials, ("x-fuzz-reply", key), ("x-spendgate-user", member)]
    try:
        with (
            httpx.Client(base_url=fuzz.base_url, timeout=60) as http,
            http.stream("POST", path, headers=headers, content=json.dumps(body)) as r,
        ):
            received = r.read()
    except httpx.TransportError as e:
        raise AssertionError(f"no answer: {type(e).__name__}: {e}") from e
    assert MARK in r.headers, f"{r.status_code} not from the provider: {received[:500]!r}"
    assert r.status_code == a.reply.status
    assert received == a.reply.body, "the provider's answer changed on its way to the client"


def test_provider_answers_never_stop_usage_delivery(fuzz: FuzzStack) -> None:
    @PROFILE
    @given(answers.answer())
    def run(a: answers.Answer) -> None:
        member = f"fuzz-{uuid.uuid4().hex}"
        call(fuzz, a, member)
        if a.expected is not None:
            # A plain report has one right charge, whatever else the answer held.
            price = PRICES.lookup(answers.CALLS[a.api][1])
            assert price is not None
            want = Decimal(cost_nanos(a.expected, price)) / NANOS_PER_USD
            wait_until(
                lambda: fuzz.spent(member) == want,
                timeout=30,
                message=f"the answer charged {want} (charged: {fuzz.spent(member)})",
            )
        fuzz.outcomes[f"{a.api} stream={a.stream} status={a.reply.status}"] += 1
        fuzz.prove()

    explore(run, share=0.35)
