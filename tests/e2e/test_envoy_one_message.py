"""What the real Envoy (the version spendgate ships with) sends ext_proc when
headers are skipped and the body is buffered: can headers and body reach
ext_proc in one message, saving a blocking round trip per request?

Pinned here so that an Envoy upgrade that changes any of it fails loudly:

- request_header_mode SEND (spendgate's mode): a request_headers message (with
  the request attributes), then a request_body message (without them).
- request_header_mode SKIP + request_body_mode BUFFERED: one request_body
  message, carrying the request attributes. Single headers come through as CEL
  expressions (``request.headers["authorization"]``); the whole map
  ``request.headers`` does not (it arrives as the text "CelMap value").
- ...but a request without a body then never reaches ext_proc at all: it goes
  upstream unchecked. That is why spendgate keeps SEND: admission must see
  every request (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format

from spendgate.demo.fake_provider import FakeProviderServer
from tests.harness import EnvoyProcess, tempdir

pytestmark = pytest.mark.e2e
ATTRIBUTES = [
    "request.method",
    "request.path",
    'request.headers["authorization"]',
    'request.headers["x-spendgate-user"]',
    "request.headers",
]
FILTER = "envoy.filters.http.ext_proc"


@dataclass(frozen=True)
class Seen:
    kind: str
    attributes: dict[str, Any]
    end_of_stream: bool | None


class Recorder(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """An ext_proc that writes down each message and lets it continue."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    def Process(self, requests: Iterator[ep.ProcessingRequest], context: Any) -> Iterator[Any]:
        for req in requests:
            kind = req.WhichOneof("request")
            body = getattr(req, kind)
            self.seen.append(
                Seen(
                    kind,
                    {k: json_format.MessageToDict(v) for k, v in req.attributes.items()},
                    body.end_of_stream if kind.endswith("_body") else None,
                )
            )
            answer = ep.ProcessingResponse()
            getattr(answer, kind).SetInParent()  # continue unchanged
            yield answer


def _config(ext_proc_port: int, upstream_port: int, header_mode: str) -> dict[str, Any]:
    def cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
        endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            },
            **extra,
        }

    h2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}},
        "processing_mode": {
            "request_header_mode": header_mode,
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SKIP",
            "response_body_mode": "NONE",
        },
        "request_attributes": ATTRIBUTES,
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network"
        ".http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "probe",
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
            {"name": FILTER, "typed_config": ext_proc},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    listen = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "probe",
                    "address": listen,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("upstream", upstream_port),
                cluster("ext_proc", ext_proc_port, typed_extension_protocol_options=h2),
            ],
        },
    }


@dataclass
class Probe:
    header_mode: str  # request_header_mode: "SEND" or "SKIP"
    recorder: Recorder
    envoy: EnvoyProcess

    def send(self, body: bytes | None) -> list[Seen]:
        self.recorder.seen.clear()
        headers = {"authorization": "Bearer sk-probe", "x-spendgate-user": "alice"}
        if body is not None:
            headers["content-type"] = "application/json"
        r = httpx.post(
            self.envoy.base_url + "/v1/chat/completions", content=body, headers=headers, timeout=10
        )
        assert r.status_code in (200, 400), r.text  # 400: the provider's answer to no body
        return list(self.recorder.seen)


@pytest.fixture(scope="module", params=["SEND", "SKIP"])
def probe(request: pytest.FixtureRequest) -> Iterator[Probe]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    ep_grpc.add_ExternalProcessorServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    upstream = FakeProviderServer()
    upstream.start_in_thread()
    envoy = EnvoyProcess(_config(port, upstream.port, request.param), tempdir())
    try:
        yield Probe(request.param, recorder, envoy)
    finally:
        envoy.stop()
        server.stop(0)
        upstream.shutdown()
        upstream.server_close()


BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
EXPECTED_ATTRIBUTES = {
    FILTER: {
        "request.method": "POST",
        "request.path": "/v1/chat/completions",
        'request.headers["authorization"]': "Bearer sk-probe",
        'request.headers["x-spendgate-user"]': "alice",
        "request.headers": "CelMap value",  # the map itself is not sent
    }
}


def test_what_envoy_sends_for_a_request_with_a_body(probe: Probe) -> None:
    seen = probe.send(BODY)
    if probe.header_mode == "SEND":
        assert seen == [
            Seen("request_headers", EXPECTED_ATTRIBUTES, None),
            Seen("request_body", {}, True),
        ]
    else:  # one message: the body, with the headers asked for as attributes
        assert seen == [Seen("request_body", EXPECTED_ATTRIBUTES, True)]


def test_what_envoy_sends_for_a_request_without_a_body(probe: Probe) -> None:
    seen = probe.send(None)
    if probe.header_mode == "SEND":
        assert [s.kind for s in seen] == ["request_headers"]
    else:  # nothing at all: the request went upstream without ext_proc
        assert seen == []
