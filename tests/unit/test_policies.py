"""Budget policies: target normalisation, field validation, request matching."""

from __future__ import annotations

import hashlib

import pytest

from spendgate.domain.policies import (
    MAX_AMOUNT_NANOS,
    MAX_NAME_LENGTH,
    MAX_TARGET_LENGTH,
    Action,
    FieldViolation,
    Policy,
    PolicyIndex,
    PolicyInvalid,
    RequestFacts,
    Scope,
    hash_api_key,
    normalize_target,
    validate_policy,
)
from spendgate.domain.windows import WindowSpec, WindowUnit

RAW_KEY = "sk-test-0123456789"
KEY_HASH = "sha256:" + hashlib.sha256(RAW_KEY.encode()).hexdigest()
OTHER_HASH = "sha256:" + "ab" * 32
DAY = WindowSpec(WindowUnit.DAYS)


def test_hash_api_key_is_sha256_hex_with_prefix() -> None:
    assert hash_api_key(RAW_KEY) == KEY_HASH
    assert len(KEY_HASH) == len("sha256:") + 64


# ---- normalize_target ----


@pytest.mark.parametrize(
    ("scope", "target", "expected"),
    [
        pytest.param(Scope.GLOBAL, "", "", id="global-empty"),
        pytest.param(Scope.GLOBAL, "*", "", id="global-star"),
        pytest.param(Scope.GLOBAL, "  *  ", "", id="global-star-padded"),
        pytest.param(Scope.WORKSPACE, "research", "research", id="workspace-name"),
        pytest.param(Scope.WORKSPACE, "*", "*", id="workspace-star"),
        pytest.param(Scope.ENDPOINT, " openai_route ", "openai_route", id="endpoint-stripped"),
        pytest.param(Scope.USER, "Alice", "alice", id="user-caseless"),
        pytest.param(Scope.USER, "\uff21lice", "alice", id="user-fullwidth-folded"),
        pytest.param(Scope.WORKSPACE, " Research ", "research", id="workspace-caseless"),
        pytest.param(
            Scope.SERVICE,
            "spiffe://Corp.example/ns/app/sa/Checkout",
            "spiffe://corp.example/ns/app/sa/checkout",
            id="service-spiffe",
        ),
        pytest.param(Scope.SERVICE, "*", "*", id="service-star"),
        pytest.param(Scope.USER, "*", "*", id="user-star"),
        pytest.param(Scope.API_KEY, RAW_KEY, KEY_HASH, id="api-key-raw-hashed"),
        pytest.param(Scope.API_KEY, f"  {RAW_KEY}  ", KEY_HASH, id="api-key-raw-stripped"),
        pytest.param(Scope.API_KEY, KEY_HASH, KEY_HASH, id="api-key-hash-kept"),
        pytest.param(Scope.API_KEY, OTHER_HASH, OTHER_HASH, id="api-key-other-hash-kept"),
        pytest.param(Scope.API_KEY, "*", "*", id="api-key-star"),
        pytest.param(
            Scope.API_KEY,
            "sha256:" + "AB" * 32,
            hash_api_key("sha256:" + "AB" * 32),
            id="api-key-upper-hex-is-a-raw-key",
        ),
        pytest.param(Scope.API_KEY, "sha256:abc", hash_api_key("sha256:abc"), id="api-key-short"),
        pytest.param(Scope.MODEL, "GPT-4o-Mini", "gpt-4o-mini", id="model-lower"),
        pytest.param(Scope.MODEL, "*", "*", id="model-star"),
        pytest.param(Scope.PROVIDER, "OpenAI", "openai", id="provider-lower"),
        pytest.param(Scope.TAG, "team=search", "team=search", id="tag-exact"),
        pytest.param(Scope.TAG, " team = search ", "team=search", id="tag-padded"),
        pytest.param(Scope.TAG, "team=*", "team=*", id="tag-wildcard"),
        pytest.param(Scope.TAG, "Team=Search", "team=search", id="tag-caseless"),
        pytest.param(Scope.TAG, "Team=*", "team=*", id="tag-wildcard-key-caseless"),
        pytest.param(Scope.TAG, "k=a=b", "k=a=b", id="tag-value-with-equals"),
    ],
)
def test_normalize_target(scope: Scope, target: str, expected: str) -> None:
    assert normalize_target(scope, target) == expected


@pytest.mark.parametrize(
    ("scope", "target", "description"),
    [
        pytest.param(Scope.GLOBAL, "team", "must be empty for scope GLOBAL", id="global-name"),
        pytest.param(
            Scope.WORKSPACE,
            "",
            "is required for scope WORKSPACE (a name, or '*' for each member)",
            id="workspace-missing",
        ),
        pytest.param(
            Scope.ENDPOINT,
            "   ",
            "is required for scope ENDPOINT (a name, or '*' for each member)",
            id="endpoint-blank",
        ),
        pytest.param(
            Scope.USER,
            "",
            "is required for scope USER (a name, or '*' for each member)",
            id="user-missing",
        ),
        pytest.param(
            Scope.API_KEY,
            "",
            "is required for scope API_KEY (a name, or '*' for each member)",
            id="api-key-missing",
        ),
        pytest.param(
            Scope.MODEL,
            "",
            "is required for scope MODEL (a name, or '*' for each member)",
            id="model-missing",
        ),
        pytest.param(
            Scope.PROVIDER,
            "",
            "is required for scope PROVIDER (a name, or '*' for each member)",
            id="provider-missing",
        ),
        pytest.param(
            Scope.TAG,
            "",
            "is required for scope TAG (a name, or '*' for each member)",
            id="tag-missing",
        ),
        pytest.param(
            Scope.TAG, "team", "must be 'key=value' or 'key=*' for scope TAG", id="tag-no-equals"
        ),
        pytest.param(
            Scope.TAG, "=search", "must be 'key=value' or 'key=*' for scope TAG", id="tag-no-key"
        ),
        pytest.param(
            Scope.TAG, "team=", "must be 'key=value' or 'key=*' for scope TAG", id="tag-no-value"
        ),
        pytest.param(
            Scope.TAG, " = ", "must be 'key=value' or 'key=*' for scope TAG", id="tag-blank-both"
        ),
        pytest.param(Scope.TAG, "*", "must be 'key=value' or 'key=*' for scope TAG", id="tag-star"),
        pytest.param(
            Scope.ENDPOINT,
            "u" * (MAX_TARGET_LENGTH + 1),
            f"must be at most {MAX_TARGET_LENGTH} characters (got {MAX_TARGET_LENGTH + 1})",
            id="too-long",
        ),
        pytest.param(
            Scope.USER,
            "u" * 257,
            "user: is longer than 256 bytes (UTF-8)",
            id="user-over-member-bound",
        ),
        pytest.param(
            Scope.USER,
            "\u0430lice",
            "user: mixes letters of scripts that are not written together (CYRILLIC, LATIN)",
            id="user-cyrillic-look-alike",
        ),
        pytest.param(
            Scope.TAG,
            "team=red\u200b",
            "tag value: contains an invisible format character (U+200B), which is not allowed",
            id="tag-zero-width",
        ),
    ],
)
def test_normalize_target_rejects(scope: Scope, target: str, description: str) -> None:
    with pytest.raises(PolicyInvalid) as info:
        normalize_target(scope, target)
    assert info.value.violations == [FieldViolation("target", description)]
    assert str(info.value) == f"target: {description}"


def test_normalize_target_accepts_max_length() -> None:
    assert normalize_target(Scope.ENDPOINT, "u" * MAX_TARGET_LENGTH) == "u" * MAX_TARGET_LENGTH
    assert normalize_target(Scope.USER, "u" * 256) == "u" * 256


# ---- validate_policy ----


@pytest.mark.parametrize(
    ("name", "amount", "thresholds", "expected"),
    [
        pytest.param("team", 1, (50, 80, 100), [], id="valid"),
        pytest.param("team", None, (), [], id="amount-not-given"),
        pytest.param("t" * MAX_NAME_LENGTH, MAX_AMOUNT_NANOS, (1, 1000), [], id="limits"),
        pytest.param("", 1, (), [FieldViolation("name", "is required")], id="name-empty"),
        pytest.param("  ", 1, (), [FieldViolation("name", "is required")], id="name-blank"),
        pytest.param(
            "t" * (MAX_NAME_LENGTH + 1),
            1,
            (),
            [
                FieldViolation(
                    "name",
                    f"must be at most {MAX_NAME_LENGTH} characters (got {MAX_NAME_LENGTH + 1})",
                )
            ],
            id="name-too-long",
        ),
        pytest.param(
            "team", 0, (), [FieldViolation("amount_usd", "must be greater than 0")], id="amount-0"
        ),
        pytest.param(
            "team",
            -5,
            (),
            [FieldViolation("amount_usd", "must be greater than 0")],
            id="amount-negative",
        ),
        pytest.param(
            "team",
            MAX_AMOUNT_NANOS + 1,
            (),
            [FieldViolation("amount_usd", "must be at most 1000000000")],
            id="amount-too-large",
        ),
        pytest.param(
            "team",
            1,
            (0, 1001),
            [
                FieldViolation("alert_thresholds", "0 is not in 1..1000"),
                FieldViolation("alert_thresholds", "1001 is not in 1..1000"),
            ],
            id="thresholds-out-of-range",
        ),
        pytest.param(
            "team",
            1,
            (50, 80, 50),
            [FieldViolation("alert_thresholds", "50 is listed twice")],
            id="threshold-twice",
        ),
        pytest.param(
            "",
            0,
            (2000,),
            [
                FieldViolation("name", "is required"),
                FieldViolation("amount_usd", "must be greater than 0"),
                FieldViolation("alert_thresholds", "2000 is not in 1..1000"),
            ],
            id="all-fields-wrong",
        ),
    ],
)
def test_validate_policy(
    name: str, amount: int | None, thresholds: tuple[int, ...], expected: list[FieldViolation]
) -> None:
    assert validate_policy(name=name, amount_nanos=amount, alert_thresholds=thresholds) == expected


# ---- Policy ----


def policy(
    pid: str,
    scope: Scope,
    target: str = "",
    *,
    enabled: bool = True,
    action: Action = Action.REJECT,
) -> Policy:
    return Policy(pid, pid, 10**9, DAY, action, scope, target, enabled=enabled)


@pytest.mark.parametrize(
    ("scope", "target", "wildcard"),
    [
        pytest.param(Scope.GLOBAL, "", False, id="global"),
        pytest.param(Scope.USER, "*", True, id="user-star"),
        pytest.param(Scope.USER, "alice", False, id="user-name"),
        pytest.param(Scope.TAG, "team=*", True, id="tag-star"),
        pytest.param(Scope.TAG, "team=search", False, id="tag-value"),
    ],
)
def test_policy_is_wildcard(scope: Scope, target: str, wildcard: bool) -> None:
    assert policy("p", scope, target).is_wildcard is wildcard


# ---- PolicyIndex.matches ----

ALL_FACTS = RequestFacts(
    route="openai_route",
    user="alice",
    api_key_hash=KEY_HASH,
    workspace="research",
    provider="openai",
    model="gpt-4o-mini",
    tags={"team": "search", "env": "prod"},
    service="spiffe://corp/checkout",
)


def matched(index: PolicyIndex, facts: RequestFacts) -> list[tuple[str, str]]:
    return [(p.id, member) for p, member in index.matches(facts)]


@pytest.mark.parametrize(
    ("scope", "exact_target", "member"),
    [
        pytest.param(Scope.WORKSPACE, "research", "research", id="workspace"),
        pytest.param(Scope.ENDPOINT, "openai_route", "openai_route", id="endpoint"),
        pytest.param(Scope.USER, "alice", "alice", id="user"),
        pytest.param(Scope.API_KEY, KEY_HASH, KEY_HASH, id="api-key"),
        pytest.param(Scope.MODEL, "gpt-4o-mini", "gpt-4o-mini", id="model"),
        pytest.param(Scope.PROVIDER, "openai", "openai", id="provider"),
        pytest.param(
            Scope.SERVICE, "spiffe://corp/checkout", "spiffe://corp/checkout", id="service"
        ),
    ],
)
def test_matches_scope_exact_and_wildcard(scope: Scope, exact_target: str, member: str) -> None:
    index = PolicyIndex(
        [
            policy("exact", scope, exact_target),
            policy("other", scope, "someone-else"),
            policy("each", scope, "*"),
        ]
    )
    # The exact policy charges the policy as a whole (""); the wildcard one the member.
    assert matched(index, ALL_FACTS) == [("exact", ""), ("each", member)]
    # A request without that fact matches neither.
    assert matched(index, RequestFacts()) == []


@pytest.mark.parametrize(
    ("target", "facts", "expected"),
    [
        pytest.param("team=search", ALL_FACTS, [("p", "")], id="exact-hit"),
        pytest.param("team=ads", ALL_FACTS, [], id="exact-other-value"),
        pytest.param("team=*", ALL_FACTS, [("p", "search")], id="wildcard-member-is-value"),
        pytest.param("env=*", ALL_FACTS, [("p", "prod")], id="wildcard-other-key"),
        pytest.param("owner=*", ALL_FACTS, [], id="wildcard-absent-key"),
        pytest.param("team=search", RequestFacts(), [], id="no-tags"),
        pytest.param(
            "team=search", RequestFacts(tags={"Team": "search"}), [], id="key-case-sensitive"
        ),
    ],
)
def test_matches_tags(target: str, facts: RequestFacts, expected: list[tuple[str, str]]) -> None:
    assert matched(PolicyIndex([policy("p", Scope.TAG, target)]), facts) == expected


def test_matches_global_always() -> None:
    index = PolicyIndex([policy("g", Scope.GLOBAL)])
    assert matched(index, RequestFacts()) == [("g", "")]
    assert matched(index, ALL_FACTS) == [("g", "")]


def test_disabled_policies_are_not_indexed() -> None:
    index = PolicyIndex(
        [
            policy("g-off", Scope.GLOBAL, enabled=False),
            policy("user-off", Scope.USER, "alice", enabled=False),
            policy("each-off", Scope.USER, "*", enabled=False),
            policy("tag-off", Scope.TAG, "team=*", enabled=False),
            policy("model-off", Scope.MODEL, "gpt-4o-mini", enabled=False),
            policy("on", Scope.USER, "alice"),
        ]
    )
    assert matched(index, ALL_FACTS) == [("on", "")]
    assert len(index) == 1
    assert list(index.policies) == ["on"]
    # Only enabled model policies make the model worth reading.
    assert index.needs_model is False


def test_needs_model() -> None:
    assert PolicyIndex([policy("m", Scope.MODEL, "*")]).needs_model is True
    assert PolicyIndex([policy("u", Scope.USER, "*")]).needs_model is False
    assert PolicyIndex(()).needs_model is False


def test_every_policy_that_applies_is_matched_in_order() -> None:
    index = PolicyIndex(
        [
            policy("global-1", Scope.GLOBAL),
            policy("global-2", Scope.GLOBAL, ""),
            policy("ws", Scope.WORKSPACE, "research"),
            policy("route-each", Scope.ENDPOINT, "*"),
            policy("alice", Scope.USER, "alice"),
            policy("bob", Scope.USER, "bob"),
            policy("user-each", Scope.USER, "*"),
            policy("key", Scope.API_KEY, KEY_HASH),
            policy("key-each", Scope.API_KEY, "*"),
            policy("mini", Scope.MODEL, "gpt-4o-mini"),
            policy("gpt4o", Scope.MODEL, "gpt-4o"),
            policy("openai-each", Scope.PROVIDER, "*"),
            policy("team-search", Scope.TAG, "team=search"),
            policy("env-each", Scope.TAG, "env=*"),
            policy("disabled", Scope.GLOBAL, enabled=False),
        ]
    )
    assert matched(index, ALL_FACTS) == [
        ("global-1", ""),
        ("global-2", ""),
        ("ws", ""),
        ("route-each", "openai_route"),
        ("alice", ""),
        ("user-each", "alice"),
        ("key", ""),
        ("key-each", KEY_HASH),
        ("mini", ""),
        ("openai-each", "openai"),
        ("team-search", ""),
        ("env-each", "prod"),
    ]
    bob = RequestFacts(user="bob", model="gpt-4o")
    assert matched(index, bob) == [
        ("global-1", ""),
        ("global-2", ""),
        ("bob", ""),
        ("user-each", "bob"),
        ("gpt4o", ""),
    ]


def test_two_policies_same_exact_target_both_match() -> None:
    index = PolicyIndex([policy("a", Scope.USER, "alice"), policy("b", Scope.USER, "alice")])
    assert matched(index, RequestFacts(user="alice")) == [("a", ""), ("b", "")]


def test_same_value_in_different_scopes_does_not_cross_match() -> None:
    # A user named like a workspace must not match the workspace policy.
    index = PolicyIndex([policy("ws", Scope.WORKSPACE, "research")])
    assert matched(index, RequestFacts(user="research")) == []


def test_targets_stored_before_canonical_members_still_bind() -> None:
    # Rows written by an older release keep their spelling; the index
    # matches them in canonical form, as ext_proc gives request values.
    index = PolicyIndex(
        [
            policy("user", Scope.USER, "Alice"),
            policy("tag", Scope.TAG, "Team=Search"),
            policy("each", Scope.TAG, "Env=*"),
            policy("broken", Scope.USER, "bad\u200bname"),  # never canonical: matches nothing
        ]
    )
    assert matched(index, ALL_FACTS) == [("user", ""), ("tag", ""), ("each", "prod")]


def test_unidentified_lists_rejecting_wildcards_the_request_escapes() -> None:
    index = PolicyIndex(
        [
            policy("user-each", Scope.USER, "*", action=Action.REJECT),
            policy("user-alert", Scope.USER, "*", action=Action.ALERT),
            policy("ws-each", Scope.WORKSPACE, "*", action=Action.REJECT),
            policy("svc-each", Scope.SERVICE, "*", action=Action.REJECT),
            policy("team-each", Scope.TAG, "team=*", action=Action.REJECT),
            policy("key-each", Scope.API_KEY, "*", action=Action.REJECT),
            policy("alice", Scope.USER, "alice", action=Action.REJECT),
        ]
    )
    missing = [(p.id, lacking) for p, lacking in index.unidentified(RequestFacts())]
    assert missing == [
        ("user-each", "user"),
        ("ws-each", "workspace"),
        ("svc-each", "service"),
        ("team-each", "tag team"),
    ]
    assert index.unidentified(ALL_FACTS) == []
    assert index.wildcard_tag_keys == frozenset({"team"})
