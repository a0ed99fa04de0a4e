"""Who is the caller, through the real Envoy: each identity source (trusted
identity headers, JWT claims verified by Envoy's jwt_authn, the mTLS peer's
SPIFFE id) and each way around a budget the issue lists, shown to fail —
the request is charged to the right budget or refused.

Stacks: ``stack`` (tests/conftest.py) trusts identity headers from
127.0.0.1, as ``spendgate up --demo`` does; the others are built here.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from spendgate import envoy_config
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack, start_stack, stop_stack
from tests.deploy.files import envoy_validate
from tests.e2e.budgets import create_policy, delete_policies
from tests.e2e.identity_setup import (
    JWT_HEADER,
    CertificateAuthority,
    Issuer,
    Pem,
    require_client_certificates,
    verify_jwts,
)
from tests.harness import tempdir, wait_until

pytestmark = pytest.mark.e2e
# A gpt-4o-mini answer with these knobs costs $0.00045: a budget of that
# amount is spent by one request, and the next is refused.
BIG = {"x-fake-prompt-tokens": "1000", "x-fake-completion-tokens": "500"}
ONE_REQUEST = "0.00045"
CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def create(stack: Stack, **fields: Any) -> pb.BudgetPolicy:
    fields.setdefault("amount_usd", ONE_REQUEST)
    return create_policy(stack, **fields)


def members(stack: Stack, policy: pb.BudgetPolicy) -> set[str]:
    """The members the control plane has recorded spend for."""
    resp = stack.budgets.ListSpend(pb.ListSpendRequest(policy_id=policy.id), metadata=stack.admin)
    return {e.member for e in resp.entries if e.member}


def post(
    client: httpx.Client | str, headers: list[tuple[str, str]] | dict[str, str] = ()
) -> httpx.Response:
    """A chat completion with exactly these headers (repeated names kept)."""
    all_headers = [*_pairs({"authorization": "Bearer sk-test", **BIG}), *_pairs(headers)]
    if isinstance(client, str):
        return httpx.post(client + CHAT, json=BODY, headers=all_headers, timeout=10)
    return client.post(CHAT, json=BODY, headers=all_headers, timeout=10)


def _pairs(headers: list[tuple[str, str]] | dict[str, str]) -> list[tuple[str, bytes]]:
    # Values go out as UTF-8 bytes: look-alikes are not ASCII.
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    return [(k, v.encode()) for k, v in pairs]


def error_of(r: httpx.Response) -> tuple[int, str, str]:
    """(status, spendgate error, message) of a response spendgate answered."""
    body = r.json()
    return r.status_code, r.headers.get("x-spendgate-error", ""), body["error"]["message"]


def provider_saw(stack: Stack) -> list[dict[str, str]]:
    return [{k.lower(): v for k, v in r["headers"].items()} for r in stack.provider.log.requests]


@pytest.fixture
def clean(stack: Stack) -> Iterator[Stack]:
    yield stack
    delete_policies(stack)


# ---- identity headers from a trusted hop: the issue's bypasses --------------


def test_blocked_user_changing_case_is_charged_to_the_same_budget(clean: Stack) -> None:
    stack = clean
    policy = create(stack, scope=pb.SCOPE_USER, target="*")
    assert post(stack.envoy.base_url, {"x-spendgate-user": "alice"}).status_code == 200
    for spelling in ("Alice", "ALICE", "\uff41lice"):  # fullwidth a too
        r = post(stack.envoy.base_url, {"x-spendgate-user": spelling})
        assert r.status_code == 429, spelling
        assert r.headers["x-spendgate-policy"] == policy.id
    assert post(stack.envoy.base_url, {"x-spendgate-user": "bob"}).status_code == 200
    wait_until(lambda: members(stack, policy) == {"alice", "bob"}, message="members alice, bob")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        pytest.param(
            "\u0430lice",
            "x-spendgate-user header: mixes letters of scripts that are not written "
            "together (CYRILLIC, LATIN).",
            id="cyrillic-a",
        ),
        pytest.param(
            "alice\u200b",
            "x-spendgate-user header: contains an invisible format character (U+200B), "
            "which is not allowed.",
            id="trailing-zero-width-space",
        ),
        pytest.param(
            "a" * 257,
            "x-spendgate-user header: is longer than 256 bytes (UTF-8).",
            id="over-256-bytes",
        ),
        pytest.param(
            "alice,alice",
            "x-spendgate-user header: must be one value, not a list (',').",
            id="list-value",
        ),
    ],
)
def test_look_alike_and_unbounded_users_are_refused_in_the_providers_shape(
    clean: Stack, value: str, why: str
) -> None:
    stack = clean
    create(stack, scope=pb.SCOPE_USER, target="*")
    r = post(stack.envoy.base_url, {"x-spendgate-user": value})  # sent as UTF-8
    assert r.status_code == 400
    assert r.headers["x-spendgate-error"] == "invalid_identity"
    assert r.json() == {
        "error": {
            "message": why,
            "type": "invalid_identity",
            "param": None,
            "code": "invalid_identity",
        }
    }
    assert stack.provider.log.requests == []


def test_the_openai_sdk_raises_bad_request_for_a_refused_identity(clean: Stack) -> None:
    client = openai.OpenAI(
        base_url=clean.envoy.base_url + "/v1",
        api_key="sk-test",
        default_headers={"x-spendgate-user": "alice,alice"},
        max_retries=0,
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.code == "invalid_identity"
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == (
        "x-spendgate-user header: must be one value, not a list (',')."
    )


def test_header_sent_twice_is_refused_through_envoy(clean: Stack) -> None:
    stack = clean
    create(stack, scope=pb.SCOPE_USER, target="*")
    # Envoy hands ext_proc both entries; a joined "alice,alice" member never forms.
    for pair in (("alice", "alice"), ("alice", "bob")):
        r = post(
            stack.envoy.base_url, [("x-spendgate-user", pair[0]), ("x-spendgate-user", pair[1])]
        )
        assert error_of(r) == (
            400,
            "invalid_identity",
            "x-spendgate-user header: is sent more than once; send it once.",
        )
    assert stack.provider.log.requests == []


def test_omitted_user_is_refused_under_a_reject_budget_per_user(clean: Stack) -> None:
    stack = clean
    policy = create(stack, scope=pb.SCOPE_USER, target="*", name="each-user")
    client = openai.OpenAI(base_url=stack.envoy.base_url + "/v1", api_key="sk-test", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 403
    assert info.value.response.headers["x-spendgate-error"] == "identity_required"
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == (
        "spendgate budget 'each-user' applies to each user, and this request names no "
        "user; it was refused (missing_identity: reject)."
    )
    assert stack.provider.log.requests == []
    assert stack.ext.ctx.stats.rejections[(policy.id, "identity_required")] >= 1


def test_duplicate_tag_key_is_refused_not_last_wins(clean: Stack) -> None:
    stack = clean
    create(stack, scope=pb.SCOPE_TAG, target="team=*")
    r = post(stack.envoy.base_url, {"x-spendgate-tags": "team=red,team=blue"})
    assert error_of(r) == (
        400,
        "invalid_identity",
        "x-spendgate-tags header: tag key 'team' is given more than once.",
    )
    r = post(
        stack.envoy.base_url,
        [("x-spendgate-tags", "team=red"), ("x-spendgate-tags", "env=prod")],
    )
    assert error_of(r)[2] == "x-spendgate-tags header: is sent more than once; send it once."
    assert stack.provider.log.requests == []


def test_33_tags_is_an_error_not_a_silent_drop(clean: Stack) -> None:
    stack = clean
    create(stack, scope=pb.SCOPE_TAG, target="k32=*")
    tags = ",".join(f"k{i}=v" for i in range(33))  # the 33rd names the budgeted key
    assert error_of(post(stack.envoy.base_url, {"x-spendgate-tags": tags})) == (
        400,
        "invalid_identity",
        "x-spendgate-tags header: more than 32 tags (33).",
    )
    ok = ",".join(f"k{i}=v" for i in range(1, 33))
    assert post(stack.envoy.base_url, {"x-spendgate-tags": ok}).status_code == 200


def test_tag_key_case_does_not_escape_the_tag_budget(clean: Stack) -> None:
    stack = clean
    policy = create(stack, scope=pb.SCOPE_TAG, target="team=red")
    assert post(stack.envoy.base_url, {"x-spendgate-tags": "team=red"}).status_code == 200
    for spelling in ("Team=red", "TEAM=Red", "team = RED"):
        r = post(stack.envoy.base_url, {"x-spendgate-tags": spelling})
        assert r.status_code == 429, spelling
        assert r.headers["x-spendgate-policy"] == policy.id
    assert post(stack.envoy.base_url, {"x-spendgate-tags": "team=blue"}).status_code == 200


def test_identity_headers_never_reach_the_provider(clean: Stack) -> None:
    stack = clean
    r = post(
        stack.envoy.base_url,
        {"x-spendgate-user": "carol", "x-spendgate-service": "svc", "x-spendgate-tags": "a=b"},
    )
    assert r.status_code == 200
    (seen,) = provider_saw(stack)
    assert not [k for k in seen if k.startswith("x-spendgate-")]


def test_the_metering_mark_of_a_stream_never_reaches_the_provider(clean: Stack) -> None:
    """ext_proc marks a stream x-spendgate-meter: observe for Envoy's metering
    filter; the route removes it. A client's own mark is removed as well."""
    stack = clean
    r = httpx.post(
        stack.envoy.base_url + CHAT,
        json={**BODY, "stream": True},
        headers={"authorization": "Bearer sk-test", "x-spendgate-meter": "observe", **BIG},
        timeout=10,
    )
    assert r.status_code == 200 and b"data: [DONE]" in r.content
    seen = provider_saw(stack)[-1]
    assert not [k for k in seen if k.startswith("x-spendgate-")]


# ---- identity headers from an untrusted source: stripped and ignored --------


@pytest.fixture(scope="module")
def untrusted_stack() -> Iterator[Stack]:
    # Headers are trusted only from 10.0.0.0/8; the tests call from 127.0.0.1.
    s = start_stack(ext_proc={"trusted_header_sources": "10.0.0.0/8,spiffe://corp/gateway"})
    yield s
    stop_stack(s)


def test_headers_from_an_untrusted_source_are_stripped_and_ignored(
    untrusted_stack: Stack,
) -> None:
    stack = untrusted_stack
    ignored_before = stack.ext.ctx.stats.untrusted_identity_headers
    blocked = create(stack, scope=pb.SCOPE_USER, target="mallory", amount_usd="0.000001")
    create(stack, scope=pb.SCOPE_WORKSPACE, target="*", action=pb.ACTION_ALERT)
    try:
        # Claiming to be someone else does not help, and neither does
        # claiming to be nobody: the header is not read at all.
        r = post(
            stack.envoy.base_url,
            [("x-spendgate-user", "Alice\u200b"), ("x-spendgate-user", "x")],
        )
        assert r.status_code == 200  # not even a 400: the values were never read
        (seen,) = provider_saw(stack)
        assert "x-spendgate-user" not in seen
        assert stack.ext.ctx.stats.untrusted_identity_headers == ignored_before + 1
        # Under a REJECT budget per user, an unidentified request is refused.
        create(stack, scope=pb.SCOPE_USER, target="*", name="each-user")
        r = post(stack.envoy.base_url, {"x-spendgate-user": "mallory"})
        assert error_of(r)[:2] == (403, "identity_required")
        assert blocked.id not in r.headers.get("x-spendgate-policy", "")
    finally:
        delete_policies(stack)


# ---- missing_identity: anonymous ---------------------------------------------


@pytest.fixture(scope="module")
def anonymous_stack() -> Iterator[Stack]:
    s = start_stack(ext_proc={"missing_identity": "anonymous"})
    yield s
    stop_stack(s)


def test_anonymous_requests_share_one_budget(anonymous_stack: Stack) -> None:
    stack = anonymous_stack
    try:
        policy = create(stack, scope=pb.SCOPE_USER, target="*")
        assert post(stack.envoy.base_url).status_code == 200
        r = post(stack.envoy.base_url)
        assert r.status_code == 429 and r.headers["x-spendgate-policy"] == policy.id
        assert post(stack.envoy.base_url, {"x-spendgate-user": "dana"}).status_code == 200
        wait_until(
            lambda: members(stack, policy) == {"anonymous", "dana"}, message="members recorded"
        )
    finally:
        delete_policies(stack)


# ---- JWT claims (Envoy's jwt_authn) -----------------------------------------


@pytest.fixture(scope="module")
def idp() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def jwt_stack(idp: Issuer) -> Iterator[Stack]:
    s = start_stack(
        ext_proc={
            "user_claim": "sub",
            "workspace_claim": "org",
            "tags_claims": "team,env=deploy_env",
        },
        envoy=lambda config: verify_jwts(config, idp.jwks),
    )
    yield s
    stop_stack(s)


def test_bad_or_missing_tokens_get_envoys_401_before_ext_proc(
    jwt_stack: Stack, idp: Issuer
) -> None:
    stack = jwt_stack
    request_headers_seen = stack.ext.ctx.stats.latency["request_headers"]
    before = sum(request_headers_seen.counts)
    other = Issuer("test-key-1")  # same kid, different key: a forged signature
    for token, why in (
        (None, "Jwt is missing"),
        (idp.token({"sub": "alice"}, expires_in=-3600), "Jwt is expired"),
        (other.token({"sub": "alice"}), "Jwt verification fails"),
        ("not-a-jwt", "Jwt is not in the form of Header.Payload.Signature"),
    ):
        headers = {JWT_HEADER: token} if token else {}
        r = post(stack.envoy.base_url, headers)
        assert r.status_code == 401 and r.text.startswith(why), r.text
    # ext_proc never saw these requests (only, at most, the response
    # headers of Envoy's own 401 on its way out).
    assert sum(request_headers_seen.counts) == before
    assert stack.provider.log.requests == []


def test_user_budget_binds_on_sub_and_the_header_cannot_override_it(
    jwt_stack: Stack, idp: Issuer
) -> None:
    stack = jwt_stack
    try:
        policy = create(stack, scope=pb.SCOPE_USER, target="*")
        alice = {JWT_HEADER: idp.token({"sub": "Alice", "org": "research"})}
        assert post(stack.envoy.base_url, alice).status_code == 200
        # Spent. The trusted loopback's user header names someone else: the
        # verified claim wins, so it is still alice's budget.
        r = post(stack.envoy.base_url, {**alice, "x-spendgate-user": "bob"})
        assert r.status_code == 429 and r.headers["x-spendgate-policy"] == policy.id
        # A fresh token for the same subject is the same member.
        again = {JWT_HEADER: idp.token({"sub": "alice"}), "x-spendgate-user": "zed"}
        assert post(stack.envoy.base_url, again).status_code == 429
        bob = {JWT_HEADER: idp.token({"sub": "bob"})}
        assert post(stack.envoy.base_url, bob).status_code == 200
        wait_until(lambda: members(stack, policy) == {"alice", "bob"}, message="alice, bob")
    finally:
        delete_policies(stack)


def test_workspace_and_tag_claims_bind_their_budgets(jwt_stack: Stack, idp: Issuer) -> None:
    stack = jwt_stack
    try:
        ws = create(stack, scope=pb.SCOPE_WORKSPACE, target="research")
        env = create(stack, scope=pb.SCOPE_TAG, target="env=*", action=pb.ACTION_ALERT)
        token = idp.token({"sub": "carol", "org": "Research", "team": "red", "deploy_env": "prod"})
        assert post(stack.envoy.base_url, {JWT_HEADER: token}).status_code == 200
        r = post(stack.envoy.base_url, {JWT_HEADER: token, "x-spendgate-workspace": "other"})
        assert r.status_code == 429 and r.headers["x-spendgate-policy"] == ws.id
        wait_until(lambda: members(stack, env) == {"prod"}, message="env tag from the claim")
        listy = idp.token({"sub": "carol", "team": ["red", "blue"]})
        assert error_of(post(stack.envoy.base_url, {JWT_HEADER: listy})) == (
            400,
            "invalid_identity",
            "JWT claim team (tag team): must be a string or a number, not a list or object.",
        )
    finally:
        delete_policies(stack)


# ---- mTLS: the peer's SPIFFE id names the SERVICE --------------------------


CHECKOUT = "spiffe://corp.test/ns/shop/sa/checkout"
BILLING = "spiffe://corp.test/ns/shop/sa/billing"
GATEWAY = "spiffe://corp.test/ns/infra/sa/gateway"


@pytest.fixture(scope="module")
def pki() -> dict[str, Pem]:
    workdir = tempdir()
    ca = CertificateAuthority(workdir)
    rogue = CertificateAuthority(workdir, "rogue CA")
    return {
        "ca": ca.pem,
        "server": ca.issue("envoy", server=True),
        "checkout": ca.issue("checkout", uris=(CHECKOUT,)),
        "billing": ca.issue("billing", uris=(BILLING,)),
        "gateway": ca.issue("gateway", uris=(GATEWAY,)),
        "rogue": rogue.issue("checkout-forged", uris=(CHECKOUT,)),
    }


@pytest.fixture(scope="module")
def mtls_stack(pki: dict[str, Pem]) -> Iterator[Stack]:
    s = start_stack(
        # Identity headers only from the gateway workload, whatever its address.
        ext_proc={"trusted_header_sources": GATEWAY},
        envoy=lambda config: require_client_certificates(config, pki["server"], pki["ca"]),
    )
    yield s
    stop_stack(s)


def tls_client(stack: Stack, pki: dict[str, Pem], who: str | None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert))
    if who is not None:
        ctx.load_cert_chain(str(pki[who].cert), str(pki[who].key))
    return httpx.Client(base_url=f"https://127.0.0.1:{stack.envoy.port}", verify=ctx)


def test_service_budget_binds_on_the_peer_spiffe_id(mtls_stack: Stack, pki: dict[str, Pem]) -> None:
    stack = mtls_stack
    try:
        policy = create(stack, scope=pb.SCOPE_SERVICE, target="*")
        ctx = ssl.create_default_context(cafile=str(pki["ca"].cert))
        ctx.load_cert_chain(str(pki["checkout"].cert), str(pki["checkout"].key))
        sdk = openai.OpenAI(
            base_url=f"https://127.0.0.1:{stack.envoy.port}/v1",
            api_key="sk-test",
            default_headers=BIG,
            http_client=httpx.Client(verify=ctx),
            max_retries=0,
        )
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        with tls_client(stack, pki, "checkout") as checkout:
            # Not trusted for headers: naming another service changes nothing.
            r = post(checkout, {"x-spendgate-service": "billing"})
            assert r.status_code == 429 and r.headers["x-spendgate-policy"] == policy.id
        with tls_client(stack, pki, "billing") as billing:
            assert post(billing).status_code == 200
        wait_until(lambda: members(stack, policy) == {CHECKOUT, BILLING}, message="both services")
        # The gateway is trusted: it names the service behind it.
        with tls_client(stack, pki, "gateway") as gateway:
            r = post(gateway, {"x-spendgate-service": CHECKOUT})
            assert r.status_code == 429
            assert post(gateway, {"x-spendgate-service": "reports"}).status_code == 200
    finally:
        delete_policies(stack)


def test_no_or_foreign_client_certificate_never_reaches_ext_proc(
    mtls_stack: Stack, pki: dict[str, Pem]
) -> None:
    stack = mtls_stack
    before = stack.ext.ctx.stats.messages
    for who in (None, "rogue"):
        with tls_client(stack, pki, who) as client, pytest.raises(httpx.TransportError):
            post(client)
    assert stack.ext.ctx.stats.messages == before
    assert stack.provider.log.requests == []


# ---- the jwt_authn filter of docs/concepts/identity.md ------------------------


def test_documented_jwt_filter_is_accepted_by_envoy(tmp_path: Path) -> None:
    """The filter docs/concepts/identity.md shows, put before ext_proc in the
    shipped bootstrap with a cluster for the JWKS host, passes validation."""
    page = (envoy_config.ROOT / "docs" / "concepts" / "identity.md").read_text()
    snippet = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    (jwt_filter,) = yaml.safe_load(snippet)
    provider = jwt_filter["typed_config"]["providers"]["corp"]
    assert provider["payload_in_metadata"] == "jwt_payload"  # ext_proc's jwt_payload_key
    config = envoy_config.load()
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    assert filters[0]["name"] == "envoy.filters.http.ext_proc"
    filters.insert(0, jwt_filter)
    config["static_resources"]["clusters"].append(
        {
            "name": "idp",
            "type": "LOGICAL_DNS",
            "load_assignment": {
                "cluster_name": "idp",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "idp.example.com",
                                            "port_value": 443,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    envoy_validate(envoy_config.write(config, tmp_path / "envoy-jwt.yaml"))
