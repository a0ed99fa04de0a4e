"""Load an Envoy bootstrap from envoy/ and adapt it to a run: ports and,
for the demo and the tests, the provider clusters' addresses.

The YAML files in envoy/ stay complete and valid on their own (the tests run
``envoy --mode validate`` on each); this only rewrites values in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from spendgate.upstreams import Upstream

ROOT = Path(__file__).resolve().parent.parent
LOCAL_BOOTSTRAP = ROOT / "envoy" / "envoy.yaml"
EXT_PROC_CLUSTER = "spendgate_ext_proc"
DEMO_CLUSTER = "demo_provider"


def load(path: Path = LOCAL_BOOTSTRAP) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _static(name: str, host: str, port: int, hostname: str = "") -> dict[str, Any]:
    endpoint: dict[str, Any] = {
        "address": {"socket_address": {"address": host, "port_value": port}}
    }
    if hostname:
        # What `auto_host_rewrite` writes into Host, as it would for the real cluster.
        endpoint["hostname"] = hostname
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
    }


def _dns_name(cluster: dict[str, Any]) -> str:
    """The host name a LOGICAL_DNS / STRICT_DNS cluster resolves, else ""."""
    if cluster.get("type") not in ("LOGICAL_DNS", "STRICT_DNS"):
        return ""
    ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    return str(ep["address"]["socket_address"]["address"])


def adapt(
    config: dict[str, Any],
    *,
    listen_port: int | None = None,
    admin_port: int | None = None,
    ext_proc: tuple[str, int] | None = None,
    providers_to: tuple[str, int] | None = None,
    demo_to: tuple[str, int] | None = None,
    upstreams: Mapping[str, Upstream] | None = None,
) -> dict[str, Any]:
    """Return ``config`` with the given addresses replaced.

    providers_to: send every provider cluster (not ext_proc) to this plain-HTTP
    address instead, e.g. a local fake provider; routes that rewrite Host from
    the cluster (`auto_host_rewrite`) still send the provider's host name.
    upstreams: send these provider clusters (by name) to another origin, with
    TLS (SNI = its host) or without, and Host rewritten to it.
    """
    if listen_port is not None:
        config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = (
            listen_port
        )
    if admin_port is not None:
        config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    clusters = config["static_resources"]["clusters"]
    for i, cluster in enumerate(clusters):
        name = cluster["name"]
        if name == EXT_PROC_CLUSTER:
            if ext_proc is not None:
                ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
                ep["address"]["socket_address"] = {
                    "address": ext_proc[0],
                    "port_value": ext_proc[1],
                }
        elif name == DEMO_CLUSTER and demo_to is not None:
            clusters[i] = _static(name, *demo_to)
        elif upstreams and name in upstreams:
            _send_to(cluster, upstreams[name])
        elif providers_to is not None:
            clusters[i] = _static(name, *providers_to, hostname=_dns_name(cluster))
    for name, upstream in (upstreams or {}).items():
        for route in _routes_to(config, name):
            # Host names the new origin: a virtual host there (vLLM behind a
            # proxy, an Azure resource) answers to its own name only.
            route.pop("auto_host_rewrite", None)
            route["host_rewrite_literal"] = upstream.authority
    return config


def provider_clusters(config: dict[str, Any]) -> list[str]:
    """The clusters that reach an LLM provider (what --upstream may name)."""
    return [
        c["name"]
        for c in config["static_resources"]["clusters"]
        if c["name"] not in (EXT_PROC_CLUSTER, DEMO_CLUSTER)
    ]


def _routes_to(config: dict[str, Any], cluster: str) -> Iterator[dict[str, Any]]:
    for listener in config["static_resources"]["listeners"]:
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                rc = f.get("typed_config", {}).get("route_config", {})
                for vhost in rc.get("virtual_hosts", []):
                    for r in vhost.get("routes", []):
                        if r.get("route", {}).get("cluster") == cluster:
                            yield r["route"]


def _send_to(cluster: dict[str, Any], upstream: Upstream) -> None:
    cluster["type"] = "STATIC" if upstream.is_ip else "LOGICAL_DNS"
    address = {"address": upstream.host, "port_value": upstream.port}
    endpoint = {"address": {"socket_address": address}}
    cluster["load_assignment"] = {
        "cluster_name": cluster["name"],
        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
    }
    if not upstream.tls:
        cluster.pop("transport_socket", None)
        return
    tls: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    }
    if not upstream.is_ip:  # SNI carries host names only (RFC 6066)
        tls["sni"] = upstream.host
    cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}


class _Dumper(yaml.SafeDumper):
    """Writes what an anchor in envoy/envoy.yaml shares out in full at each use."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(config: dict[str, Any]) -> str:
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False)


def write(config: dict[str, Any], path: Path) -> Path:
    path.write_text(dump(config))
    return path


COMPOSE_BOOTSTRAP = ROOT / "envoy" / "envoy-compose.yaml"
COMPOSE_HEADER = """\
# spendgate: Envoy bootstrap for docker-compose.yml — GENERATED from
# envoy/envoy.yaml by `python -m spendgate.envoy_config` (a test checks it).
# Same routes and ext_proc filter; addresses are compose service names, and
# the listener and admin bind every interface inside the container. The
# spendgate_ext_proc cluster holds both ext_proc containers: each HTTP request
# (one ext_proc stream) goes to one of them, round robin, and an ext_proc that
# fails its gRPC health check gets no new requests.
# Fail-open/closed: see `failure_mode_allow` and the notes in envoy/envoy.yaml.
"""
# docker-compose.yml services Envoy sends to, with the ports they listen on
# (tests/deploy/test_compose.py checks them against the compose file).
COMPOSE_EXT_PROCS = (("ext-proc-1", 50052), ("ext-proc-2", 50052))
COMPOSE_DEMO_PROVIDER = ("demo-provider", 18080)


def _endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}


def set_ext_proc_endpoints(config: dict[str, Any], addresses: list[tuple[str, int]]) -> None:
    """Point the ext_proc cluster at several ext_proc processes (Envoy spreads
    the streams over them)."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == EXT_PROC_CLUSTER:
            cluster["load_assignment"]["endpoints"] = [
                {"lb_endpoints": [_endpoint(h, p) for h, p in addresses]}
            ]


def compose_variant(config: dict[str, Any]) -> dict[str, Any]:
    """The local bootstrap adapted to docker-compose's network."""
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] = "0.0.0.0"
    config["admin"]["address"]["socket_address"]["address"] = "0.0.0.0"
    services = {EXT_PROC_CLUSTER: COMPOSE_EXT_PROCS, "demo_provider": (COMPOSE_DEMO_PROVIDER,)}
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in services:
            cluster["type"] = "STRICT_DNS"
            cluster["load_assignment"]["endpoints"] = [
                {"lb_endpoints": [_endpoint(h, p) for h, p in services[cluster["name"]]]}
            ]
        if cluster["name"] == EXT_PROC_CLUSTER:
            # gRPC health "" of each ext_proc; a failing one gets no new streams.
            cluster["health_checks"] = [
                {
                    "timeout": "1s",
                    "interval": "2s",
                    "unhealthy_threshold": 2,
                    "healthy_threshold": 1,
                    "grpc_health_check": {},
                }
            ]
    return config


def compose_text() -> str:
    return COMPOSE_HEADER + dump(compose_variant(load()))


if __name__ == "__main__":
    COMPOSE_BOOTSTRAP.write_text(compose_text())
    print(f"wrote {COMPOSE_BOOTSTRAP}")
