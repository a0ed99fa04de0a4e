"""Who is calling: user, workspace, service and tags from the sources an
operator chose, canonicalised (docs/concepts/identity.md).

Sources, per field, the first that has a value wins:

1. **JWT claims** — Envoy's jwt_authn filter verified the token and wrote its
   payload to dynamic metadata (``payload_in_metadata``); the ext_proc filter
   forwards that namespace (``metadata_options.forwarding_namespaces``).
   ``user_claim``, ``workspace_claim``, ``service_claim`` and ``tags_claims``
   name the claims.
2. **Identity headers from a trusted hop** — only when the request's direct
   peer (``source.address``) is in a trusted CIDR or its mTLS identity
   (``connection.uri_san_peer_certificate``) is a trusted principal. A trusted
   hop speaks for the caller behind it, so for SERVICE its header beats the
   hop's own peer identity. From anyone else the headers are ignored (and
   removed before the provider, as always).
3. **mTLS peer identity** (SERVICE only, ``service_from_peer``) — the SPIFFE
   id (``spiffe://…`` URI SAN) of the client certificate Envoy verified.

Tags merge claims over trusted headers, key by key. Every value becomes a
canonical member (spendgate.domain.members); ambiguity — a repeated identity
header, a tag key given twice, a header value that is a list — and values that
cannot be members are refused (``MemberInvalid``, a 400), never guessed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from ext_proc.protocol import envoy_codec as codec
from spendgate.domain.members import MAX_TAGS, MemberInvalid, canonical
from spendgate.domain.policies import WILDCARD, Policy, PolicyIndex, RequestFacts

if TYPE_CHECKING:
    from ext_proc.config import Settings

__all__ = ["ANONYMOUS", "Caller", "IdentityReader", "MemberInvalid"]

# The member an unidentified request is charged to with missing_identity: anonymous.
ANONYMOUS = "anonymous"
PEER_ATTRIBUTE = "connection.uri_san_peer_certificate"
SOURCE_ATTRIBUTE = "source.address"
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Caller:
    """Canonical identity of one request ("" / {} where a field has none)."""

    user: str = ""
    workspace: str = ""
    service: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    # Identity headers were present but came from an untrusted source (ignored).
    untrusted_headers: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class TrustedSources:
    """Where identity headers may come from. Empty: from nowhere."""

    networks: tuple[_Network, ...] = ()
    principals: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.networks or self.principals)

    def trusts(self, source_address: str, peer: str) -> bool:
        if peer and peer in self.principals:
            return True
        ip = _ip_of(source_address)
        return ip is not None and any(ip in n for n in self.networks)


def parse_trusted_sources(text: str) -> TrustedSources:
    """``"10.0.0.0/8, ::1/128, spiffe://corp/gateway"`` -> TrustedSources.

    ValueError names the entry that is neither a CIDR nor a URI principal.
    """
    networks: list[_Network] = []
    principals: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "://" in item:
            principals.add(item)
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item!r} is neither a CIDR (10.0.0.0/8, 127.0.0.1/32) nor a peer "
                "principal (spiffe://trust-domain/path)"
            ) from None
    return TrustedSources(tuple(networks), frozenset(principals))


def parse_tag_claims(text: str) -> tuple[tuple[str, str], ...]:
    """``"team, env=deploy_env"`` -> ((tag key, claim name), ...); a bare name
    is both. ValueError on an empty part of a pair."""
    out: list[tuple[str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, claim = item.partition("=")
        key, claim = key.strip(), (claim.strip() if sep else key.strip())
        if not key or not claim:
            raise ValueError(f"{item!r} must be 'claim' or 'tag_key=claim'")
        out.append((canonical(key, "tag key"), claim))
    return tuple(out)


def _ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of Envoy's ``source.address`` (``1.2.3.4:5678``, ``[::1]:5678``)."""
    host = address
    if address.startswith("["):
        host = address[1 : address.find("]")]
    elif address.count(":") == 1:
        host = address.partition(":")[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None  # a pipe, or nothing: never trusted by address


def _claim_text(field: str, value: struct_pb2.Value) -> str:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        n = value.number_value
        return str(int(n)) if n.is_integer() else repr(n)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "null_value":
        return ""
    raise MemberInvalid(field, "must be a string or a number, not a list or object")


class IdentityReader:
    """Reads a request's Caller the way ``settings`` say. Immutable; shared."""

    def __init__(self, settings: Settings) -> None:
        s = settings
        self.trusted = parse_trusted_sources(s.trusted_header_sources)
        self.tag_claims = parse_tag_claims(s.tags_claims)
        self.namespace = s.jwt_metadata_namespace
        self.payload_key = s.jwt_payload_key
        self.user_claim = s.user_claim
        self.workspace_claim = s.workspace_claim
        self.service_claim = s.service_claim
        self.service_from_peer = s.service_from_peer
        self.missing = s.missing_identity
        # field name -> header name
        self.headers = {
            "user": s.user_header,
            "workspace": s.workspace_header,
            "service": s.service_header,
        }
        self.tags_header = s.tags_header
        # Removed before the provider, trusted or not.
        self.header_names = (*self.headers.values(), s.tags_header)

    # ---- sources ----------------------------------------------------------

    def _payload(self, req: ep.ProcessingRequest) -> Mapping[str, struct_pb2.Value]:
        ns = req.metadata_context.filter_metadata.get(self.namespace)
        if ns is None:
            return {}
        payload = ns.fields.get(self.payload_key)
        if payload is None or payload.WhichOneof("kind") != "struct_value":
            return {}
        fields: Mapping[str, struct_pb2.Value] = payload.struct_value.fields
        return fields

    def _claim(self, payload: Mapping[str, struct_pb2.Value], name: str, field: str) -> str:
        if not name or name not in payload:
            return ""
        source = f"JWT claim {name} ({field})"
        return _member(_claim_text(source, payload[name]), source)

    def read(
        self, req: ep.ProcessingRequest, headers: Mapping[str, str], repeated: frozenset[str]
    ) -> Caller:
        """The caller of the request whose headers (joined, as header_dict
        gives them) and repeated header names are given.

        Raises MemberInvalid naming the field and source for any value that
        cannot be a member, or an ambiguous one.
        """
        payload = self._payload(req)
        peer = codec.attribute(req, PEER_ATTRIBUTE)
        trusted = bool(self.trusted) and self.trusted.trusts(
            codec.attribute(req, SOURCE_ATTRIBUTE), peer
        )
        values: dict[str, str] = {}
        for name, claim in (
            ("user", self.user_claim),
            ("workspace", self.workspace_claim),
            ("service", self.service_claim),
        ):
            value = self._claim(payload, claim, name)
            if not value and trusted:
                value = self._header(headers, repeated, self.headers[name])
            values[name] = value
        if not values["service"] and self.service_from_peer and peer.startswith("spiffe://"):
            values["service"] = _member(peer, "mTLS peer SPIFFE id (service)")
        tags: dict[str, str] = {}
        if trusted and self.tags_header in headers:
            if self.tags_header in repeated:
                raise _repeated(self.tags_header)
            tags = parse_tags(headers[self.tags_header], f"{self.tags_header} header")
        for key, claim in self.tag_claims:
            value = self._claim(payload, claim, f"tag {key}")
            if value:
                tags[key] = value
        if len(tags) > MAX_TAGS:
            raise MemberInvalid("tags", f"more than {MAX_TAGS} tags ({len(tags)})")
        untrusted = not trusted and any(name in headers for name in self.header_names)
        return Caller(values["user"], values["workspace"], values["service"], tags, untrusted)

    def _header(self, headers: Mapping[str, str], repeated: frozenset[str], name: str) -> str:
        if name not in headers:
            return ""
        if name in repeated:
            raise _repeated(name)
        value = headers[name]
        if "," in value:
            # Proxies may join a repeated header into one with commas.
            raise MemberInvalid(f"{name} header", "must be one value, not a list (',')")
        return _member(value, f"{name} header")

    # ---- missing identity ---------------------------------------------------

    def settle_missing(
        self, facts: RequestFacts, index: PolicyIndex
    ) -> tuple[RequestFacts, list[tuple[Policy, str]]]:
        """Apply missing_identity to a request that names no member for a
        REJECT ``*`` policy of an identity scope.

        ``reject``: facts unchanged, and the policies it would escape with the
        field each lacks (empty when none). ``anonymous``: facts with every
        missing field (and each wildcard tag key) set to ANONYMOUS, so ``*``
        policies charge that member.
        """
        if self.missing != "anonymous":
            return facts, index.unidentified(facts)
        tags = dict(facts.tags)
        for key in index.wildcard_tag_keys:
            tags.setdefault(key, ANONYMOUS)
        anonymous = RequestFacts(
            route=facts.route,
            user=facts.user or ANONYMOUS,
            api_key_hash=facts.api_key_hash,
            workspace=facts.workspace or ANONYMOUS,
            provider=facts.provider,
            model=facts.model,
            tags=tags,
            service=facts.service or ANONYMOUS,
        )
        return anonymous, []


def _repeated(name: str) -> MemberInvalid:
    return MemberInvalid(f"{name} header", "is sent more than once; send it once")


def _member(value: str, field: str) -> str:
    member = canonical(value, field)
    if member == WILDCARD:
        raise MemberInvalid(field, "'*' is not a name (it means 'each member' in a policy)")
    return member


def parse_tags(value: str, field: str = "tags") -> dict[str, str]:
    """``team=search, env=prod`` -> {"team": "search", "env": "prod"}, keys and
    values canonical. Raises MemberInvalid for a part that is not key=value,
    a key given twice or more than MAX_TAGS tags (none is dropped silently).
    Empty parts (``a=b,,c=d``, a trailing comma) carry nothing and are skipped.
    """
    tags: dict[str, str] = {}
    parts = [p for p in value.split(",") if p.strip()]
    if len(parts) > MAX_TAGS:
        raise MemberInvalid(field, f"more than {MAX_TAGS} tags ({len(parts)})")
    for part in parts:
        raw_key, sep, raw_value = part.partition("=")
        if not sep or not raw_key.strip() or not raw_value.strip():
            raise MemberInvalid(field, f"{part.strip()[:64]!r} is not key=value")
        key = _member(raw_key, f"{field}, tag key")
        if key in tags:
            raise MemberInvalid(field, f"tag key {key!r} is given more than once")
        tags[key] = _member(raw_value, f"{field}, tag {key}")
    return tags


def check_settings(settings: Any) -> None:
    """ValueError naming the setting whose identity value cannot be parsed."""
    try:
        parse_trusted_sources(settings.trusted_header_sources)
    except ValueError as e:
        raise ValueError(f"trusted_header_sources: {e}") from None
    try:
        parse_tag_claims(settings.tags_claims)
    except ValueError as e:
        raise ValueError(f"tags_claims: {e}") from None
