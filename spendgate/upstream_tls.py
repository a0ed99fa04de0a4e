"""TLS from Envoy to the providers: every https cluster verifies the
provider's certificate against a CA bundle and the upstream's host name
(docs/upstreams.md "TLS to providers").

Envoy 1.40 has no working "system roots" option for an upstream
(CertificateValidationContext.system_root_certs is for gRPC clients; given
alone, Envoy refuses the SAN check as "without trusted CA"), so the bundle
is a file named in the bootstrap: the ``upstream_ca_file``
setting, else the first system bundle that exists on this machine, resolved
when the bootstrap is generated. Compose and Kubernetes bootstraps name the
bundle inside the Envoy image instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spendgate.upstreams import UpstreamError

TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
# Where distributions keep the PEM bundle of the public roots, most common
# first (Debian/Ubuntu/Alpine, Fedora/RHEL, openSUSE, older RHEL, FreeBSD/macOS).
SYSTEM_CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
)
# The bundle inside the Envoy image docker-compose.yml and
# deploy/kubernetes/envoy.yaml run (envoyproxy/envoy, Ubuntu based).
CONTAINER_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MAX_BUNDLE_BYTES = 16 * 1024 * 1024
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class Settings:
    """Read by `spendgate up` and `spendgate envoy-config` (top level of
    spendgate.yaml or its ``envoy:`` section)."""

    # PEM bundle of the CAs Envoy trusts for the providers' certificates
    # (`spendgate up --upstream-ca FILE`). Empty: the first system bundle that
    # exists (/etc/ssl/certs/ca-certificates.crt, /etc/pki/tls/certs/ca-bundle.crt,
    # ...); for `--compose` / `--kubernetes` the Envoy image's, and a value
    # given is a path inside the Envoy container (see docs/upstreams.md#tls-to-providers).
    upstream_ca_file: str = ""


def _check_bundle(path: str, where: str) -> str:
    """``path`` as an absolute path, once it reads as a PEM bundle."""
    if len(path) > 4096 or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise UpstreamError(f"{where}: not a usable file name")
    file = Path(path).expanduser().resolve()
    try:
        if not file.is_file():
            raise UpstreamError(f"{where}: {file} does not exist or is not a file")
        if file.stat().st_size > MAX_BUNDLE_BYTES:
            raise UpstreamError(f"{where}: {file} is larger than 16 MiB; not a CA bundle")
        content = file.read_bytes()
    except OSError as e:
        raise UpstreamError(f"{where}: {file}: {e.strerror or e}") from e
    if _PEM_CERT not in content:
        raise UpstreamError(f"{where}: {file} holds no PEM certificate (BEGIN CERTIFICATE)")
    return str(file)


def resolve_ca_file(
    configured: str,
    where: str = "upstream_ca_file (--upstream-ca)",
    candidates: Sequence[str] = SYSTEM_CA_BUNDLES,
) -> str:
    """The CA bundle Envoy on this machine verifies providers with: the
    configured one (checked), else the first of ``candidates`` that exists.
    Raises UpstreamError naming the setting when there is none."""
    if configured:
        return _check_bundle(configured, where)
    for candidate in candidates:
        if Path(candidate).is_file():
            return _check_bundle(candidate, f"system CA bundle {candidate}")
    raise UpstreamError(
        "no CA bundle to verify the providers' certificates with: none of "
        f"{', '.join(candidates)} exists; install your system's CA certificates "
        "(e.g. the ca-certificates package) or give a PEM bundle with "
        "`--upstream-ca FILE` or `upstream_ca_file:` in spendgate.yaml"
    )


def validation_context(host: str, ca_file: str) -> dict[str, Any]:
    """Trust ``ca_file`` and accept only a certificate for ``host`` (a DNS
    name, wildcard certificates included, or an IP address SAN)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        san = {"san_type": "DNS", "matcher": {"exact": host.rstrip(".").lower()}}
    else:
        san = {"san_type": "IP_ADDRESS", "matcher": {"exact": str(ip)}}
    return {"trusted_ca": {"filename": ca_file}, "match_typed_subject_alt_names": [san]}


def tls_context(host: str, is_ip: bool, ca_file: str | None) -> dict[str, Any]:
    """An UpstreamTlsContext for ``host``: SNI (host names only, RFC 6066)
    and, unless ``ca_file`` is None (`tls: insecure`), certificate verification."""
    tls: dict[str, Any] = {"@type": TLS_CONTEXT}
    if not is_ip:
        tls["sni"] = host
    if ca_file is not None:
        tls["common_tls_context"] = {"validation_context": validation_context(host, ca_file)}
    return tls


def tls_contexts(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(cluster name, UpstreamTlsContext) of each cluster that speaks TLS."""
    for cluster in config["static_resources"]["clusters"]:
        socket = cluster.get("transport_socket") or {}
        typed = socket.get("typed_config") or {}
        if typed.get("@type") == TLS_CONTEXT:
            yield cluster["name"], typed


def verified(typed: dict[str, Any]) -> dict[str, Any] | None:
    """The validation context of an UpstreamTlsContext, None when it verifies nothing."""
    context = typed.get("common_tls_context", {}).get("validation_context")
    return context if isinstance(context, dict) and context.get("trusted_ca") else None


def needs_bundle(config: dict[str, Any]) -> bool:
    return any(verified(typed) for _, typed in tls_contexts(config))


def set_trusted_ca(config: dict[str, Any], ca_file: str) -> dict[str, Any]:
    """Every verifying TLS cluster of ``config`` trusts ``ca_file``."""
    for _, typed in tls_contexts(config):
        context = verified(typed)
        if context is not None:
            context["trusted_ca"] = {"filename": ca_file}
    return config
