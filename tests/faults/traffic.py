"""Client load for the fault tests: OpenAI chat requests through the Envoys,
each one recorded with when it was sent, when it ended and how.

The fake provider chooses the usage it bills from request headers, so every
request here says how many tokens it "uses". ``Tokens`` picks them per
request; ``seq_tokens`` puts the request's sequence number into its prompt
tokens, so each line of the provider's bill names the request it belongs to.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import httpx

from spendgate.demo.fake_provider import LOG_LIMIT, Billed, FakeProviderServer
from spendgate.domain.pricing import PriceBook, cost_nanos
from spendgate.domain.usage import Usage

MODEL = "gpt-4o-mini"
PRICES = PriceBook.bundled()
PROMPT = 1000
COMPLETION = 100
SEQ_BASE = 1_000  # seq_tokens: prompt tokens = SEQ_BASE + seq
TRANSPORT_ERROR = -1  # status of a request that got no HTTP answer

Tokens = Callable[[int], tuple[int, int]]


def fixed_tokens(prompt: int = PROMPT, completion: int = COMPLETION) -> Tokens:
    return lambda seq: (prompt, completion)


DEFAULT_TOKENS = fixed_tokens()


def seq_tokens(seq: int) -> tuple[int, int]:
    return SEQ_BASE + seq, COMPLETION


def cost_of(prompt: int, completion: int, model: str = MODEL) -> int:
    """Nano-USD the catalog charges for this usage (the price book ext_proc uses)."""
    price = PRICES.lookup(model)
    assert price is not None
    return cost_nanos(Usage(input_tokens=prompt, output_tokens=completion), price)


def billed_nanos(billed: Iterable[Billed]) -> int:
    total = 0
    for b in billed:
        price = PRICES.lookup(b.model)
        assert price is not None, b.model
        total += cost_nanos(b.usage, price)
    return total


def provider_bill(provider: FakeProviderServer) -> list[Billed]:
    """What the provider billed so far (fails if its log was trimmed)."""
    with provider.log.lock:
        billed = list(provider.log.billed)
    assert len(billed) < LOG_LIMIT, "the fake provider's log was trimmed: send fewer requests"
    return billed


def provider_seen_prompts(provider: FakeProviderServer) -> set[int]:
    """x-fake-prompt-tokens of every request that reached the provider."""
    with provider.log.lock:
        requests = list(provider.log.requests)
    return {int(r["headers"].get("x-fake-prompt-tokens", -1)) for r in requests}


@dataclass(frozen=True, slots=True)
class Sent:
    seq: int
    pair: int
    user: str
    start: float  # time.monotonic() just before sending
    end: float  # time.monotonic() once the whole answer was read
    status: int  # HTTP status, or TRANSPORT_ERROR
    prompt: int
    completion: int

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def cost(self) -> int:
        return cost_of(self.prompt, self.completion)


@dataclass
class Client:
    """Sends one request at a time through one Envoy; records every result."""

    base_url: str
    pair: int
    workspace: str
    counter: itertools.count[int]
    record: list[Sent]
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.base_url, timeout=15)

    def send(
        self,
        user: str,
        tokens: Tokens = DEFAULT_TOKENS,
        *,
        extra_headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> Sent:
        seq = next(self.counter)
        prompt, completion = tokens(seq)
        headers = {
            "authorization": "Bearer sk-fault-test",
            "x-spendgate-user": user,
            "x-spendgate-workspace": self.workspace,
            "x-fake-prompt-tokens": str(prompt),
            "x-fake-completion-tokens": str(completion),
            **(extra_headers or {}),
        }
        # max_tokens = the real completion: reservations hold about what the
        # request then costs, so they do not reject long before a limit.
        body = {
            "model": MODEL,
            "max_tokens": completion,
            "messages": [{"role": "user", "content": f"fault test {seq}"}],
        }
        if stream:  # read whole: charged when the stream ends
            body["stream"] = True
        start = time.monotonic()
        try:
            resp = self.http.post("/v1/chat/completions", json=body, headers=headers)
            status = resp.status_code
        except httpx.TransportError:
            status = TRANSPORT_ERROR
        sent = Sent(seq, self.pair, user, start, time.monotonic(), status, prompt, completion)
        self.record.append(sent)
        return sent

    def close(self) -> None:
        self.http.close()


class Load:
    """Client threads, each sending requests back to back (with ``pause_s``
    between them) through one Envoy until ``stop``. ``results`` grows as
    answers arrive (list.append is atomic; read a copy)."""

    def __init__(
        self,
        base_urls: Sequence[str],
        workspace: str,
        counter: itertools.count[int] | None = None,
    ) -> None:
        """``counter`` numbers the requests; share one between loads whose
        requests must be told apart on the provider's bill."""
        self.base_urls = list(base_urls)
        self.workspace = workspace
        self.counter = counter or itertools.count(1)
        self.results: list[Sent] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    def client(self, pair: int) -> Client:
        return Client(self.base_urls[pair], pair, self.workspace, self.counter, self.results)

    def add(
        self,
        pair: int,
        user: str,
        *,
        threads: int = 2,
        tokens: Tokens = DEFAULT_TOKENS,
        pause_s: float = 0.01,
    ) -> None:
        for n in range(threads):
            t = threading.Thread(
                target=self._run,
                args=(pair, user, tokens, pause_s),
                name=f"load-{pair}-{user}-{n}",
                daemon=True,
            )
            self._threads.append(t)
            t.start()

    def _run(self, pair: int, user: str, tokens: Tokens, pause_s: float) -> None:
        client = self.client(pair)
        try:
            while not self._stop.is_set():
                client.send(user, tokens)
                self._stop.wait(pause_s)
        except BaseException as e:  # reported by stop()
            self._errors.append(e)
        finally:
            client.close()

    def stop(self) -> list[Sent]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
            assert not t.is_alive(), f"{t.name} did not stop"
        assert not self._errors, f"load thread failed: {self._errors[0]!r}"
        return list(self.results)

    def snapshot(self) -> list[Sent]:
        return list(self.results)


def burst(
    base_urls: Sequence[str],
    workspace: str,
    user: str,
    count: int,
    tokens: Tokens = DEFAULT_TOKENS,
    extra_headers: dict[str, str] | None = None,
    stream: bool = False,
) -> list[Sent]:
    """``count`` requests sent at the same moment, spread round robin over
    ``base_urls`` (one client thread each, released together)."""
    counter = itertools.count(1)
    record: list[Sent] = []
    gate = threading.Barrier(count)
    errors: list[BaseException] = []

    def one(n: int) -> None:
        pair = n % len(base_urls)
        client = Client(base_urls[pair], pair, workspace, counter, record)
        try:
            gate.wait(30)
            client.send(user, tokens, extra_headers=extra_headers, stream=stream)
        except BaseException as e:
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, f"burst request failed: {errors[0]!r}"
    return record


def statuses(results: Iterable[Sent]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return dict(sorted(counts.items()))


def usd(nanos: int) -> str:
    sign = "-" if nanos < 0 else ""
    return f"{sign}${abs(nanos) / 1e9:.9f}"
