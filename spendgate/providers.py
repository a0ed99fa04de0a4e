"""The ``providers:`` section of ``spendgate.yaml``: which LLM providers
Envoy routes to and how, checked once into a frozen value. Pure: no I/O.

```yaml
providers:
  openai: {}                       # the public API (or url: ... to send it elsewhere)
  anthropic: {}
  gemini: {}
  azure: {resource: myres, api_version: "2024-10-21"}
  bedrock: {region: us-west-2}     # Envoy re-signs with SigV4 (sign: false to pass through)
  compatible:                      # OpenAI-compatible servers, each on its own path prefix
  - {name: vllm, url: http://vllm.internal:8000, prefix: /vllm}
```

A file with a ``providers:`` section routes only to what it declares; the
other built-in provider routes are left out (their requests get the local
404 of unclaimed requests). A file without one keeps every built-in route.
docs/upstreams.md is the reference; errors name the key, e.g.
``providers.bedrock.region``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from spendgate.upstreams import AWS_REGION, AZURE_RESOURCE, Upstream, UpstreamError, origin

# Built-in providers: the key in the file -> the Envoy cluster of envoy/envoy.yaml.
BUILT_IN = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "azure": "azure_openai",
    "bedrock": "bedrock",
}
# Route names of envoy/envoy.yaml (the ENDPOINT budgets target): a compatible
# upstream may not take one.
BUILT_IN_ROUTES = frozenset(
    {"demo", "bedrock", "escaped-slash", "gemini", "anthropic", "azure-openai", "openai"}
    | {"unclaimed"}
)
# First path segments the built-in routes match: a prefix there would take
# another provider's requests (or be taken by them).
RESERVED_SEGMENTS = frozenset(
    {"demo", "v1", "v1beta", "v1alpha", "upload", "download", "openai", "model"}
    | {"async-invoke", "guardrail"}
)
MAX_COMPATIBLE = 100
INSECURE = "insecure"  # tls: insecure = TLS, any certificate accepted (tests only)
SIGNING_SERVICE = "bedrock"  # SigV4 service name of bedrock-runtime
CREDENTIAL_SOURCES = ("chain", "environment")

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._~-]{1,100}$")
_API_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,39}$")


class ProvidersError(UpstreamError):
    """A ``providers:`` value that cannot be used; the message names its key."""


@dataclass(frozen=True)
class BedrockSigning:
    """Envoy signs Bedrock requests again, with its own AWS credentials.

    credentials: "chain" = the standard AWS chain (environment, files, web
    identity, container and instance roles); "environment" = only
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN of Envoy's
    environment (no instance metadata lookups)."""

    region: str
    credentials: str = "chain"


@dataclass(frozen=True)
class Compatible:
    """An OpenAI-compatible server: requests under ``prefix`` go to ``upstream``
    with the prefix replaced by ``path`` + "/" (the URL's path, often "")."""

    name: str  # the route name: what an ENDPOINT budget targets
    prefix: str  # "/vllm/": starts and ends with "/"
    upstream: Upstream
    path: str = ""

    @property
    def cluster(self) -> str:
        return f"compatible-{self.name}"


@dataclass(frozen=True)
class Providers:
    """What a ``providers:`` section declares. declared: the built-in clusters
    that keep their routes (None: no section, every one keeps them)."""

    declared: frozenset[str] | None = None
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    azure_api_version: str | None = None
    bedrock_signing: BedrockSigning | None = None
    compatible: tuple[Compatible, ...] = ()

    @property
    def insecure(self) -> list[Upstream]:
        """The upstreams declared with ``tls: insecure`` (no certificate check)."""
        ups = [*self.upstreams.values(), *(c.upstream for c in self.compatible)]
        return [u for u in ups if u.tls and not u.verify]


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProvidersError(f"{key}: must be a mapping")
    return value


def _only(entry: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in entry if k not in allowed)
    if unknown:
        raise ProvidersError(
            f"{key}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(allowed)})"
        )


def _text(entry: Mapping[str, Any], name: str, key: str, limit: int = 2048) -> str | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ProvidersError(f"{key}.{name}: must be a non-empty string")
    if len(value) > limit:
        raise ProvidersError(f"{key}.{name}: at most {limit} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ProvidersError(f"{key}.{name}: no control characters")
    return value.strip()


def _tls(entry: Mapping[str, Any], key: str) -> bool | str | None:
    value = entry.get("tls")
    if value is not None and not isinstance(value, bool) and value != INSECURE:
        raise ProvidersError(
            f"{key}.tls: must be true, false or {INSECURE} (TLS without verifying "
            "the certificate: for tests only)"
        )
    return value


def _url_upstream(
    cluster: str, url: str, key: str, tls: bool | str | None, *, allow_path: bool = False
) -> tuple[Upstream, str]:
    on = True if tls == INSECURE else tls if isinstance(tls, bool) else None
    try:
        up, path = origin(
            cluster,
            url,
            f"{key}.url",
            secret_label=f"{key}.url",
            allow_path=allow_path,
            tls=on,
        )
    except ProvidersError:
        raise
    except UpstreamError as e:
        raise ProvidersError(str(e)) from e
    return (replace(up, verify=False) if tls == INSECURE else up), path


def _azure(entry: Mapping[str, Any], key: str) -> tuple[Upstream | None, str | None]:
    _only(entry, key, ("resource", "url", "tls", "api_version"))
    resource = _text(entry, "resource", key, 64)
    url = _text(entry, "url", key)
    if resource is not None and url is not None:
        raise ProvidersError(f"{key}: give resource or url, not both")
    if resource is not None:
        if not AZURE_RESOURCE.match(resource):
            raise ProvidersError(
                f"{key}.resource: {resource!r} is not an Azure resource name "
                "(letters, digits and -, at most 64)"
            )
        url = f"https://{resource.lower()}.openai.azure.com"
    version = _text(entry, "api_version", key, 40)
    if version is not None and not _API_VERSION.match(version):
        raise ProvidersError(
            f"{key}.api_version: {version!r} is not an API version like 2024-10-21"
        )
    if url is None:
        if entry.get("tls") is not None:
            raise ProvidersError(f"{key}.tls: needs a url")
        raise ProvidersError(f"{key}: needs resource (e.g. myres) or url")
    up, _ = _url_upstream("azure_openai", url, key, _tls(entry, key))
    return up, version


def _bedrock(entry: Mapping[str, Any], key: str) -> tuple[Upstream, BedrockSigning | None]:
    _only(entry, key, ("region", "url", "tls", "sign", "credentials"))
    region = _text(entry, "region", key, 40)
    if region is None:
        raise ProvidersError(f"{key}.region: required (e.g. us-west-2)")
    if not AWS_REGION.match(region):
        raise ProvidersError(f"{key}.region: {region!r} is not an AWS region like us-west-2")
    url = _text(entry, "url", key) or f"https://bedrock-runtime.{region}.amazonaws.com"
    up, _ = _url_upstream("bedrock", url, key, _tls(entry, key))
    sign = entry.get("sign", True)
    if not isinstance(sign, bool):
        raise ProvidersError(f"{key}.sign: must be true or false")
    credentials = entry.get("credentials", "chain")
    if credentials not in CREDENTIAL_SOURCES:
        raise ProvidersError(
            f"{key}.credentials: must be one of {', '.join(CREDENTIAL_SOURCES)}, "
            f"not {credentials!r}"
        )
    if not sign and "credentials" in entry:
        raise ProvidersError(f"{key}.credentials: only with sign: true")
    return up, BedrockSigning(region, credentials) if sign else None


def _prefix(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip("/ "):
        raise ProvidersError(f"{key}.prefix: required, a path like /vllm")
    segments = value.strip().strip("/").split("/")
    if len(value) > 200 or not all(_SEGMENT.match(s) and s not in (".", "..") for s in segments):
        raise ProvidersError(
            f"{key}.prefix: {value!r} must be path segments of letters, digits and ._~- "
            "(no . or .. segment, at most 200 characters)"
        )
    if segments[0].lower() in RESERVED_SEGMENTS:
        raise ProvidersError(
            f"{key}.prefix: /{segments[0]}/ is where a built-in provider's requests go; "
            "choose another first segment"
        )
    return "/" + "/".join(segments) + "/"


def _compatible(items: Any, key: str) -> tuple[Compatible, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise ProvidersError(f"{key}: must be a list of upstreams")
    if len(items) > MAX_COMPATIBLE:
        raise ProvidersError(f"{key}: at most {MAX_COMPATIBLE} upstreams")
    found: list[Compatible] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        entry = _mapping(item, where)
        _only(entry, where, ("name", "url", "tls", "prefix"))
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ProvidersError(
                f"{where}.name: required, 1 to 63 of a-z, 0-9 and - "
                "(not at either end); it is the route name budgets target"
            )
        if name in BUILT_IN_ROUTES:
            raise ProvidersError(f"{where}.name: {name!r} is a built-in route's name")
        url = _text(entry, "url", where)
        if url is None:
            raise ProvidersError(f"{where}.url: required, e.g. http://vllm.internal:8000")
        prefix = _prefix(entry.get("prefix"), where)
        up, path = _url_upstream(
            f"compatible-{name}", url, where, _tls(entry, where), allow_path=True
        )
        for other in found:
            if other.name == name:
                raise ProvidersError(f"{where}.name: {name!r} is declared twice")
            if prefix.startswith(other.prefix) or other.prefix.startswith(prefix):
                raise ProvidersError(
                    f"{where}.prefix: {prefix} overlaps {other.name}'s {other.prefix}"
                )
        found.append(Compatible(name, prefix, up, path))
    return tuple(found)


def parse(section: Any, key: str = "providers") -> Providers:
    """The ``providers:`` value of a config file (None: no section)."""
    if section is None:
        return Providers()
    entries = _mapping(section, key)
    _only(entries, key, (*BUILT_IN, "compatible"))
    upstreams: dict[str, Upstream] = {}
    azure_version: str | None = None
    signing: BedrockSigning | None = None
    for name, cluster in BUILT_IN.items():
        if name not in entries:
            continue
        where = f"{key}.{name}"
        entry = _mapping(entries[name], where)
        if name == "azure":
            up, azure_version = _azure(entry, where)
        elif name == "bedrock":
            up, signing = _bedrock(entry, where)
        else:
            _only(entry, where, ("url", "tls"))
            url = _text(entry, "url", where)
            if url is None:
                if entry.get("tls") is not None:
                    raise ProvidersError(f"{where}.tls: needs a url")
                continue  # the public API, as envoy/envoy.yaml has it
            up, _ = _url_upstream(cluster, url, where, _tls(entry, where))
        if up is not None:
            upstreams[cluster] = up
    return Providers(
        declared=frozenset(BUILT_IN[n] for n in BUILT_IN if n in entries),
        upstreams=upstreams,
        azure_api_version=azure_version,
        bedrock_signing=signing,
        compatible=_compatible(entries.get("compatible"), f"{key}.compatible"),
    )


def from_file_data(data: Any) -> Providers:
    """The providers of a whole config file's parsed YAML (a mapping or None)."""
    if not isinstance(data, dict):
        return Providers()
    return parse(data.get("providers")) if "providers" in data else Providers()
