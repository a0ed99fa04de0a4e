"""`--upstream NAME=URL` parsing and what it does to Envoy's bootstrap; the
bootstrap with every kind of upstream passes Envoy's own validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spendgate import envoy_config
from spendgate.upstreams import Upstream, UpstreamError, parse, parse_all
from tests.deploy.files import envoy_validate

CLUSTERS = envoy_config.provider_clusters(envoy_config.load())


def test_the_provider_clusters_are_the_routes_providers() -> None:
    assert sorted(CLUSTERS) == ["anthropic", "azure_openai", "bedrock", "gemini", "openai"]


@pytest.mark.parametrize(
    ("spec", "expected", "url"),
    [
        ("openai=http://127.0.0.1:8000", Upstream("openai", False, "127.0.0.1", 8000), None),
        ("openai=http://127.0.0.1:8000/", Upstream("openai", False, "127.0.0.1", 8000), None),
        (
            "OpenAI=https://llm.corp.example",
            Upstream("openai", True, "llm.corp.example", 443),
            None,
        ),
        (
            "anthropic=http://[::1]:9000",
            Upstream("anthropic", False, "::1", 9000),
            "http://[::1]:9000",
        ),
        ("azure-openai=MyRes", Upstream("azure_openai", True, "myres.openai.azure.com", 443), None),
        (
            "azure_openai=https://x.openai.azure.com:8443",
            Upstream("azure_openai", True, "x.openai.azure.com", 8443),
            "https://x.openai.azure.com:8443",
        ),
        (
            "bedrock=us-west-2",
            Upstream("bedrock", True, "bedrock-runtime.us-west-2.amazonaws.com", 443),
            "https://bedrock-runtime.us-west-2.amazonaws.com",
        ),
        (
            "bedrock=ap-southeast-1",
            Upstream("bedrock", True, "bedrock-runtime.ap-southeast-1.amazonaws.com", 443),
            None,
        ),
        (" gemini = http://gem:80 ", Upstream("gemini", False, "gem", 80), "http://gem"),
    ],
)
def test_parse(spec: str, expected: Upstream, url: str | None) -> None:
    got = parse(spec, CLUSTERS)
    assert got == expected
    if url:
        assert got.url == url


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("demo=http://x", "unknown provider 'demo' (one of: anthropic, azure-openai, bedrock"),
        ("spendgate_ext_proc=http://x", "unknown provider"),
        ("openai=", "expected NAME=URL"),
        ("=http://x", "expected NAME=URL"),
        ("openai=127.0.0.1:8000", "is not an http:// or https:// URL"),
        ("openai=grpc://x", "scheme must be http or https, not 'grpc'"),
        ("openai=file:///etc/passwd", "scheme must be http or https"),
        ("openai=https://x/v1", "give the origin only"),
        ("openai=https://x?a=1", "give the origin only"),
        ("openai=https://x:99999", "Port out of range"),
        ("openai=https://x:port", "Port could not be cast"),
        ("openai=https://:80", "no host"),
        ("openai=https://bad_host!", "is not a host name or IP address"),
        ("openai=https://-x.example", "is not a host name or IP address"),
        ("bedrock=us-west", "or an AWS region like us-west-2"),
        ("azure-openai=my.res", "or a resource name like myres"),
    ],
)
def test_bad_values_name_themselves(spec: str, message: str) -> None:
    with pytest.raises(UpstreamError) as e:
        parse(spec, CLUSTERS)
    assert message in str(e.value)


def test_credentials_in_the_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(UpstreamError) as e:
        parse("openai=https://user:hunter2@x", CLUSTERS)
    assert "hunter2" not in str(e.value) and "no credentials" in str(e.value)


def test_a_provider_given_twice_is_an_error() -> None:
    with pytest.raises(UpstreamError, match="already sent to http://a:1"):
        parse_all(["openai=http://a:1", "openai=http://b:2"], CLUSTERS)


def _routes(config: dict[str, Any], cluster: str) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    return [r["route"] for r in routes if r.get("route", {}).get("cluster") == cluster]


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == name)


def test_adapt_rewrites_clusters_and_host(tmp_path: Path) -> None:
    chosen = parse_all(
        [
            "openai=http://127.0.0.1:8000",
            "anthropic=https://10.0.0.7:8443",
            "gemini=https://gemini-proxy.corp.example",
            "azure-openai=myres",
            "bedrock=eu-west-1",
        ],
        CLUSTERS,
    )
    config = envoy_config.adapt(envoy_config.load(), upstreams=chosen)
    openai = _cluster(config, "openai")
    assert openai["type"] == "STATIC" and "transport_socket" not in openai
    assert {r["host_rewrite_literal"] for r in _routes(config, "openai")} == {"127.0.0.1:8000"}
    anthropic = _cluster(config, "anthropic")
    assert anthropic["type"] == "STATIC"
    assert "sni" not in anthropic["transport_socket"]["typed_config"]  # no SNI for an IP
    gemini = _cluster(config, "gemini")
    assert gemini["type"] == "LOGICAL_DNS"
    assert gemini["transport_socket"]["typed_config"]["sni"] == "gemini-proxy.corp.example"
    assert {r["host_rewrite_literal"] for r in _routes(config, "bedrock")} == {
        "bedrock-runtime.eu-west-1.amazonaws.com"
    }
    assert all("auto_host_rewrite" not in r for r in _routes(config, "azure_openai"))
    # Untouched: the ext_proc cluster and the demo provider.
    assert _cluster(config, "spendgate_ext_proc") == _cluster(
        envoy_config.load(), "spendgate_ext_proc"
    )
    envoy_validate(envoy_config.write(config, tmp_path / "envoy.yaml"))
