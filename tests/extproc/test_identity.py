"""Who is the caller (ext_proc/admission/identity.py): sources, precedence and refusals
on ProcessingRequests as Envoy sends them, and the answers ext_proc gives."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from ext_proc.admission.identity import Caller, IdentityReader, MemberInvalid
from ext_proc.config import Settings
from ext_proc.protocol import envoy_codec as codec
from spendgate.domain.policies import Action, Policy, PolicyIndex, RequestFacts, Scope
from spendgate.domain.windows import WindowSpec, WindowUnit
from spendgate.v1 import budget_pb2 as pb
from tests.extproc.protocol import (
    Ext,
    chat_body,
    chat_headers,
    policy,
    request_headers,
    running,
)

PEER = "spiffe://corp.test/ns/shop/sa/checkout"
GATEWAY = "spiffe://corp.test/ns/infra/sa/gateway"


def settings(**values: Any) -> Settings:
    return Settings(data_plane_token="x" * 20, **values)


def with_jwt(req: ep.ProcessingRequest, claims: dict[str, Any]) -> ep.ProcessingRequest:
    """What Envoy forwards from jwt_authn's payload_in_metadata: jwt_payload."""
    ns = struct_pb2.Struct()
    ns.update({"jwt_payload": claims})
    req.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(ns)
    return req


def read(
    reader: IdentityReader, headers: dict[str, str] | list[tuple[str, str]], **kw: Any
) -> Caller:
    claims = kw.pop("claims", None)
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    req = request_headers(**kw)
    # One entry per occurrence, as Envoy sends them (repeated names too).
    for k, v in pairs:
        req.request_headers.headers.headers.add(key=k, raw_value=v.encode())
    if claims is not None:
        with_jwt(req, claims)
    h = codec.header_dict(req.request_headers)
    return reader.read(req, h, codec.repeated_names(req.request_headers))


# ---- sources and precedence ------------------------------------------------


def test_headers_count_only_from_trusted_sources() -> None:
    reader = IdentityReader(settings(trusted_header_sources="10.0.0.0/8,::1/128," + GATEWAY))
    h = {"x-spendgate-user": "Alice", "x-spendgate-tags": "Team=Red, env=prod"}
    trusted = Caller(user="alice", tags={"team": "red", "env": "prod"})
    assert read(reader, h, source="10.1.2.3:5555") == trusted
    assert read(reader, h, source="[::1]:5555") == trusted
    assert read(reader, h, source="127.0.0.1:5555") == Caller()
    # Trusted by its principal; with no service header the hop's own id is the service.
    by_principal = read(
        reader, h, source="", attributes={"connection.uri_san_peer_certificate": GATEWAY}
    )
    assert by_principal == Caller(user="alice", service=GATEWAY, tags=trusted.tags)
    # Off by default: nobody is trusted.
    assert read(IdentityReader(settings()), h) == Caller()


def test_untrusted_values_are_not_even_parsed() -> None:
    reader = IdentityReader(settings(trusted_header_sources="10.0.0.0/8"))
    bad = [("x-spendgate-user", "a\u200b"), ("x-spendgate-user", "b")]
    assert read(reader, bad, source="192.0.2.1:1") == Caller()


def test_jwt_claims_win_over_trusted_headers() -> None:
    reader = IdentityReader(
        settings(
            trusted_header_sources="127.0.0.1/32",
            user_claim="sub",
            workspace_claim="org",
            service_claim="azp",
            tags_claims="team, env=deploy_env, tier",
        )
    )
    claims = {"sub": "Alice", "org": "Research", "azp": "cli", "team": "red", "deploy_env": 3}
    headers = {
        "x-spendgate-user": "bob",
        "x-spendgate-workspace": "other",
        "x-spendgate-tags": "team=blue,cost=center1",
    }
    assert read(reader, headers, claims=claims) == Caller(
        user="alice",
        workspace="research",
        service="cli",
        tags={"team": "red", "cost": "center1", "env": "3"},
    )
    # A claim the token lacks falls back to the trusted header.
    assert read(reader, headers, claims={"sub": "carol"}).workspace == "other"


def test_spiffe_peer_names_the_service_unless_a_claim_or_trusted_header_does() -> None:
    peer = {"connection.uri_san_peer_certificate": PEER}
    reader = IdentityReader(settings())
    assert read(reader, {}, attributes=peer) == Caller(service=PEER)
    # Not a SPIFFE id: not an identity.
    assert read(reader, {}, attributes={"connection.uri_san_peer_certificate": "https://x"}) == (
        Caller()
    )
    assert read(IdentityReader(settings(service_from_peer=False)), {}, attributes=peer) == Caller()
    # A trusted hop names the service behind it.
    hop = IdentityReader(settings(trusted_header_sources=PEER))
    assert read(hop, {"x-spendgate-service": "Reports"}, attributes=peer).service == "reports"
    claim = IdentityReader(settings(service_claim="azp"))
    assert read(claim, {}, attributes=peer, claims={"azp": "batch"}).service == "batch"


# ---- refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "claims", "message"),
    [
        pytest.param(
            [("x-spendgate-user", "a"), ("x-spendgate-user", "a")],
            None,
            "x-spendgate-user header: is sent more than once; send it once",
            id="repeated-header",
        ),
        pytest.param(
            [("x-spendgate-workspace", "a,b")],
            None,
            "x-spendgate-workspace header: must be one value, not a list (',')",
            id="joined-list",
        ),
        pytest.param(
            [("x-spendgate-tags", "team=red,TEAM=blue")],
            None,
            "x-spendgate-tags header: tag key 'team' is given more than once",
            id="duplicate-tag-key-any-case",
        ),
        pytest.param(
            [("x-spendgate-tags", "team")],
            None,
            "x-spendgate-tags header: 'team' is not key=value",
            id="tag-without-value",
        ),
        pytest.param(
            [("x-spendgate-user", "*")],
            None,
            "x-spendgate-user header: '*' is not a name (it means 'each member' in a policy)",
            id="star",
        ),
        pytest.param(
            [],
            {"sub": {"id": 1}},
            "JWT claim sub (user): must be a string or a number, not a list or object",
            id="object-claim",
        ),
        pytest.param(
            [],
            {"sub": "x" * 300},
            "JWT claim sub (user): is longer than 256 bytes (UTF-8)",
            id="long-claim",
        ),
        pytest.param(
            [("x-spendgate-tags", ",".join(f"k{i}=v" for i in range(30)))],
            {"a": "1", "b": "2", "c": "3"},
            "tags: more than 32 tags (33)",
            id="claims-push-tags-past-32",
        ),
    ],
)
def test_ambiguous_or_invalid_identity_is_refused(
    headers: list[tuple[str, str]], claims: dict[str, Any] | None, message: str
) -> None:
    reader = IdentityReader(
        settings(trusted_header_sources="127.0.0.1/32", user_claim="sub", tags_claims="a,b,c")
    )
    with pytest.raises(MemberInvalid) as info:
        read(reader, headers, claims=claims)
    assert str(info.value) == message


# ---- missing_identity --------------------------------------------------------


DAY = WindowSpec(WindowUnit.DAYS, 1)


def test_anonymous_fills_every_missing_field_and_wildcard_tag_key() -> None:
    index = PolicyIndex(
        [
            Policy("u", "u", 1, DAY, Action.REJECT, Scope.USER, "*"),
            Policy("t", "t", 1, DAY, Action.ALERT, Scope.TAG, "team=*"),
        ]
    )
    reader = IdentityReader(settings(missing_identity="anonymous"))
    facts, missing = reader.settle_missing(RequestFacts(workspace="ws"), index)
    assert missing == []
    assert (facts.user, facts.workspace, facts.service) == ("anonymous", "ws", "anonymous")
    assert dict(facts.tags) == {"team": "anonymous"}
    assert [(p.id, m) for p, m in index.matches(facts)] == [("u", "anonymous"), ("t", "anonymous")]
    strict = IdentityReader(settings())
    _, missing = strict.settle_missing(RequestFacts(), index)
    assert [(p.id, field) for p, field in missing] == [("u", "user")]


# ---- what ext_proc answers ---------------------------------------------------


async def test_refusals_come_in_the_clients_dialect(ext: Ext) -> None:
    ext.set_policies(policy("each-ws", pb.SCOPE_WORKSPACE, "*"))
    s = ext.stream()
    anthropic = {"x-api-key": "k", "content-type": "application/json", "anthropic-version": "1"}
    reply = await s.answer_and_end(
        request_headers(path="/v1/messages", headers={**anthropic, "x-spendgate-workspace": "a,b"})
    )
    immediate = reply.immediate_response
    assert immediate.status.code == 400
    assert orjson.loads(immediate.body) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "x-spendgate-workspace header: must be one value, not a list (',').",
        },
    }
    assert immediate.details == "spendgate_invalid_identity"
    s = ext.stream()
    reply = await s.answer_and_end(request_headers(path="/v1/messages", headers=anthropic))
    immediate = reply.immediate_response
    assert immediate.status.code == 403
    assert orjson.loads(immediate.body)["error"] == {
        "type": "permission_error",
        "message": "spendgate budget 'each-ws budget' applies to each workspace, and this "
        "request names no workspace; it was refused (missing_identity: reject).",
    }
    headers = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
    assert headers["x-spendgate-error"] == "identity_required"
    assert ext.stats.rejections == {
        ("", "invalid_identity"): 1,
        ("each-ws", "identity_required"): 1,
    }


async def test_never_billable_methods_are_not_refused_for_missing_identity() -> None:
    async with running() as ext:
        ext.set_policies(policy("each-user", pb.SCOPE_USER, "*"))
        s = ext.stream()
        reply = await s.answer_and_end(
            request_headers("HEAD", "/v1/models", chat_headers(), end_of_stream=True)
        )
        assert reply.WhichOneof("response") == "request_headers"
        s = ext.stream()
        reply = await s.answer_and_end(request_headers(headers=chat_headers(chat_body())))
        assert reply.immediate_response.status.code == 403
