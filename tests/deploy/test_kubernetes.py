"""deploy/kubernetes/ agrees with the code: the Deployments run what
`spendgate up` runs with real settings, probe the health service names the
servers register, and are found by their Services and monitors; the Istio
EnvoyFilters carry envoy/envoy.yaml's ext_proc filter (and Envoy accepts
them); the Envoy Gateway policy means the same as that filter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.server import SERVICE_NAMES as CONTROL_PLANE_HEALTH
from ext_proc.server import SYNC_HEALTH_SERVICE, USAGE_HEALTH_SERVICE
from spendgate import upstream_tls
from tests.deploy.files import (
    EVERY_INTERFACE,
    ROOT,
    accepted_flags,
    effective_settings,
    envoy_validate,
    flags_of,
    host_port,
    local_buffer_limit,
    local_ext_proc_filter,
    module_of,
    spendgate_up_modules,
    unknown_env_names,
    yaml_docs,
)

K8S = ROOT / "deploy" / "kubernetes"
DOCS = {p.name: yaml_docs(p) for p in sorted(K8S.glob("*.yaml"))}
ALL = [d for docs in DOCS.values() for d in docs]
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
METERING_FILTER = "spendgate.metering"
# Health service names each server sets ("" = the whole server, always set).
HEALTH_NAMES = {
    "control_plane": {"", *CONTROL_PLANE_HEALTH},
    "ext_proc": {"", SYNC_HEALTH_SERVICE, USAGE_HEALTH_SERVICE},
}


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in ALL if d["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def secret_value(ref: dict[str, str]) -> str:
    """A value of the right shape for a secretKeyRef (the example secret's)."""
    secret = one("Secret", ref["name"])
    return str(secret["stringData"][ref["key"]])


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            env[item["name"]] = secret_value(item["valueFrom"]["secretKeyRef"])
        else:  # fieldRef: the pod's name and the like
            env[item["name"]] = f"pod-{item['valueFrom']['fieldRef']['fieldPath']}"
    return env


def is_envoy(container: dict[str, Any]) -> bool:
    return str(container["image"]).startswith("envoyproxy/envoy:")


def workloads() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every spendgate container (not Envoy's)."""
    found = []
    for doc in of_kind("Deployment") + of_kind("Job"):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if not is_envoy(c):
                found.append((doc, c))
    return found


def server(module: str) -> tuple[dict[str, Any], dict[str, Any]]:
    (found,) = [(d, c) for d, c in workloads() if module_of(c["command"]) == module]
    return found


def port_named(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def settings_of(container: dict[str, Any]) -> Any:
    cmd = container["command"]
    return effective_settings(module_of(cmd), cmd, container_env(container))


@pytest.fixture(scope="module")
def up_modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    with pytest.MonkeyPatch.context() as mp:
        return spendgate_up_modules(tmp_path_factory.mktemp("up"), mp)


def test_every_document_parses_and_is_named() -> None:
    assert set(DOCS) >= {
        "control-plane.yaml",
        "ext-proc.yaml",
        "istio-ingress.yaml",
        "istio-sidecar.yaml",
        "envoy-gateway.yaml",
        "envoy.yaml",
        "envoy-bootstrap.yaml",
    }
    for doc in ALL:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc


def test_containers_run_spendgate_modules_with_real_settings(
    up_modules: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cp, ep = up_modules["control-plane"], up_modules["ext_proc"]
    # The servers run what `spendgate up` runs; the Job runs the migrations.
    assert {module_of(c["command"]) for _, c in workloads()} == {cp, ep, f"{cp}.migrate"}
    for _, container in workloads():
        cmd = container["command"]
        module = module_of(cmd)
        assert cmd[:3] == ["python", "-m", module]
        help_text = accepted_flags(module, capsys)
        for flag in flags_of(cmd):
            assert flag in help_text, f"python -m {module} has no {flag}"
        assert unknown_env_names(module, container_env(container)) == [], module
        settings_of(container)  # the values are accepted, too


def test_servers_listen_where_ports_and_annotations_say(up_modules: dict[str, str]) -> None:
    for key in ("control-plane", "ext_proc"):
        workload, container = server(up_modules[key])
        s = settings_of(container)
        host, port = host_port(s.listen)
        assert host in EVERY_INTERFACE and port == port_named(container, "grpc")
        host, port = host_port(s.metrics_listen)
        assert host in EVERY_INTERFACE and port == port_named(container, "metrics")
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        kind: container[kind]["grpc"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }


def test_probes_ask_for_health_services_the_servers_register(up_modules: dict[str, str]) -> None:
    for key in ("control-plane", "ext_proc"):
        module = up_modules[key]
        _, container = server(module)
        found = probes(container)
        assert {"readinessProbe", "livenessProbe"} <= set(found), module
        for kind, grpc in found.items():
            assert grpc["port"] == port_named(container, "grpc"), (module, kind)
            assert grpc.get("service", "") in HEALTH_NAMES[module], (module, kind)
    _, ext_proc = server(up_modules["ext_proc"])
    found = probes(ext_proc)
    # Not ready before the first snapshot; afterwards in rotation even while
    # the control plane is away (ext_proc then enforces from its snapshot).
    assert found["startupProbe"]["service"] == SYNC_HEALTH_SERVICE
    assert found["readinessProbe"].get("service", "") == ""
    assert found["livenessProbe"].get("service", "") == ""


def test_secrets_referenced_exist() -> None:
    for _, container in workloads():
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret_value(ref)  # raises if the example secret lacks it


def test_services_select_the_deployments_and_their_ports() -> None:
    deployments = of_kind("Deployment")
    for svc in of_kind("Service"):
        selector = svc["spec"]["selector"]
        (dep,) = [
            d
            for d in deployments
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert dep["metadata"]["namespace"] == svc["metadata"]["namespace"]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        for port in svc["spec"]["ports"]:
            port_named(container, port["targetPort"])
            if port["name"] == "grpc":
                assert port["appProtocol"] == "grpc"  # HTTP/2 for Istio and Envoy Gateway


def service_for(module: str) -> dict[str, Any]:
    """The ClusterIP Service of a server (Istio and Envoy Gateway use it)."""
    workload, _ = server(module)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    (svc,) = [
        s
        for s in of_kind("Service")
        if s["spec"]["selector"].items() <= labels.items() and "clusterIP" not in s["spec"]
    ]
    return svc


def test_self_run_envoys_can_see_every_ext_proc_pod(up_modules: dict[str, str]) -> None:
    workload, _ = server(up_modules["ext_proc"])
    labels = workload["spec"]["template"]["metadata"]["labels"]
    (headless,) = [
        s
        for s in of_kind("Service")
        if s["spec"]["selector"].items() <= labels.items() and s["spec"].get("clusterIP") == "None"
    ]
    assert grpc_port(headless) == grpc_port(service_for(up_modules["ext_proc"]))


def grpc_port(svc: dict[str, Any]) -> int:
    (port,) = [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    return int(port)


def test_ext_procs_reach_the_control_plane_service(up_modules: dict[str, str]) -> None:
    svc = service_for(up_modules["control-plane"])
    name, namespace = svc["metadata"]["name"], svc["metadata"]["namespace"]
    _, ext_proc = server(up_modules["ext_proc"])
    addresses = settings_of(ext_proc).control_plane.split(",")
    assert addresses == [f"{name}.{namespace}.svc.cluster.local:{grpc_port(svc)}"]


def test_service_monitors_find_the_metrics_ports() -> None:
    monitors = of_kind("ServiceMonitor")
    assert len(monitors) == 2
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        (svc,) = [
            s for s in of_kind("Service") if selector.items() <= s["metadata"]["labels"].items()
        ]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
            assert endpoint["port"] == "metrics"


# ---- Istio ----


def istio_patches(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The patches by what they apply to; the first HTTP_FILTER (admission)."""
    patches: dict[str, dict[str, Any]] = {}
    for p in doc["spec"]["configPatches"]:
        patches.setdefault(p["applyTo"], p)
    return patches


def ext_proc_of(config: dict[str, Any]) -> dict[str, Any]:
    """The ext_proc config of a filter, or of the one a matcher wraps."""
    wrapped = config.get("extension_config")
    return wrapped["typed_config"] if wrapped else config


def istio_filters(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The HTTP filters the patches insert, in order."""
    return [p for p in doc["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]


@pytest.mark.parametrize("file", ["istio-ingress.yaml", "istio-sidecar.yaml"])
def test_istio_filter_is_the_local_one(file: str, up_modules: dict[str, str]) -> None:
    (doc,) = DOCS[file]
    assert doc["kind"] == "EnvoyFilter"
    patches = istio_patches(doc)
    svc = service_for(up_modules["ext_proc"])
    cluster = (
        f"outbound|{grpc_port(svc)}||{svc['metadata']['name']}."
        f"{svc['metadata']['namespace']}.svc.cluster.local"
    )
    filters = istio_filters(doc)
    # Both inserted before the router, in this order: admission, then metering.
    assert [f["patch"]["value"]["name"] for f in filters] == [EXT_PROC_FILTER, METERING_FILTER]
    for http in filters:
        assert http["patch"]["operation"] == "INSERT_BEFORE"
        assert http["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == (
            "envoy.filters.http.router"
        )
        assert http["match"]["context"] == patches["LISTENER"]["match"]["context"]
        value = http["patch"]["value"]
        config = value["typed_config"]
        assert ext_proc_of(config)["grpc_service"]["envoy_grpc"]["cluster_name"] == cluster
        expected = local_ext_proc_filter(value["name"])
        ext_proc_of(expected)["grpc_service"]["envoy_grpc"]["cluster_name"] = cluster
        assert config == expected
    listener = patches["LISTENER"]
    assert listener["patch"]["value"]["per_connection_buffer_limit_bytes"] == local_buffer_limit()


@pytest.mark.parametrize("file", ["istio-ingress.yaml", "istio-sidecar.yaml"])
def test_envoy_accepts_the_istio_patches(file: str, tmp_path: Path) -> None:
    (doc,) = DOCS[file]
    patches = istio_patches(doc)
    http_filter = patches["HTTP_FILTER"]["patch"]["value"]
    cluster = http_filter["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    listener = {
        "name": "istio",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
        **patches["LISTENER"]["patch"]["value"],
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "istio",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "llm",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "name": "llm",
                                                "match": {"prefix": "/"},
                                                "route": {"cluster": "provider"},
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                http_filter,
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions."
                                        "filters.http.router.v3.Router"
                                    },
                                },
                            ],
                        },
                    }
                ]
            }
        ],
    }

    def static(name: str, port: int, http2: bool) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        if http2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                    "HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return c

    bootstrap = {
        "static_resources": {
            "listeners": [listener],
            "clusters": [static(cluster, 50052, True), static("provider", 8080, False)],
        }
    }
    path = tmp_path / f"{file}.bootstrap.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    envoy_validate(path)


# ---- Envoy Gateway ----

BODY_MODES = {
    None: "NONE",
    "Streamed": "STREAMED",
    "Buffered": "BUFFERED",
    "BufferedPartial": "BUFFERED_PARTIAL",
    "FullDuplexStreamed": "FULL_DUPLEX_STREAMED",
}
# envoy/envoy.yaml's ext_proc fields, and how EnvoyExtensionPolicy says them.
EXPRESSED = {
    "failure_mode_allow": "failOpen",
    "message_timeout": "messageTimeout",
    "allow_mode_override": "processingMode.allowModeOverride",
    "request_attributes": "processingMode.request.attributes",
    "metadata_options": "metadata.accessibleNamespaces",
    "processing_mode": "processingMode.request / .response",
    "grpc_service.envoy_grpc": "backendRefs",
}
# Fields the Envoy Gateway API has no place for: the policy file says so.
NOT_EXPRESSIBLE = {"grpc_service.timeout"}


def seconds(duration: str) -> float:
    if duration.endswith("ms"):
        return float(duration[:-2]) / 1000
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def envoy_semantics(config: dict[str, Any]) -> dict[str, Any]:
    """The ext_proc filter fields spendgate relies on, Envoy's defaults filled in."""
    mode = config.get("processing_mode", {})

    def header(key: str, default: str) -> str:
        value = mode.get(key, "DEFAULT")
        return default if value == "DEFAULT" else str(value)

    return {
        "failure_mode_allow": bool(config.get("failure_mode_allow", False)),
        "message_timeout": seconds(config.get("message_timeout", "0.2s")),
        "allow_mode_override": bool(config.get("allow_mode_override", False)),
        "request_attributes": list(config.get("request_attributes", [])),
        "forwarded_metadata": list(
            config.get("metadata_options", {}).get("forwarding_namespaces", {}).get("untyped", [])
        ),
        "processing_mode": {
            "request_header_mode": header("request_header_mode", "SEND"),
            "response_header_mode": header("response_header_mode", "SEND"),
            "request_body_mode": mode.get("request_body_mode", "NONE"),
            "response_body_mode": mode.get("response_body_mode", "NONE"),
            "request_trailer_mode": header("request_trailer_mode", "SKIP"),
            "response_trailer_mode": header("response_trailer_mode", "SKIP"),
        },
    }


def gateway_semantics(ext_proc: dict[str, Any]) -> dict[str, Any]:
    """What Envoy Gateway configures for an EnvoyExtensionPolicy extProc entry:
    request/response present = their headers are sent; body absent = NONE;
    trailers are always skipped; messageTimeout defaults to 200ms."""
    mode = ext_proc.get("processingMode") or {}
    request, response = mode.get("request"), mode.get("response")
    return {
        "failure_mode_allow": bool(ext_proc.get("failOpen", False)),
        "message_timeout": seconds(ext_proc.get("messageTimeout", "200ms")),
        "allow_mode_override": bool(mode.get("allowModeOverride", False)),
        "request_attributes": list((request or {}).get("attributes", [])),
        "forwarded_metadata": list(
            (ext_proc.get("metadata") or {}).get("accessibleNamespaces", [])
        ),
        "processing_mode": {
            "request_header_mode": "SEND" if request is not None else "SKIP",
            "response_header_mode": "SEND" if response is not None else "SKIP",
            "request_body_mode": BODY_MODES[(request or {}).get("body")],
            "response_body_mode": BODY_MODES[(response or {}).get("body")],
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }


def test_envoy_gateway_policy_means_the_local_filter(up_modules: dict[str, str]) -> None:
    policy = one("EnvoyExtensionPolicy", "spendgate")
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    (ext_proc,) = policy["spec"]["extProc"]
    local = local_ext_proc_filter()
    assert gateway_semantics(ext_proc) == envoy_semantics(local)

    svc = service_for(up_modules["ext_proc"])
    (ref,) = ext_proc["backendRefs"]
    assert (ref["name"], ref["namespace"], ref["port"]) == (
        svc["metadata"]["name"],
        svc["metadata"]["namespace"],
        grpc_port(svc),
    )
    # Every field of the local filter is either expressed or documented as not.
    fields = {k for k in local if k not in ("@type", "grpc_service")}
    fields |= {f"grpc_service.{k}" for k in local["grpc_service"]}
    assert fields <= set(EXPRESSED) | NOT_EXPRESSIBLE, fields - set(EXPRESSED)
    text = (K8S / "envoy-gateway.yaml").read_text()
    notes = text.split("Not expressible here:", 1)[1].split("apiVersion:", 1)[0]
    for name in NOT_EXPRESSIBLE & fields:
        assert name in notes, f"envoy-gateway.yaml does not explain {name}"


def test_envoy_gateway_buffers_like_the_local_listener_and_may_reference_the_service(
    up_modules: dict[str, str],
) -> None:
    policy = one("EnvoyExtensionPolicy", "spendgate")
    traffic = one("ClientTrafficPolicy", "spendgate-buffer")
    assert traffic["spec"]["targetRefs"] == policy["spec"]["targetRefs"]
    limit = traffic["spec"]["connection"]["bufferLimit"]
    assert limit.endswith("Mi") and int(limit[:-2]) * 2**20 == local_buffer_limit()

    svc = service_for(up_modules["ext_proc"])
    grant = one("ReferenceGrant", "spendgate-ext-proc-from-llm-gateway")
    assert grant["metadata"]["namespace"] == svc["metadata"]["namespace"]
    (source,) = grant["spec"]["from"]
    assert (source["kind"], source["namespace"]) == (
        "EnvoyExtensionPolicy",
        policy["metadata"]["namespace"],
    )
    (target,) = grant["spec"]["to"]
    assert (target["kind"], target["name"]) == ("Service", svc["metadata"]["name"])


# ---- the self-run Envoy (envoy.yaml) and its bootstrap (envoy-bootstrap.yaml)


def envoy_deployment() -> tuple[dict[str, Any], dict[str, Any]]:
    (found,) = [
        (d, c)
        for d in of_kind("Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
        if is_envoy(c)
    ]
    return found


def test_the_envoy_deployment_runs_the_generated_bootstrap() -> None:
    workload, container = envoy_deployment()
    config_map = one("ConfigMap", "spendgate-envoy-bootstrap")
    assert workload["metadata"]["namespace"] == config_map["metadata"]["namespace"]
    # -c names the ConfigMap's envoy.yaml where the volume mounts it.
    path = Path(container["command"][container["command"].index("-c") + 1])
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    source = volumes[mount["name"]]["configMap"]
    assert source["name"] == config_map["metadata"]["name"]
    (item,) = [i for i in source["items"] if i["path"] == path.name]
    assert item["key"] in config_map["data"]
    bootstrap = yaml.safe_load(config_map["data"][item["key"]])
    # The listener is the container's http port, the one its Service exposes.
    listen = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listen["address"] in EVERY_INTERFACE
    assert port_named(container, "http") == listen["port_value"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] == "http"
    labels = workload["spec"]["template"]["metadata"]["labels"]
    (svc,) = [s for s in of_kind("Service") if s["spec"]["selector"].items() <= labels.items()]
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_the_envoy_deployment_runs_the_envoy_of_compose_and_the_tests() -> None:
    _, container = envoy_deployment()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert container["image"] == compose["services"]["envoy"]["image"]


def test_the_kubernetes_bootstrap_verifies_providers_with_the_image_bundle(
    tmp_path: Path,
) -> None:
    config_map = one("ConfigMap", "spendgate-envoy-bootstrap")
    bootstrap = yaml.safe_load(config_map["data"]["envoy.yaml"])
    contexts = dict(upstream_tls.tls_contexts(bootstrap))
    assert contexts, "no provider cluster speaks TLS"
    for name, typed in contexts.items():
        context = upstream_tls.verified(typed)
        assert context is not None, name
        assert context["trusted_ca"] == {"filename": upstream_tls.CONTAINER_CA_BUNDLE}
        assert context["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": typed["sni"].lower()}}
        ]
    path = tmp_path / "bootstrap.yaml"
    path.write_text(config_map["data"]["envoy.yaml"])
    envoy_validate(path)
