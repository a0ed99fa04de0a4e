"""``spendgate up --upstream NAME=TARGET``: where a provider's route sends its
traffic, parsed and checked before anything starts.

NAME is a provider cluster of the Envoy bootstrap (``openai``, ``anthropic``,
``gemini``, ``bedrock``, ``azure-openai``; ``-`` and ``_`` alike). TARGET is
an origin, ``http://host[:port]`` or ``https://host[:port]`` (no path: the
route keeps the client's path), or a shorthand an operator already knows:
an AWS region for ``bedrock`` (``us-west-2``) and a resource name for
``azure-openai`` (``myres``). Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

# Host names as DNS spells them (RFC 1123 labels); IP literals are checked apart.
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
AZURE_RESOURCE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?$")


class UpstreamError(ValueError):
    """A --upstream value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Upstream:
    cluster: str  # the Envoy cluster it replaces, e.g. "azure_openai"
    tls: bool
    host: str  # a DNS name or an IP literal (IPv6 without brackets)
    port: int
    # False only for `tls: insecure` in providers: (tests against a fake):
    # Envoy then accepts any certificate the upstream shows.
    verify: bool = True

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def authority(self) -> str:
        """What Envoy writes into Host: the port only when not the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.authority}"


def _check_host(host: str, where: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise UpstreamError(f"{where}: {host!r} is not a host name or IP address")


def _shorthand(cluster: str, target: str) -> str:
    """A region or resource name as the https URL it stands for."""
    if cluster == "bedrock" and AWS_REGION.match(target):
        return f"https://bedrock-runtime.{target}.amazonaws.com"
    if cluster == "azure_openai" and AZURE_RESOURCE.match(target) and "." not in target:
        return f"https://{target.lower()}.openai.azure.com"
    return target


def parse(spec: str, clusters: Iterable[str]) -> Upstream:
    """One ``NAME=TARGET`` against the provider clusters the bootstrap has."""
    known = sorted(clusters)
    name, sep, target = spec.partition("=")
    name, target = name.strip(), target.strip()
    if not sep or not name or not target:
        raise UpstreamError(
            f"--upstream {spec!r}: expected NAME=URL, e.g. openai=http://127.0.0.1:8000"
        )
    cluster = name.lower().replace("-", "_")
    if cluster not in known:
        names = ", ".join(k.replace("_", "-") for k in known)
        raise UpstreamError(f"--upstream {spec}: unknown provider {name!r} (one of: {names})")
    url = _shorthand(cluster, target)
    if "://" not in url:
        hint = {
            "bedrock": " or an AWS region like us-west-2",
            "azure_openai": " or a resource name like myres",
        }.get(cluster, "")
        raise UpstreamError(
            f"--upstream {spec}: {target!r} is not an http:// or https:// URL{hint}"
        )
    up, _ = origin(cluster, url, f"--upstream {spec}", secret_label=f"--upstream {name}=...")
    return up


def origin(
    cluster: str,
    url: str,
    where: str,
    *,
    secret_label: str | None = None,
    allow_path: bool = False,
    tls: bool | None = None,
) -> tuple[Upstream, str]:
    """``url`` checked as where ``cluster`` sends its traffic, and its path
    ("" unless ``allow_path``). ``where`` starts each error message;
    secret_label replaces it when the URL holds credentials (not repeated).
    tls: overrides what the scheme says (a TLS server on http://host:8443)."""
    if "://" not in url:
        raise UpstreamError(f"{where}: {url!r} is not an http:// or https:// URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UpstreamError(f"{where}: {e}") from e
    if parts.scheme not in ("http", "https"):
        raise UpstreamError(f"{where}: scheme must be http or https, not {parts.scheme!r}")
    if parts.username is not None or parts.password is not None:
        # The value itself is not repeated: it holds a secret.
        raise UpstreamError(
            f"{secret_label or where}: no credentials in the URL (clients send their own)"
        )
    path = parts.path.rstrip("/")
    if (path and not allow_path) or parts.query or parts.fragment:
        raise UpstreamError(
            f"{where}: give the origin only (scheme://host[:port]); "
            "requests keep the path the client sent"
        )
    if any(c in path for c in "%;\\") or any(ord(c) < 33 or ord(c) > 126 for c in path):
        raise UpstreamError(f"{where}: the path may hold only plain characters (no %, ; or \\)")
    host = parts.hostname or ""
    if not host:
        raise UpstreamError(f"{where}: no host")
    _check_host(host, where)
    on = parts.scheme == "https" if tls is None else tls
    default = 443 if parts.scheme == "https" else 80
    return Upstream(cluster, on, host, port if port is not None else default), path


def parse_all(specs: Iterable[str], clusters: Iterable[str]) -> Mapping[str, Upstream]:
    """Every ``--upstream`` by cluster; a provider given twice is an error."""
    known = list(clusters)
    found: dict[str, Upstream] = {}
    for spec in specs:
        up = parse(spec, known)
        if up.cluster in found:
            raise UpstreamError(
                f"--upstream {spec}: {up.cluster.replace('_', '-')} is already "
                f"sent to {found[up.cluster].url}"
            )
        found[up.cluster] = up
    return found
