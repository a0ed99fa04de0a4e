"""Time to first byte and total time of a ~100-chunk SSE response."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import httpx

BODY = {
    "model": "gpt-4o-mini",
    "stream": True,
    "messages": [{"role": "user", "content": "stream please"}],
}


@dataclass(frozen=True)
class StreamResult:
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    total_p50_ms: float
    total_p99_ms: float


def _pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def measure(base_url: str, *, requests: int = 200, chunks: int = 100) -> StreamResult:
    ttfb: list[float] = []
    total: list[float] = []
    headers = {"x-fake-chunks": str(chunks), "x-spendgate-user": "bench-user"}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for i in range(requests + 10):
            start = time.perf_counter()
            with client.stream(
                "POST", "/demo/v1/chat/completions", json=BODY, headers=headers
            ) as r:
                it = r.iter_raw()
                next(it)
                first = time.perf_counter()
                for _ in it:
                    pass
            end = time.perf_counter()
            if i >= 10:  # warm-up
                ttfb.append((first - start) * 1000)
                total.append((end - start) * 1000)
    return StreamResult(_pct(ttfb, 50), _pct(ttfb, 99), _pct(total, 50), _pct(total, 99))
