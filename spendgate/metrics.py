"""Prometheus metrics shared by both services: the ``/metrics`` HTTP endpoint
and what their collectors are built from.

Both services count with plain ints and fixed-bucket ``Histogram``s on the
event loop, and a ``Collector`` turns them into metric families only when
scraped: the request path never touches a prometheus_client label lookup or
lock. The endpoint runs on the service's own event loop
(``asyncio.start_server``), not on a thread, so collectors read that state
from the thread that writes it: no lock, no read racing a write. A scrape may
first await ``before_scrape`` (the control plane reads its store there, on
the store's thread pool), so the loop is never blocked by I/O.

Each server has its own ``CollectorRegistry``: several services may run in
one process (the tests do), and each exports only its own numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from spendgate.domain.limits import MAX_LABEL_CHARS
from spendgate.settings import ConfigError, parse_host_port
from spendgate.visible import visible

log = structlog.get_logger("spendgate.metrics")
NANOS = 1e9  # nanoseconds per second, nano-dollars per USD
REQUEST_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 16 * 1024
_INDEX = b"spendgate metrics: see /metrics\n"


class Histogram:
    """A fixed-bucket histogram of integer values (e.g. nanoseconds).

    ``counts[i]`` holds the values ``<= bounds[i]`` and above the bound
    before it (not cumulative); the last slot holds those above every bound.
    ``observe`` is one bisect and two additions.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[int, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0

    def observe(self, value: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self, scale: float = NANOS) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, bounds divided by ``scale``."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, None), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound is None else repr(bound / scale), total))
        return out


def label_values(values: Iterable[str]) -> list[str]:
    """Label values safe to expose: control characters escaped (the text
    format escapes only backslash, quote and newline), clipped."""
    return [visible(v, MAX_LABEL_CHARS) for v in values]


def histogram_family(
    name: str, doc: str, labels: list[str], histograms: Iterable[tuple[Sequence[str], Histogram]]
) -> HistogramMetricFamily:
    """One family from (label values, histogram of nanoseconds) pairs."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in histograms:
        family.add_metric(label_values(values), h.buckets(), h.sum / NANOS)
    return family


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


F = TypeVar("F", CounterMetricFamily, GaugeMetricFamily)


def labelled(family: F, samples: Iterable[tuple[Sequence[str], float]]) -> F:
    """``family`` with one sample per (label values, value) pair."""
    for values, value in samples:
        family.add_metric(label_values(values), value)
    return family


def task_failures(failures: Mapping[str, int]) -> CounterMetricFamily:
    """``spendgate_task_failures_total{task}`` from a Supervisor's counts
    (spendgate/supervise.py); every task started so far, failed or not."""
    return labelled(
        CounterMetricFamily(
            "spendgate_task_failures",
            "Failures of supervised background tasks, by task (each was logged at error "
            "level and restarted).",
            labels=["task"],
        ),
        [((name,), n) for name, n in sorted(failures.items())],
    )


async def start_metrics(server: MetricsServer, listen: str) -> None:
    """Start ``server``; an address that cannot be bound is a ConfigError
    naming metrics_listen (a port in use is a configuration problem)."""
    try:
        await server.start()
    except OSError as e:
        raise ConfigError(f"metrics_listen {listen!r}: {e.strerror or e}") from e


class MetricsServer:
    """Serves ``registry`` at ``GET /metrics`` on ``listen`` (``host:port``).

    ``port`` is the bound port once ``start`` returned (a ``listen`` port of
    0 binds an ephemeral one). Not thread-safe: use it from one event loop.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: str,
        *,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.host, self.port = parse_host_port(listen)
        self.before_scrape = before_scrape
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host or None, self.port, limit=MAX_REQUEST_BYTES
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            status, headers, body = await self._answer(reader)
            head = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
            head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(head).encode("latin-1") + body)
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return "400 Bad Request", {}, b""
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return "400 Bad Request", {}, b""
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", {"Allow": "GET, HEAD"}, b""
        path = target.split("?", 1)[0]
        if path == "/":
            return "200 OK", {"Content-Type": "text/plain; charset=utf-8"}, _INDEX
        if path != "/metrics":
            return "404 Not Found", {}, b""
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        if self.before_scrape is not None:
            await self.before_scrape()
        encode, content_type = choose_encoder(accept)
        body = encode(self.registry)
        return "200 OK", {"Content-Type": content_type}, b"" if method == "HEAD" else body
