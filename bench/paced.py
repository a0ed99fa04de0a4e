"""Paced streams, the way LLM answers arrive: ``concurrency`` OpenAI chat
streams at once, each of ``events`` SSE events written ``delay_ms`` apart by
the fake provider (a process of its own), read by a minimal asyncio HTTP/1.1
client so that the client costs little next to what it measures.

Each event carries the CLOCK_MONOTONIC time at which the provider wrote it
(the provider's ``x-fake-stamp``), so the client knows each event's transit
time through Envoy (and ext_proc): the added time per event is the transit
through spendgate's Envoy minus the transit through plain Envoy in the same run.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from dataclasses import dataclass, field

from bench.procstat import cpu_seconds

BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "stream please"}],
    }
).encode()
_STAMP = re.compile(rb": t=(\d+)\n")


@dataclass
class PacedResult:
    """Times in milliseconds; ``transit_ms`` one per event, ``ttfb_ms`` one per stream."""

    streams: int = 0
    events: int = 0
    errors: int = 0
    seconds: float = 0.0
    ttfb_ms: list[float] = field(default_factory=list)
    transit_ms: list[float] = field(default_factory=list)
    gap_ms: list[float] = field(default_factory=list)


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (0 < p < 100) of ``values``; 0.0 when there are fewer than two."""
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def _request(host: str, port: int, events: int, delay_ms: int) -> bytes:
    headers = {
        "host": f"{host}:{port}",
        "content-type": "application/json",
        "content-length": str(len(BODY)),
        "authorization": "Bearer sk-bench",
        "x-spendgate-user": "bench-user",
        "x-spendgate-tags": "team=bench",
        "x-fake-chunks": str(events),
        "x-fake-chunk-delay-ms": str(delay_ms),
        "x-fake-stamp": "1",
        "connection": "close",
    }
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /demo/v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode() + BODY


async def _one(host: str, port: int, request: bytes, out: PacedResult) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        sent = time.monotonic_ns()
        writer.write(request)
        buf = b""
        first = 0
        last = 0
        ok = False
        while True:
            data = await reader.read(65536)
            if not data:
                break
            now = time.monotonic_ns()
            if not ok:
                ok = data.startswith(b"HTTP/1.1 200")
            buf += data
            # Events end at "\n\n" (the chunked framing around them uses "\r\n").
            *complete, buf = buf.split(b"\n\n")
            for event in complete:
                m = _STAMP.search(event)
                if m is None:
                    continue
                if not first:
                    first = now
                    out.ttfb_ms.append((now - sent) / 1e6)
                else:
                    out.gap_ms.append((now - last) / 1e6)
                last = now
                out.transit_ms.append((now - int(m.group(1))) / 1e6)
                out.events += 1
        if ok and first:
            out.streams += 1
        else:
            out.errors += 1
    finally:
        writer.close()


async def _run(
    host: str, port: int, *, concurrency: int, streams: int, events: int, delay_ms: int
) -> PacedResult:
    out = PacedResult()
    request = _request(host, port, events, delay_ms)
    todo = iter(range(streams))

    async def worker(k: int) -> None:
        # Spread the streams over one pacing period, as independent clients
        # would be, rather than all writing in the same millisecond.
        await asyncio.sleep(k * delay_ms / 1000 / concurrency)
        for _ in todo:
            await _one(host, port, request, out)

    start = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    out.seconds = time.monotonic() - start
    return out


def run(
    base_url: str, *, concurrency: int, streams: int, events: int, delay_ms: int
) -> PacedResult:
    """``streams`` streams of ``events`` events each, ``concurrency`` at a time."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    return asyncio.run(
        _run(
            host,
            int(port),
            concurrency=concurrency,
            streams=streams,
            events=events,
            delay_ms=delay_ms,
        )
    )


@dataclass(frozen=True)
class Target:
    """One Envoy to stream through, and the ext_proc processes behind it (none for plain)."""

    name: str
    base_url: str
    envoy_pid: int
    ext_proc_pids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Measured:
    target: Target
    result: PacedResult
    envoy_cpu_s: float
    ext_proc_cpu_s: float


def measure(
    target: Target, *, concurrency: int, streams: int, events: int, delay_ms: int
) -> Measured:
    """Stream through ``target``, with the CPU its Envoy and ext_proc used meanwhile."""
    envoy0 = cpu_seconds(target.envoy_pid)
    ep0 = sum(map(cpu_seconds, target.ext_proc_pids))
    result = run(
        target.base_url,
        concurrency=concurrency,
        streams=streams,
        events=events,
        delay_ms=delay_ms,
    )
    return Measured(
        target,
        result,
        cpu_seconds(target.envoy_pid) - envoy0,
        sum(map(cpu_seconds, target.ext_proc_pids)) - ep0,
    )


def table(title: str, runs: list[Measured]) -> list[str]:
    """Rows comparing ``runs`` (the first is plain Envoy) side by side; ``added``
    columns are each run minus the first."""
    widths = (30, *(12 for _ in runs), *(12 for _ in runs[1:]))

    def line(*cells: object) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    def us(seconds: float, count: int) -> str:
        return f"{seconds * 1e6 / count:.1f}" if count else "-"

    out = [
        title,
        line("", *(m.target.name for m in runs), *(f"+{m.target.name}" for m in runs[1:])),
    ]
    out.append(line("streams (errors)", *(f"{m.result.streams} ({m.result.errors})" for m in runs)))
    out.append(line("events/s", *(f"{m.result.events / m.result.seconds:,.0f}" for m in runs)))
    for name, attribute in (
        ("time to first byte", "ttfb_ms"),
        ("time per event", "transit_ms"),
        ("time between events", "gap_ms"),
    ):
        for p in (50, 99):
            cells = [pct(getattr(m.result, attribute), p) for m in runs]
            added = [f"{c - cells[0]:+.3f}" for c in cells[1:]]
            out.append(line(f"{name} p{p} ms", *(f"{c:.3f}" for c in cells), *added))
    out.append(line("Envoy CPU µs / event", *(us(m.envoy_cpu_s, m.result.events) for m in runs)))
    out.append(
        line(
            "ext_proc CPU µs / event",
            "-",
            *(us(m.ext_proc_cpu_s, m.result.events) for m in runs[1:]),
        )
    )
    out.append(
        line(
            "streams/s per ext_proc core",
            "-",
            *(
                f"{m.result.streams / m.ext_proc_cpu_s:,.1f}" if m.ext_proc_cpu_s else "-"
                for m in runs[1:]
            ),
        )
    )
    return out


def compare(
    targets: list[Target], *, concurrency: int, streams: int, events: int, delay_ms: int
) -> list[str]:
    """Each target in turn (after a short warm-up of each), then the table."""
    for t in targets:
        run(t.base_url, concurrency=2, streams=2, events=5, delay_ms=1)
    runs = [
        measure(t, concurrency=concurrency, streams=streams, events=events, delay_ms=delay_ms)
        for t in targets
    ]
    title = (
        f"paced streams: {streams} streams, {concurrency} at a time, "
        f"{events} events {delay_ms} ms apart"
    )
    return table(title, runs)
