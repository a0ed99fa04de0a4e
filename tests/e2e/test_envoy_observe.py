"""What the real Envoy (the version spendgate ships with) does with an ext_proc
filter in ``observability_mode`` behind the admission filter, the layout of
response_metering: observe (envoy/envoy.yaml, ext_proc/protocol/handoff.py).

Pinned so that an Envoy upgrade that changes any of it fails loudly:

- the observing filter's first message, request_headers, comes only after the
  admission filter answered the request's last message, and every message of
  the observing stream carries the dynamic metadata of that answer;
- response chunks reach the client while the observing ext_proc has not even
  read them: nothing waits for it;
- a response cut short: Envoy ends the observing stream (no ``end_of_stream``
  chunk came) ``deferred_close_timeout`` after the request ended;
- a request the admission filter refused (its local reply) reaches the
  observing filter as response headers and body, without the metadata;
- behind envoy/envoy.yaml's matcher (ExtensionWithMatcher, SkipFilter unless
  the request header x-spendgate-meter is "observe"), the observing filter
  runs only for requests whose admission answer set that header: a header
  set in the answer to the request *body* is seen by the matcher.

Each test runs with the observer bare and behind that matcher.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format

from spendgate.demo.fake_provider import FakeProviderServer
from tests.harness import EnvoyProcess, tempdir, wait_until

pytestmark = pytest.mark.e2e
T = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
HEADERS = {"authorization": "Bearer sk-probe", "content-type": "application/json"}


@dataclass
class Log:
    lock: threading.Lock = field(default_factory=threading.Lock)
    events: list[tuple[str, ...]] = field(default_factory=list)
    # Set by the test: the observer reads its first response chunk only then.
    release: threading.Event = field(default_factory=threading.Event)

    def add(self, *event: str) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, who: str) -> list[tuple[str, ...]]:
        with self.lock:
            return [e[1:] for e in self.events if e[0] == who]


class Admission(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Answers each message with metadata naming it; refuses x-refuse."""

    def __init__(self, log: Log) -> None:
        self.log = log

    def Process(self, requests: Iterator[ep.ProcessingRequest], context: Any) -> Iterator[Any]:
        for req in requests:
            kind = req.WhichOneof("request")
            self.log.add("admission", kind)
            answer = ep.ProcessingResponse()
            if kind == "request_headers" and any(
                h.key == "x-refuse" for h in req.request_headers.headers.headers
            ):
                answer.immediate_response.status.code = 429
                yield answer
                return
            getattr(answer, kind).SetInParent()
            answer.dynamic_metadata.update({"spendgate": {"answered": kind}})
            if kind == "request_body" and b'"stream":true' in req.request_body.body:
                mark = answer.request_body.response.header_mutation.set_headers.add()
                mark.header.key, mark.header.raw_value = "x-spendgate-meter", b"observe"
            self.log.add("admission", f"answered {kind}")
            yield answer
            if kind == "request_body":
                return


class Observer(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, log: Log) -> None:
        self.log = log

    def Process(self, requests: Iterator[ep.ProcessingRequest], context: Any) -> Iterator[Any]:
        try:  # Envoy ends the stream with a half-close or a reset: either counts
            for req in requests:
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    probe = [h.raw_value for h in req.request_headers.headers.headers]
                    self.log.add("probe", *(p.decode() for p in probe if p.startswith(b"probe-")))
                md = json_format.MessageToDict(req.metadata_context)
                answered = md.get("filterMetadata", {}).get("spendgate", {}).get("answered", "")
                eos = str(getattr(req, kind).end_of_stream) if kind.endswith("body") else ""
                if kind == "response_body" and not self.log.release.wait(10):
                    self.log.add("observer", "never released")
                self.log.add("observer", kind, answered, eos, str(req.observability_mode))
        except grpc.RpcError:
            pass
        finally:
            self.log.add("observer", "ended")
        return
        yield  # a generator that answers nothing


# envoy/envoy.yaml's matcher: the metering filter only for marked requests.
SKIP_UNLESS_MARKED = {
    "matcher_list": {
        "matchers": [
            {
                "predicate": {
                    "not_matcher": {
                        "single_predicate": {
                            "input": {
                                "name": "meter",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.type.matcher.v3"
                                    ".HttpRequestHeaderMatchInput",
                                    "header_name": "x-spendgate-meter",
                                },
                            },
                            "value_match": {"exact": "observe"},
                        }
                    }
                },
                "on_match": {
                    "action": {
                        "name": "skip",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.common"
                            ".matcher.action.v3.SkipFilter"
                        },
                    }
                },
            }
        ]
    }
}


def _config(admission: int, observer: int, upstream: int, matched: bool = False) -> dict[str, Any]:
    def cluster(name: str, port: int, h2: bool) -> dict[str, Any]:
        endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
        c: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            },
        }
        if h2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                    ".HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return c

    admit = {
        "@type": T,
        "grpc_service": {"envoy_grpc": {"cluster_name": "admission"}},
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SKIP",
            "response_body_mode": "NONE",
        },
        "metadata_options": {"receiving_namespaces": {"untyped": ["spendgate"]}},
    }
    observe = {
        "@type": T,
        "grpc_service": {"envoy_grpc": {"cluster_name": "observer"}},
        "observability_mode": True,
        "deferred_close_timeout": "0.2s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_header_mode": "SEND",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "metadata_options": {"forwarding_namespaces": {"untyped": ["spendgate"]}},
    }
    router = {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network"
        ".http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "observe",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ]
        },
        "http_filters": [
            {"name": "admission", "typed_config": admit},
            {
                "name": "metering",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.common.matching.v3"
                    ".ExtensionWithMatcher",
                    "extension_config": {"name": "metering", "typed_config": observe},
                    "xds_matcher": SKIP_UNLESS_MARKED,
                }
                if matched
                else observe,
            },
            {"name": "envoy.filters.http.router", "typed_config": router},
        ],
    }

    def address() -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": 0}}

    manager = {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
    return {
        "admin": {"address": address()},
        "static_resources": {
            "listeners": [
                {"name": "l", "address": address(), "filter_chains": [{"filters": [manager]}]}
            ],
            "clusters": [
                cluster("upstream", upstream, False),
                cluster("admission", admission, True),
                cluster("observer", observer, True),
            ],
        },
    }


@dataclass
class Probe:
    log: Log
    envoy: EnvoyProcess
    matched: bool  # the observer behind envoy/envoy.yaml's matcher


@pytest.fixture(params=[False, True], ids=["always", "matched"])
def probe(request: pytest.FixtureRequest) -> Iterator[Probe]:
    log = Log()
    servers = []
    ports = []
    for servicer in (Admission(log), Observer(log)):
        server = grpc.server(futures.ThreadPoolExecutor(8))
        ep_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    upstream = FakeProviderServer()
    upstream.start_in_thread()
    envoy = EnvoyProcess(
        _config(ports[0], ports[1], upstream.port, matched=request.param), tempdir()
    )
    try:
        yield Probe(log, envoy, request.param)
    finally:
        log.release.set()
        envoy.stop()
        for server in servers:
            server.stop(0)
        upstream.shutdown()
        upstream.server_close()


def test_the_observer_sees_the_whole_exchange_after_admission_and_holds_nothing(
    probe: Probe,
) -> None:
    chunks = 4
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST",
            probe.envoy.base_url + "/v1/chat/completions",
            content=BODY,
            headers={**HEADERS, "x-fake-chunks": str(chunks)},
        ) as r,
    ):
        data = r.read()  # the observer has not read a single chunk yet
    assert r.status_code == 200 and data.count(b"data: ") >= chunks
    assert "response_body" not in [e[0] for e in probe.log.of("observer")]
    probe.log.release.set()
    wait_until(lambda: ("ended",) in probe.log.of("observer"), message="the end")
    events = probe.log.events
    first = next(i for i, e in enumerate(events) if e[0] == "observer")
    assert events.index(("admission", "answered request_body")) < first
    seen = probe.log.of("observer")
    assert seen[0] == ("request_headers", "request_body", "", "True")
    assert seen[1] == ("response_headers", "request_body", "", "True")
    body = [e for e in seen if e[0] == "response_body"]
    assert body[-1] == ("response_body", "request_body", "True", "True")
    assert all(e[1] == "request_body" for e in body)
    assert seen[-1] == ("ended",)


def test_envoy_ends_the_observing_stream_of_a_cut_response(probe: Probe) -> None:
    probe.log.release.set()
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST",
            probe.envoy.base_url + "/v1/chat/completions",
            content=BODY,
            headers={**HEADERS, "x-fake-chunks": "50", "x-fake-chunk-delay-ms": "50"},
        ) as r,
    ):
        next(r.iter_raw())  # the first event, then the client goes away
    wait_until(lambda: ("ended",) in probe.log.of("observer"), message="the close")
    seen = probe.log.of("observer")
    assert all(e[2] != "True" for e in seen if e[0] == "response_body")  # no end of stream


def test_a_refused_request_reaches_the_observer_without_metadata(probe: Probe) -> None:
    if probe.matched:
        pytest.skip("unmarked: the matcher skips the observer (next test)")
    probe.log.release.set()
    r = httpx.post(
        probe.envoy.base_url + "/v1/chat/completions",
        content=BODY,
        headers={**HEADERS, "x-refuse": "1"},
        timeout=10,
    )
    assert r.status_code == 429
    wait_until(lambda: ("ended",) in probe.log.of("observer"), message="the end")
    seen = probe.log.of("observer")
    assert seen[0] == ("response_headers", "", "", "True")
    assert "request_headers" not in [e[0] for e in seen]


def test_the_matcher_runs_the_observer_only_for_marked_requests(probe: Probe) -> None:
    """The admission answer's header x-spendgate-meter: observe turns the
    observer on (a stream); without it the observer is skipped (a JSON answer,
    metered on the admission stream)."""
    if not probe.matched:
        pytest.skip("no matcher")
    probe.log.release.set()
    url = probe.envoy.base_url + "/v1/chat/completions"
    json_body = BODY.replace(b'"stream":true', b'"stream":false')
    for body, name in ((json_body, "probe-json"), (BODY, "probe-stream")):
        r = httpx.post(url, content=body, headers={**HEADERS, "x-probe": name}, timeout=10)
        assert r.status_code == 200
    wait_until(lambda: ("ended",) in probe.log.of("observer"), message="the end")
    assert probe.log.of("probe") == [("probe-stream",)]
