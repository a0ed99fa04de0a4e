"""Envoy verifies every provider's certificate: the CA bundle a bootstrap
trusts (setting, system default, container path), the host name each
cluster checks, and the explicit `tls: insecure` opt-out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from spendgate import envoy_config, upstream_tls
from spendgate.cli import up
from spendgate.cli.client import CliError
from spendgate.cli.main import build_parser
from spendgate.providers import ProvidersError, parse
from spendgate.upstreams import UpstreamError
from tests.deploy.files import envoy_validate
from tests.e2e.identity_setup import CertificateAuthority

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def bundle(tmp_path: Path, name: str = "ca.pem", text: str = PEM) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def real_bundle(tmp_path: Path) -> str:
    """A bundle Envoy loads: one CA certificate made now."""
    return str(CertificateAuthority(tmp_path).pem.cert)


def verification(config: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Each TLS cluster's validation context (None: it verifies nothing)."""
    return {name: upstream_tls.verified(typed) for name, typed in upstream_tls.tls_contexts(config)}


def test_every_provider_cluster_of_the_shipped_bootstrap_verifies_its_host() -> None:
    config = envoy_config.load()
    found = verification(config)
    assert set(found) == {"openai", "anthropic", "gemini", "bedrock", "azure_openai"}
    for name, typed in upstream_tls.tls_contexts(config):
        context = found[name]
        assert context is not None, name
        assert context["trusted_ca"] == {"filename": upstream_tls.CONTAINER_CA_BUNDLE}
        assert context["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": typed["sni"].lower()}}
        ]


@pytest.mark.parametrize("target", envoy_config.TARGETS)
def test_generated_bootstraps_verify_every_tls_upstream(target: str, tmp_path: Path) -> None:
    declared = parse(
        {
            "openai": {"url": "https://llm-proxy.corp.example:8443"},
            "azure": {"resource": "MyRes"},
            "compatible": [
                {"name": "ip", "url": "https://10.0.0.5", "prefix": "/ip"},
                {"name": "v6", "url": "https://[2001:db8::1]:8443", "prefix": "/v6"},
                {"name": "plain", "url": "http://vllm:8000", "prefix": "/plain"},
            ],
        }
    )
    ca = real_bundle(tmp_path) if target == "local" else upstream_tls.CONTAINER_CA_BUNDLE
    config = envoy_config.generate(
        declared, ["anthropic=https://Claude.Example."], target=target, ca_file=ca
    )
    found = verification(config)
    assert "compatible-plain" not in found  # plain HTTP: no TLS at all
    sans = {
        name: (c["match_typed_subject_alt_names"], c["trusted_ca"]["filename"])
        for name, c in found.items()
        if c is not None
    }
    assert sans == {
        "openai": ([{"san_type": "DNS", "matcher": {"exact": "llm-proxy.corp.example"}}], ca),
        "anthropic": ([{"san_type": "DNS", "matcher": {"exact": "claude.example"}}], ca),
        "azure_openai": ([{"san_type": "DNS", "matcher": {"exact": "myres.openai.azure.com"}}], ca),
        "compatible-ip": ([{"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.5"}}], ca),
        "compatible-v6": ([{"san_type": "IP_ADDRESS", "matcher": {"exact": "2001:db8::1"}}], ca),
    }
    if target == "local":
        path = envoy_config.write(config, tmp_path / "envoy.yaml")
        envoy_validate(path)


def test_insecure_upstreams_skip_the_check_and_are_listed(tmp_path: Path) -> None:
    declared = parse(
        {
            "openai": {"url": "https://127.0.0.1:9443", "tls": "insecure"},
            "anthropic": {"url": "http://127.0.0.1:9444", "tls": "insecure"},
            "compatible": [{"name": "v", "url": "https://vllm:1", "prefix": "/v"}],
        }
    )
    assert [(u.cluster, u.url) for u in declared.insecure] == [
        ("openai", "https://127.0.0.1:9443"),
        ("anthropic", "https://127.0.0.1:9444"),  # tls: insecure turns TLS on
    ]
    config = envoy_config.generate(declared, ca_file=real_bundle(tmp_path))
    found = verification(config)
    assert found["openai"] is None and found["anthropic"] is None
    assert found["compatible-v"] is not None
    envoy_validate(envoy_config.write(config, tmp_path / "envoy.yaml"))


@pytest.mark.parametrize("value", ["Insecure", "off", 1, ["insecure"]])
def test_tls_takes_true_false_or_insecure_only(value: Any) -> None:
    with pytest.raises(ProvidersError, match=r"providers\.openai\.tls: must be true, false or"):
        parse({"openai": {"url": "https://h", "tls": value}})


def test_the_system_bundle_is_the_first_that_exists(tmp_path: Path) -> None:
    second = bundle(tmp_path, "second.pem")
    third = bundle(tmp_path, "third.pem")
    missing = str(tmp_path / "missing.pem")
    assert upstream_tls.resolve_ca_file("", candidates=(missing, second, third)) == second


def test_no_system_bundle_stops_generation_with_what_to_do(tmp_path: Path) -> None:
    missing = (str(tmp_path / "a.crt"), str(tmp_path / "b.crt"))
    with pytest.raises(UpstreamError) as e:
        upstream_tls.resolve_ca_file("", candidates=missing)
    message = str(e.value)
    assert message.startswith("no CA bundle to verify the providers' certificates with")
    assert all(m in message for m in missing)
    assert "--upstream-ca FILE" in message and "upstream_ca_file:" in message


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: str(p / "nope.pem"), "does not exist or is not a file"),
        (lambda p: str(p), "does not exist or is not a file"),  # a directory
        (lambda p: bundle(p, "empty.pem", ""), "holds no PEM certificate"),
        (lambda p: bundle(p, "key.pem", "-----BEGIN PRIVATE KEY-----\n"), "no PEM certificate"),
        (lambda p: str(p / "a\nb.pem"), "not a usable file name"),
        (lambda p: "/" + "a" * 5000, "not a usable file name"),
    ],
)
def test_a_bad_bundle_names_the_setting(tmp_path: Path, setup: Any, message: str) -> None:
    with pytest.raises(UpstreamError) as e:
        upstream_tls.resolve_ca_file(setup(tmp_path))
    assert str(e.value).startswith("upstream_ca_file (--upstream-ca): ")
    assert message in str(e.value)


def test_a_huge_file_is_not_read_as_a_bundle(tmp_path: Path) -> None:
    path = tmp_path / "huge.pem"
    with path.open("wb") as f:
        f.truncate(upstream_tls.MAX_BUNDLE_BYTES + 1)
    with pytest.raises(UpstreamError, match="larger than 16 MiB"):
        upstream_tls.resolve_ca_file(str(path))


def test_container_targets_take_an_absolute_path_only() -> None:
    with pytest.raises(UpstreamError, match="must be an absolute path in the Envoy container"):
        envoy_config.generate(parse(None), target="compose", ca_file="certs/ca.pem")
    config = envoy_config.generate(parse(None), target="kubernetes", ca_file="/etc/corp/ca.pem")
    assert {c["trusted_ca"]["filename"] for c in verification(config).values() if c} == {
        "/etc/corp/ca.pem"
    }


def test_up_reads_the_setting_from_flag_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = build_parser()
    config = tmp_path / "spendgate.yaml"
    config.write_text(yaml.safe_dump({"envoy": {"upstream_ca_file": "/from/file.pem"}}))
    monkeypatch.delenv("SPENDGATE_ENVOY_UPSTREAM_CA_FILE", raising=False)
    monkeypatch.delenv("SPENDGATE_UPSTREAM_CA_FILE", raising=False)
    args = parser.parse_args(["up", "--config", str(config)])
    assert up.upstream_ca_file(args, str(config)) == "/from/file.pem"
    config.write_text(yaml.safe_dump({"upstream_ca_file": "/top/level.pem"}))
    assert up.upstream_ca_file(args, str(config)) == "/top/level.pem"
    monkeypatch.setenv("SPENDGATE_ENVOY_UPSTREAM_CA_FILE", "/from/env.pem")
    assert up.upstream_ca_file(args, str(config)) == "/from/env.pem"
    args = parser.parse_args(["up", "--upstream-ca", "/from/flag.pem"])
    assert up.upstream_ca_file(args, str(config)) == "/from/flag.pem"
    config.write_text(yaml.safe_dump({"envoy": {"upstream_ca_fle": "x"}}))
    with pytest.raises(CliError, match=r"unknown setting.*upstream_ca_fle"):
        up.upstream_ca_file(args, str(config))


def test_envoy_config_prints_the_given_bundle_and_warns_of_insecure_upstreams(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spendgate.cli.main import main

    ca = bundle(tmp_path)
    config = tmp_path / "spendgate.yaml"
    config.write_text(
        yaml.safe_dump({"providers": {"openai": {"url": "https://10.1.2.3", "tls": "insecure"}}})
    )
    assert main(["envoy-config", "--config", str(config), "--upstream-ca", ca]) == 0
    out, err = capsys.readouterr()
    assert "warning: openai (https://10.1.2.3) has tls: insecure" in err
    assert "(for tests only)" in err
    printed = yaml.safe_load(out)
    assert verification(printed)["openai"] is None
    assert main(["envoy-config", "--upstream-ca", str(tmp_path / "none.pem")]) == 1
    _, err = capsys.readouterr()
    assert "upstream_ca_file (--upstream-ca): " in err and "does not exist" in err
