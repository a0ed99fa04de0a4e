"""Load an Envoy bootstrap from envoy/ and adapt it to a run: ports and,
for the demo and the tests, the provider clusters' addresses.

The YAML files in envoy/ stay complete and valid on their own (the tests run
``envoy --mode validate`` on each); this only rewrites values in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from spendgate import providers as providers_file
from spendgate import upstream_tls
from spendgate import upstreams as upstream_flags
from spendgate.providers import Compatible, Providers
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
    # The bundle is the image's until generate() resolves this machine's.
    ca_file = upstream_tls.CONTAINER_CA_BUNDLE if upstream.verify else None
    tls = upstream_tls.tls_context(upstream.host, upstream.is_ip, ca_file)
    cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}


def _route_list(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes: list[dict[str, Any]] = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def _upstream_filters(cluster: dict[str, Any], filters: list[dict[str, Any]]) -> None:
    """Run ``filters`` on each request the cluster sends, after routing and
    ext_proc (so ext_proc reads what the client sent)."""
    options = cluster.setdefault("typed_extension_protocol_options", {})
    http = options.setdefault(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
        },
    )
    chain = http.setdefault(
        "http_filters",
        [
            {
                "name": "envoy.filters.http.upstream_codec",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
                },
            }
        ],
    )
    chain[-1:-1] = filters


def _signing_filter(providers: Providers) -> dict[str, Any]:
    signing = providers.bedrock_signing
    assert signing is not None
    typed: dict[str, Any] = {
        "@type": "type.googleapis.com/"
        "envoy.extensions.filters.http.aws_request_signing.v3.AwsRequestSigning",
        "service_name": "bedrock",
        "region": signing.region,
        # The payload hash is signed too: Bedrock checks it.
        "use_unsigned_payload": False,
    }
    if signing.credentials == "environment":
        typed["credential_provider"] = {
            "custom_credential_provider_chain": True,
            "environment_credential_provider": {},
        }
    return {"name": "envoy.filters.http.aws_request_signing", "typed_config": typed}


def _api_version_filter(version: str) -> dict[str, Any]:
    mutation = {
        "append": {
            "record": {"key": "api-version", "value": version},
            "action": "ADD_IF_ABSENT",
        }
    }
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"query_parameter_mutations": [mutation]},
        },
    }


def _compatible_cluster(c: Compatible) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": c.cluster,
        "type": "STATIC",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
    }
    _send_to(cluster, c.upstream)
    if cluster["type"] == "STATIC":
        del cluster["dns_lookup_family"]
    return cluster


def _compatible_route(c: Compatible) -> dict[str, Any]:
    return {
        "name": c.name,
        "match": {"prefix": c.prefix},
        "route": {
            "cluster": c.cluster,
            # The prefix is spendgate's, not the server's: it is replaced by
            # the URL's path, so /vllm/v1/chat/completions reaches /v1/chat/completions.
            "prefix_rewrite": c.path + "/",
            "host_rewrite_literal": c.upstream.authority,
            "timeout": "600s",
        },
    }


def apply_providers(config: dict[str, Any], providers: Providers) -> dict[str, Any]:
    """``config`` routing to what a ``providers:`` section declares: built-in
    providers not declared lose their routes and clusters, declared ones go
    to their upstream (with Bedrock re-signed and Azure's api-version added
    when configured), and each OpenAI-compatible upstream gets a cluster and a
    prefix route placed before the built-in provider routes."""
    clusters = config["static_resources"]["clusters"]
    routes = _route_list(config)
    if providers.declared is not None:
        dropped = {
            c["name"]
            for c in clusters
            if c["name"] not in (EXT_PROC_CLUSTER, DEMO_CLUSTER)
            and c["name"] not in providers.declared
        }
        routes[:] = [r for r in routes if r.get("route", {}).get("cluster") not in dropped]
        clusters[:] = [c for c in clusters if c["name"] not in dropped]
    adapt(config, upstreams=providers.upstreams)
    by_name = {c["name"]: c for c in clusters}
    if providers.bedrock_signing is not None and "bedrock" in by_name:
        _upstream_filters(by_name["bedrock"], [_signing_filter(providers)])
        for route in routes:
            if route.get("route", {}).get("cluster") == "bedrock":
                # Envoy's signature replaces the client's; a session token the
                # client signed with would make it invalid.
                route["request_headers_to_remove"] = ["x-amz-security-token"]
    if providers.azure_api_version is not None and "azure_openai" in by_name:
        _upstream_filters(
            by_name["azure_openai"], [_api_version_filter(providers.azure_api_version)]
        )
    # After the escaped-slash refusal, before every provider route; their
    # first path segments never overlap (providers.RESERVED_SEGMENTS).
    names = [r.get("name") for r in routes]
    at = names.index("escaped-slash") + 1 if "escaped-slash" in names else 0
    routes[at:at] = [_compatible_route(c) for c in providers.compatible]
    clusters.extend(_compatible_cluster(c) for c in providers.compatible)
    return config


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
EXAMPLE_PROVIDERS = ROOT / "examples" / "spendgate.yaml"


TARGETS = ("local", "compose", "kubernetes")
_TARGET_NOTES = {
    "local": [],
    "compose": [
        "# docker-compose variant: addresses are compose service names, and the",
        "# listener and admin bind every interface inside the container. The",
        "# spendgate_ext_proc cluster holds both ext_proc containers: each HTTP",
        "# request (one ext_proc stream) goes to one of them, round robin, and an",
        "# ext_proc that fails its gRPC health check gets no new requests.",
        "# Fail-open/closed: see `failure_mode_allow` and the notes in envoy/envoy.yaml.",
        "# Provider certificates are verified against the Envoy image's CA bundle",
        "# (or upstream_ca_file, a path in the Envoy container).",
    ],
    "kubernetes": [
        "# Kubernetes variant, for an Envoy you run yourself (not Istio or Envoy",
        "# Gateway: see istio-*.yaml and envoy-gateway.yaml): envoy.yaml here",
        "# mounts data.envoy.yaml and runs `envoy -c` on it. The listener binds",
        "# every interface of the pod, the admin 127.0.0.1 only. The",
        "# spendgate_ext_proc cluster resolves the headless Service (ext-proc.yaml),",
        "# so Envoy sees every ext_proc pod and spreads the streams over them,",
        "# skipping pods that fail gRPC health.",
        "# No demo route. Bedrock credentials: the pod's (IRSA, Pod Identity, env).",
        "# Provider certificates are verified against the Envoy image's CA bundle",
        "# (or upstream_ca_file, a path in the pod).",
    ],
}
# ext-proc.yaml's headless Service, as a self-run Envoy in the cluster reaches it.
KUBERNETES_EXT_PROC = ("spendgate-ext-proc-headless.spendgate.svc.cluster.local", 50052)
KUBERNETES_BOOTSTRAP = ROOT / "deploy" / "kubernetes" / "envoy-bootstrap.yaml"


def generated_header(source: str, target: str = "local") -> str:
    """The comment heading a generated bootstrap: what made it and from what."""
    flag = "" if target == "local" else f" --{target}"
    lines = [
        "# spendgate: Envoy bootstrap GENERATED from envoy/envoy.yaml and the",
        f"# providers: of {source} by `spendgate envoy-config{flag} --config FILE`.",
        "# Regenerate rather than edit (a test checks the shipped copies).",
        *_TARGET_NOTES[target],
    ]
    return "\n".join(lines) + "\n"


def generate(
    declared: Providers,
    upstream_specs: list[str] | tuple[str, ...] = (),
    *,
    target: str = "local",
    ca_file: str = "",
) -> dict[str, Any]:
    """envoy/envoy.yaml routing to the declared providers, for ``target``
    (one of TARGETS); each ``--upstream`` NAME=URL wins over the file's url
    for that provider (and declares it). Every TLS cluster (but those with
    ``tls: insecure``) verifies its upstream's certificate against ``ca_file``
    (the upstream_ca_file setting; empty: this machine's system bundle, or
    the Envoy image's for compose and kubernetes). Raises UpstreamError
    naming a bad value, or when no CA bundle is found."""
    base = load()
    chosen = upstream_flags.parse_all(upstream_specs, provider_clusters(base))
    signing = declared.bedrock_signing
    if signing is not None and "bedrock" in chosen:
        host = chosen["bedrock"].host
        if (
            host.startswith("bedrock-runtime.")
            and host != f"bedrock-runtime.{signing.region}.amazonaws.com"
        ):
            raise upstream_flags.UpstreamError(
                f"--upstream bedrock={host}: Envoy signs Bedrock requests for "
                f"{signing.region} (providers.bedrock.region); change the region there"
            )
    merged = dataclasses.replace(
        declared,
        upstreams={**declared.upstreams, **chosen},
        declared=None if declared.declared is None else declared.declared | set(chosen),
    )
    config = apply_providers(base, merged)
    if target == "local":
        if ca_file or upstream_tls.needs_bundle(config):
            upstream_tls.set_trusted_ca(config, upstream_tls.resolve_ca_file(ca_file))
    elif ca_file:  # a path in the Envoy container: nothing to check here
        if not ca_file.startswith("/") or any(ord(c) < 33 or ord(c) == 127 for c in ca_file):
            raise upstream_flags.UpstreamError(
                f"upstream_ca_file: {ca_file!r} must be an absolute path in the Envoy container"
            )
        upstream_tls.set_trusted_ca(config, ca_file)
    if target == "compose":
        return compose_variant(config)
    if target == "kubernetes":
        return kubernetes_variant(config)
    return config


def text(
    declared: Providers,
    source: str,
    target: str,
    upstream_specs: list[str] | tuple[str, ...] = (),
    ca_file: str = "",
) -> str:
    """What `spendgate envoy-config` prints: a bootstrap file, or for
    kubernetes a ConfigMap holding one."""
    body = dump(generate(declared, upstream_specs, target=target, ca_file=ca_file))
    if target != "kubernetes":
        return generated_header(source, target) + body
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "spendgate-envoy-bootstrap",
            "namespace": "spendgate",
            "labels": {"app.kubernetes.io/part-of": "spendgate"},
        },
        "data": {"envoy.yaml": body},
    }
    return generated_header(source, target) + yaml.dump(
        config_map, Dumper=_Literal, sort_keys=False, width=1000
    )


class _Literal(_Dumper):
    """Multi-line strings as YAML block literals (the bootstrap in the ConfigMap)."""


_Literal.add_representer(
    str,
    lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None),
)


def kubernetes_variant(config: dict[str, Any]) -> dict[str, Any]:
    """The local bootstrap for an Envoy pod next to deploy/kubernetes/."""
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] = "0.0.0.0"
    routes = _route_list(config)
    routes[:] = [r for r in routes if r.get("route", {}).get("cluster") != DEMO_CLUSTER]
    clusters = config["static_resources"]["clusters"]
    clusters[:] = [c for c in clusters if c["name"] != DEMO_CLUSTER]
    for cluster in clusters:
        if cluster["name"] == EXT_PROC_CLUSTER:
            cluster["type"] = "STRICT_DNS"
            cluster["load_assignment"]["endpoints"] = [
                {"lb_endpoints": [_endpoint(*KUBERNETES_EXT_PROC)]}
            ]
            cluster["health_checks"] = _ext_proc_health_checks()
    return config


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
            cluster["health_checks"] = _ext_proc_health_checks()
    return config


def _ext_proc_health_checks() -> list[dict[str, Any]]:
    """gRPC health "" of each ext_proc; a failing one gets no new streams."""
    return [
        {
            "timeout": "1s",
            "interval": "2s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "grpc_health_check": {},
        }
    ]


def example_text(target: str) -> str:
    """The shipped bootstrap for ``target``: the providers of examples/spendgate.yaml."""
    declared = providers_file.from_file_data(yaml.safe_load(EXAMPLE_PROVIDERS.read_text()))
    return text(declared, "examples/spendgate.yaml", target)


def compose_text() -> str:
    """envoy/envoy-compose.yaml."""
    return example_text("compose")


if __name__ == "__main__":
    for target, path in (("compose", COMPOSE_BOOTSTRAP), ("kubernetes", KUBERNETES_BOOTSTRAP)):
        path.write_text(example_text(target))
        print(f"wrote {path}")
