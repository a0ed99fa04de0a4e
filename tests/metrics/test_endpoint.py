"""The /metrics endpoint, the metrics_listen setting and the building blocks
(fixed-bucket histograms, operation labels, sync lag), without a stack."""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import Any

import pytest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

import control_plane.__main__ as cp_main
import ext_proc.__main__ as ep_main
from control_plane.config import Settings as CPSettings
from control_plane.config import load_settings as load_cp
from control_plane.metrics import operation_name
from ext_proc import metrics as ep_metrics
from ext_proc.config import Settings as EPSettings
from ext_proc.config import load_settings as load_ep
from spendgate.metrics import Histogram, MetricsServer, start_metrics
from spendgate.settings import ConfigError

CP = {"admin_token": "a" * 20}
EP = {"data_plane_token": "d" * 20}
CP_ENV = {"SPENDGATE_ADMIN_TOKEN": "a" * 20}
EP_ENV = {"SPENDGATE_DATA_PLANE_TOKEN": "d" * 20}


class One(Collector):
    def collect(self) -> Any:
        yield CounterMetricFamily("spendgate_test_things", "Things.", value=3)


async def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


@pytest.fixture
async def server() -> Any:
    registry = CollectorRegistry()
    registry.register(One())
    scrapes: list[int] = []

    async def before() -> None:
        scrapes.append(1)

    s = MetricsServer(registry, "127.0.0.1:0", before_scrape=before)
    await s.start()
    s.scrapes = scrapes  # type: ignore[attr-defined]
    yield s
    await s.stop()


async def test_metrics_are_served_on_an_ephemeral_port(server: MetricsServer) -> None:
    assert server.port > 0
    status, headers, body = await http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["content-length"]) == len(body)
    assert b"\nspendgate_test_things_total 3.0\n" in body
    assert server.scrapes == [1]  # type: ignore[attr-defined]


async def test_openmetrics_when_asked(server: MetricsServer) -> None:
    accept = b"Accept: application/openmetrics-text; version=1.0.0\r\n"
    status, headers, body = await http(server.port, b"GET /metrics HTTP/1.1\r\n" + accept + b"\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET /other HTTP/1.1", "HTTP/1.1 404 Not Found"),
        (b"POST /metrics HTTP/1.1", "HTTP/1.1 405 Method Not Allowed"),
        (b"GET / HTTP/1.1", "HTTP/1.1 200 OK"),
        (b"nonsense", "HTTP/1.1 400 Bad Request"),
    ],
    ids=["unknown-path", "post", "index", "garbage"],
)
async def test_other_requests(server: MetricsServer, request_line: bytes, status: str) -> None:
    got, _, _ = await http(server.port, request_line + b"\r\n\r\n")
    assert got == status
    assert server.scrapes == []  # type: ignore[attr-defined]


async def test_head_has_no_body(server: MetricsServer) -> None:
    status, _, body = await http(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert (status, body) == ("HTTP/1.1 200 OK", b"")


async def test_a_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        server = MetricsServer(CollectorRegistry(), address)
        with pytest.raises(ConfigError, match=f"metrics_listen '{address}'"):
            await start_metrics(server, address)


@pytest.mark.parametrize(
    "value", ["", "127.0.0.1:9464", "0.0.0.0:0", ":9464", "[::1]:9464", "localhost:1"]
)
@pytest.mark.parametrize("make", [CPSettings, EPSettings], ids=["control_plane", "ext_proc"])
def test_metrics_listen_accepts(make: Any, value: str) -> None:
    tokens = CP if make is CPSettings else EP
    assert make(**tokens, metrics_listen=value).metrics_listen == value


@pytest.mark.parametrize(
    "value",
    ["9464", "localhost", "host:port", "host:70000", "::1:9464", "[::1:9464", "h:-1"],
)
@pytest.mark.parametrize("make", [CPSettings, EPSettings], ids=["control_plane", "ext_proc"])
def test_metrics_listen_rejects(make: Any, value: str) -> None:
    tokens = CP if make is CPSettings else EP
    with pytest.raises(ConfigError, match=r"^metrics_listen: "):
        make(**tokens, metrics_listen=value)


def test_defaults_and_environment() -> None:
    assert load_cp(env=CP_ENV).metrics_listen == "127.0.0.1:9464"
    assert load_ep(env=EP_ENV).metrics_listen == "127.0.0.1:9465"
    env = {**CP_ENV, **EP_ENV, "SPENDGATE_METRICS_LISTEN": ""}
    assert load_cp(env=env).metrics_listen == load_ep(env=env).metrics_listen == ""
    env["SPENDGATE_EXT_PROC_METRICS_LISTEN"] = "0.0.0.0:9100"
    assert load_ep(env=env).metrics_listen == "0.0.0.0:9100"
    assert load_cp(env=env).metrics_listen == ""


@pytest.mark.parametrize("main", [cp_main.main, ep_main.main], ids=["control_plane", "ext_proc"])
def test_the_flag_reaches_the_setting(
    main: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in (*CP_ENV.items(), *EP_ENV.items()):
        monkeypatch.setenv(name, value)
    assert main(["--metrics-listen", "nowhere"]) == 2
    assert "bad configuration: metrics_listen: " in capsys.readouterr().err


def test_histogram_buckets_are_upper_bounds_inclusive() -> None:
    h = Histogram((10, 100))
    for value in (0, 10, 11, 100, 101, 5000):
        h.observe(value)
    assert h.counts == [2, 2, 2]
    assert h.sum == 5222
    assert h.buckets(scale=1) == [("10.0", 2), ("100.0", 4), ("+Inf", 6)]


def apply(session: object) -> None:
    pass


class Service:
    def apply_usage(self) -> Any:
        def apply(session: object) -> None:
            pass

        return apply

    def snapshot(self) -> Any:
        return lambda s: s

    def _forget_old_deliveries(self) -> Any:
        return lambda s: s


@pytest.mark.parametrize(
    ("fn", "label"),
    [
        (apply, "apply"),
        (functools.partial(apply), "apply"),
        (Service().apply_usage(), "apply_usage"),
        (Service().snapshot(), "snapshot"),
        (Service()._forget_old_deliveries(), "forget_old_deliveries"),
    ],
    ids=["function", "partial", "nested", "lambda", "private"],
)
def test_store_operations_are_labelled_by_use_case(fn: Any, label: str) -> None:
    assert operation_name(fn) == label


def test_sync_lag_is_zero_in_sync_and_counts_from_the_last_moment_it_was() -> None:
    now = [1000.0]
    sync = ep_metrics.SyncStatus(clock=lambda: now[0])
    now[0] += 7
    assert sync.lag_seconds() == 7  # never in sync: since start
    sync.set(connected=True)
    assert sync.lag_seconds() == 0
    now[0] += 60
    sync.set(backlog=True)  # a batch could not be delivered
    now[0] += 3
    assert sync.lag_seconds() == 3
    sync.set(connected=False)  # still out of sync: the clock keeps running
    now[0] += 2
    assert sync.lag_seconds() == 5
    sync.set(connected=True, backlog=False)
    assert sync.lag_seconds() == 0


def test_collectors_only_render_what_was_counted() -> None:
    """The ext_proc collector turns plain counters into families at scrape
    time; nothing is registered per label value on the request path."""
    from ext_proc.stats import Stats
    from ext_proc.sync.state import LocalState
    from spendgate.domain.usage import Usage

    stats = Stats()
    stats.count_rejection("bp_1", "budget_exceeded")
    stats.count_metered(("openai", "openai_chat", "gpt-4o"), Usage(10, output_tokens=5), 1234)
    stats.observe_message("request_headers", 30_000)
    families: dict[str, Metric] = {
        f.name: f
        for f in ep_metrics.ExtProcCollector(stats, LocalState(), ep_metrics.SyncStatus()).collect()
    }
    [rejected] = families["spendgate_ext_proc_requests_rejected"].samples
    assert (rejected.labels, rejected.value) == (
        {"policy_id": "bp_1", "reason": "budget_exceeded"},
        1,
    )
    cost = families["spendgate_ext_proc_cost_usd"].samples
    assert [(s.labels["model"], s.value) for s in cost] == [("gpt-4o", 1234 / 1e9)]
    buckets = {
        s.labels["le"]: s.value
        for s in families["spendgate_ext_proc_decision_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["phase"] == "request_headers"
    }
    assert (buckets["2.5e-05"], buckets["5e-05"], buckets["+Inf"]) == (0, 1, 1)


def test_the_request_path_never_touches_prometheus_client() -> None:
    """processor.py and stats.py count with plain ints; only the collector
    (run at scrape time) builds prometheus_client objects."""
    import ext_proc.protocol.processor
    import ext_proc.stats

    for module in (ext_proc.protocol.processor, ext_proc.stats):
        assert module.__file__ is not None
        with open(module.__file__) as f:
            assert "prometheus" not in f.read(), module.__name__
