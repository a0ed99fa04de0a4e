"""The ``providers:`` section of spendgate.yaml: what it accepts, how it names
a bad value, and the Envoy bootstrap it makes (which Envoy accepts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from spendgate import envoy_config
from spendgate.providers import (
    BedrockSigning,
    Compatible,
    Providers,
    ProvidersError,
    from_file_data,
    parse,
)
from spendgate.upstreams import Upstream
from tests.deploy.files import envoy_validate

ROOT = Path(__file__).resolve().parents[2]
FULL = {
    "openai": {},
    "anthropic": {"url": "http://127.0.0.1:9000"},
    "gemini": None,
    "azure": {"resource": "MyRes", "api_version": "2024-10-21"},
    "bedrock": {"region": "us-west-2", "credentials": "environment"},
    "compatible": [
        {"name": "vllm", "url": "http://127.0.0.1:8000", "prefix": "/vllm"},
        {"name": "together", "url": "https://api.together.xyz/v1", "prefix": "team/tg/"},
        {"name": "tls-on-8443", "url": "http://10.0.0.5:8443", "tls": True, "prefix": "/t"},
    ],
}


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    return envoy_config._route_list(config)


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == name)


def test_the_full_section_parses() -> None:
    got = parse(FULL)
    assert got.declared == {"openai", "anthropic", "gemini", "azure_openai", "bedrock"}
    assert got.upstreams == {
        "anthropic": Upstream("anthropic", False, "127.0.0.1", 9000),
        "azure_openai": Upstream("azure_openai", True, "myres.openai.azure.com", 443),
        "bedrock": Upstream("bedrock", True, "bedrock-runtime.us-west-2.amazonaws.com", 443),
    }
    assert got.azure_api_version == "2024-10-21"
    assert got.bedrock_signing == BedrockSigning("us-west-2", "environment")
    assert got.compatible == (
        Compatible("vllm", "/vllm/", Upstream("compatible-vllm", False, "127.0.0.1", 8000)),
        Compatible(
            "together",
            "/team/tg/",
            Upstream("compatible-together", True, "api.together.xyz", 443),
            "/v1",
        ),
        Compatible(
            "tls-on-8443", "/t/", Upstream("compatible-tls-on-8443", True, "10.0.0.5", 8443)
        ),
    )


def test_no_section_keeps_every_built_in_route() -> None:
    assert from_file_data({"control_plane": {"webhook_allow_http": True}}) == Providers()
    assert from_file_data(None) == Providers()
    config = envoy_config.apply_providers(envoy_config.load(), Providers())
    assert config == envoy_config.load()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("openai", "providers: must be a mapping"),
        ({"opneai": {}}, "providers: unknown setting(s) opneai (known: openai, anthropic"),
        ({"openai": {"urll": "x"}}, "providers.openai: unknown setting(s) urll"),
        ({"openai": {"url": "ftp://x"}}, "providers.openai.url: scheme must be http or https"),
        ({"openai": {"url": "http://h/v1"}}, "providers.openai.url: give the origin only"),
        ({"openai": {"url": ""}}, "providers.openai.url: must be a non-empty string"),
        ({"openai": {"url": 5}}, "providers.openai.url: must be a non-empty string"),
        ({"openai": {"url": "http://h\n"}}, "providers.openai.url: no control characters"),
        ({"openai": {"url": "http://" + "a" * 3000}}, "providers.openai.url: at most 2048"),
        ({"openai": {"tls": True}}, "providers.openai.tls: needs a url"),
        ({"openai": {"url": "http://h", "tls": "yes"}}, "providers.openai.tls: must be true"),
        ({"azure": {}}, "providers.azure: needs resource (e.g. myres) or url"),
        ({"azure": {"resource": "a", "url": "https://b"}}, "give resource or url, not both"),
        ({"azure": {"resource": "my.res"}}, "providers.azure.resource: 'my.res' is not"),
        (
            {"azure": {"resource": "r", "api_version": "1 ; x"}},
            "providers.azure.api_version: '1 ; x' is not an API version",
        ),
        ({"bedrock": {}}, "providers.bedrock.region: required"),
        ({"bedrock": {"region": "mars-1"}}, "providers.bedrock.region: 'mars-1' is not"),
        ({"bedrock": {"region": "us-west-2", "sign": 1}}, "providers.bedrock.sign: must be"),
        (
            {"bedrock": {"region": "us-west-2", "credentials": "imds"}},
            "providers.bedrock.credentials: must be one of chain, environment, not 'imds'",
        ),
        (
            {"bedrock": {"region": "us-west-2", "sign": False, "credentials": "chain"}},
            "providers.bedrock.credentials: only with sign: true",
        ),
        (
            {"openai": {"url": "http://user:s3cret@h"}},
            "providers.openai.url: no credentials in the URL",
        ),
        ({"compatible": {}}, "providers.compatible: must be a list"),
        ({"compatible": [{"url": "http://h", "prefix": "/a"}]}, "compatible[0].name: required"),
        ({"compatible": [{"name": "A", "url": "http://h", "prefix": "/a"}]}, "[0].name: required"),
        (
            {"compatible": [{"name": "openai", "url": "http://h", "prefix": "/a"}]},
            "[0].name: 'openai' is a built-in route's name",
        ),
        ({"compatible": [{"name": "a", "prefix": "/a"}]}, "compatible[0].url: required"),
        ({"compatible": [{"name": "a", "url": "http://h"}]}, "compatible[0].prefix: required"),
        ({"compatible": [{"name": "a", "url": "http://h", "prefix": "/"}]}, "prefix: required"),
        (
            {"compatible": [{"name": "a", "url": "http://h", "prefix": "/v1"}]},
            "compatible[0].prefix: /v1/ is where a built-in provider's requests go",
        ),
        (
            {"compatible": [{"name": "a", "url": "http://h", "prefix": "/a b"}]},
            "compatible[0].prefix: '/a b' must be path segments",
        ),
        (
            {"compatible": [{"name": "a", "url": "http://h", "prefix": "/a/../v1"}]},
            "compatible[0].prefix: '/a/../v1' must be path segments",
        ),
        (
            {"compatible": [{"name": "a", "url": "http://h/x?y=1", "prefix": "/a"}]},
            "compatible[0].url: give the origin only",
        ),
        (
            {"compatible": [{"name": "a", "url": "http://h/%2e", "prefix": "/a"}]},
            "compatible[0].url: the path may hold only plain characters",
        ),
        (
            {
                "compatible": [
                    {"name": "a", "url": "http://h", "prefix": "/a"},
                    {"name": "a", "url": "http://h", "prefix": "/b"},
                ]
            },
            "compatible[1].name: 'a' is declared twice",
        ),
        (
            {
                "compatible": [
                    {"name": "a", "url": "http://h", "prefix": "/a"},
                    {"name": "b", "url": "http://h", "prefix": "/a/b"},
                ]
            },
            "compatible[1].prefix: /a/b/ overlaps a's /a/",
        ),
        (
            {
                "compatible": [
                    {"name": f"n{i}", "url": "http://h", "prefix": f"/{i}"} for i in range(101)
                ]
            },
            "providers.compatible: at most 100 upstreams",
        ),
    ],
)
def test_bad_values_name_their_key(section: Any, message: str) -> None:
    with pytest.raises(ProvidersError) as e:
        parse(section)
    assert message in str(e.value)
    assert "s3cret" not in str(e.value)


def test_the_bootstrap_routes_to_what_is_declared(tmp_path: Path) -> None:
    config = envoy_config.apply_providers(envoy_config.load(), parse(FULL))
    names = [r["name"] for r in routes(config)]
    # Compatible routes after the escaped-slash refusal, before any provider route.
    assert names[:6] == ["demo", "bedrock", "escaped-slash", "vllm", "together", "tls-on-8443"]
    vllm = routes(config)[3]
    assert vllm["match"] == {"prefix": "/vllm/"}
    assert vllm["route"]["prefix_rewrite"] == "/"
    assert vllm["route"]["host_rewrite_literal"] == "127.0.0.1:8000"
    together = routes(config)[4]["route"]
    assert together["prefix_rewrite"] == "/v1/"
    assert cluster(config, "compatible-together")["transport_socket"]["typed_config"]["sni"] == (
        "api.together.xyz"
    )
    assert "transport_socket" in cluster(config, "compatible-tls-on-8443")
    assert "transport_socket" not in cluster(config, "compatible-vllm")
    # Bedrock: signed again by an upstream filter, with the configured region.
    options = cluster(config, "bedrock")["typed_extension_protocol_options"]
    filters = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.aws_request_signing",
        "envoy.filters.http.upstream_codec",
    ]
    signing = filters[0]["typed_config"]
    assert (signing["service_name"], signing["region"]) == ("bedrock", "us-west-2")
    assert signing["credential_provider"] == {
        "custom_credential_provider_chain": True,
        "environment_credential_provider": {},
    }
    for r in routes(config):
        if r.get("route", {}).get("cluster") == "bedrock":
            assert r["request_headers_to_remove"] == ["x-amz-security-token"]
            assert r["route"]["host_rewrite_literal"] == "bedrock-runtime.us-west-2.amazonaws.com"
    options = cluster(config, "azure_openai")["typed_extension_protocol_options"]
    [mutation, _] = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "http_filters"
    ]
    assert mutation["typed_config"]["mutations"]["query_parameter_mutations"] == [
        {
            "append": {
                "record": {"key": "api-version", "value": "2024-10-21"},
                "action": "ADD_IF_ABSENT",
            }
        }
    ]
    envoy_validate(envoy_config.write(config, tmp_path / "envoy.yaml"))


def test_undeclared_providers_lose_routes_and_clusters(tmp_path: Path) -> None:
    config = envoy_config.apply_providers(
        envoy_config.load(),
        parse({"openai": {}, "compatible": [{"name": "v", "url": "http://h:1", "prefix": "/v"}]}),
    )
    assert {r.get("route", {}).get("cluster") for r in routes(config)} == {
        "demo_provider",
        "compatible-v",
        "openai",
        None,
    }
    assert [c["name"] for c in config["static_resources"]["clusters"]] == [
        "spendgate_ext_proc",
        "demo_provider",
        "openai",
        "compatible-v",
    ]
    envoy_validate(envoy_config.write(config, tmp_path / "envoy.yaml"))


def test_the_shipped_example_and_compose_bootstrap_agree() -> None:
    example = yaml.safe_load((ROOT / "examples" / "spendgate.yaml").read_text())
    declared = from_file_data(example)
    assert declared.declared == {"openai", "anthropic", "gemini", "azure_openai", "bedrock"}
    assert [c.name for c in declared.compatible] == ["vllm"]
    assert envoy_config.COMPOSE_BOOTSTRAP.read_text() == envoy_config.compose_text()
    assert envoy_config.KUBERNETES_BOOTSTRAP.read_text() == envoy_config.example_text("kubernetes")


def test_the_kubernetes_config_map_holds_a_bootstrap_envoy_accepts(tmp_path: Path) -> None:
    (config_map,) = yaml.safe_load_all(envoy_config.KUBERNETES_BOOTSTRAP.read_text())
    assert config_map["kind"] == "ConfigMap"
    assert config_map["metadata"]["namespace"] == "spendgate"
    bootstrap = yaml.safe_load(config_map["data"]["envoy.yaml"])
    ext_proc = cluster(bootstrap, envoy_config.EXT_PROC_CLUSTER)
    address = ext_proc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"]["socket_address"] == {
        "address": "spendgate-ext-proc-headless.spendgate.svc.cluster.local",
        "port_value": 50052,
    }
    assert "demo" not in [r.get("name") for r in routes(bootstrap)]
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    path = tmp_path / "envoy.yaml"
    path.write_text(config_map["data"]["envoy.yaml"])
    envoy_validate(path)


def test_an_upstream_flag_for_another_bedrock_region_than_signed_for_is_refused() -> None:
    from spendgate.upstreams import UpstreamError

    declared = parse({"bedrock": {"region": "us-west-2"}})
    with pytest.raises(UpstreamError) as e:
        envoy_config.generate(declared, ["bedrock=eu-west-1"])
    assert "signs Bedrock requests for us-west-2 (providers.bedrock.region)" in str(e.value)
    # A fake or a proxy elsewhere is fine; so is the same region.
    for spec in ("bedrock=http://127.0.0.1:9000", "bedrock=us-west-2"):
        config = envoy_config.generate(declared, [spec])
        assert "typed_extension_protocol_options" in cluster(config, "bedrock")
