"""Client requests as a hostile client sends them: paths, credentials,
identity headers, model names, stream flags and bodies of every kind, for
each API shape spendgate meters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

from tests.fuzz import values

# shape -> (path template, credential headers); {model} is filled in.
SHAPES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "openai": ("/v1/chat/completions", (("authorization", "Bearer sk-fuzz"),)),
    "openai-responses": ("/v1/responses", (("authorization", "Bearer sk-fuzz"),)),
    "openai-embeddings": ("/v1/embeddings", (("authorization", "Bearer sk-fuzz"),)),
    "azure": (
        "/openai/deployments/{model}/chat/completions?api-version=2024-10-21",
        (("api-key", "azure-fuzz"),),
    ),
    "anthropic": (
        "/v1/messages",
        (("x-api-key", "sk-ant-fuzz"), ("anthropic-version", "2023-06-01")),
    ),
    "gemini": ("/v1beta/models/{model}:generateContent", (("x-goog-api-key", "AIza-fuzz"),)),
    "gemini-stream": (
        "/v1beta/models/{model}:streamGenerateContent?alt=sse",
        (("x-goog-api-key", "AIza-fuzz"),),
    ),
    "bedrock": ("/model/{model}/converse", (("authorization", "Bearer bedrock-fuzz"),)),
}
IDENTITY = ("x-spendgate-user", "x-spendgate-workspace", "x-spendgate-service", "x-spendgate-tags")


@dataclass(frozen=True)
class Request:
    shape: str
    method: str
    path: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis prints this
        p.text(repr(self))

    def __repr__(self) -> str:
        def short(b: bytes | str) -> str:
            r = repr(b)
            return r if len(r) <= 300 else f"{r[:300]}...({len(b)} bytes)"

        heads = ", ".join(f"{short(k)}: {short(v)}" for k, v in self.headers)
        return (
            f"Request({self.shape} {self.method} {short(self.path)}, "
            f"headers=[{heads}], body={short(self.body)})"
        )


def header_value() -> st.SearchStrategy[bytes]:
    """What HTTP/1.1 lets a client put in a header: visible ASCII, tabs,
    obs-text bytes; short, long, and near Envoy's 60 KB header limit. (DEL
    and other controls make Envoy's own codec answer 400 and close the
    connection before any filter runs: nothing of spendgate's to test.)"""
    return _header_value().map(lambda b: b.strip(b" \t"))


def _header_value() -> st.SearchStrategy[bytes]:
    visible = st.binary(max_size=200).map(
        lambda b: bytes(c for c in b if c == 9 or 32 <= c < 127 or c >= 128).strip()
    )
    return st.one_of(
        st.sampled_from([b"", b"alice", b"*", b"ALICE", b"a=b,c=d", b"=,=,", b"\xc3\xa9", b"\xff"]),
        visible,
        st.text(max_size=30)
        .map(lambda t: t.encode())
        .map(lambda b: bytes(c for c in b if c == 9 or (c >= 32 and c != 127)).strip()),
        st.sampled_from([1_000, 16_000, 40_000]).map(lambda n: b"u" * n),
        st.integers(1, 200).map(lambda n: ",".join(f"k{i}=v{i}" for i in range(n)).encode()),
    )


def model_value() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(["gpt-4o-mini", "claude-3-5-haiku-20241022", "gemini-2.0-flash"]),
        st.sampled_from(["", " ", "GPT-4O", "gpt-4o\x00", "\x1b]0;owned\x07", "../../etc"]),
        values.wild_text(),
        st.sampled_from([None, 1, 1.5, True, [], {}, ["gpt-4o"], {"name": "gpt-4o"}]),
    )


def json_value() -> st.SearchStrategy[Any]:
    return st.sampled_from(
        [True, False, None, 0, 1, -1, "true", "false", "1", "", 2**64, 1e308, [], {}, [True]]
    )


def body_for(shape: str) -> st.SearchStrategy[bytes]:
    messages = st.one_of(
        st.just([{"role": "user", "content": "hi"}]),
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "x"]), "content": values.wild_text(big=False)}
            ),
            max_size=3,
        ),
        json_value(),
    )
    fields = {
        "openai": {"messages": messages},
        "openai-responses": {"input": st.one_of(values.wild_text(big=False), messages)},
        "openai-embeddings": {"input": st.one_of(values.wild_text(big=False), messages)},
        "azure": {"messages": messages},
        "anthropic": {"messages": messages, "max_tokens": values.wild_int(64)},
        "gemini": {"contents": st.just([{"parts": [{"text": "hi"}]}])},
        "gemini-stream": {"contents": st.just([{"parts": [{"text": "hi"}]}])},
        "bedrock": {"messages": st.just([{"role": "user", "content": [{"text": "hi"}]}])},
    }.get(shape, {})
    optional = {
        "model": model_value(),
        "stream": st.one_of(json_value(), st.booleans()),
        "max_tokens": st.one_of(values.wild_int(64), json_value()),
        "stream_options": st.one_of(json_value(), st.just({"include_usage": False})),
        "max_completion_tokens": values.wild_int(64),
    }
    optional = {k: v for k, v in optional.items() if k not in fields}
    structured = st.fixed_dictionaries(fields, optional=optional).map(
        lambda d: json.dumps(d).encode()
    )
    duplicated = st.tuples(model_value(), model_value()).map(
        lambda ms: (
            b'{"model": %s, "model": %s, "messages": []}'
            % (json.dumps(ms[0]).encode(), json.dumps(ms[1]).encode())
        )
    )
    raw = st.one_of(
        st.sampled_from(
            [b"", b"{", b"[]", b"null", b'"x"', b"{}", b"\xff\xfe", b'{"model": NaN}', b"\x1f\x8b"]
        ),
        st.binary(max_size=500),
        st.sampled_from([1_000_000, 5_000_000]).map(lambda n: b"{" * n),
        st.sampled_from([1_000_000, 5_000_000]).map(
            lambda n: b'{"model": "gpt-4o-mini", "messages": [], "pad": "' + b"x" * n + b'"}'
        ),
    )
    return st.one_of(structured, duplicated, raw)


def _path(shape: str, model: str, suffix: str) -> str:
    template = SHAPES[shape][0]
    return template.replace("{model}", quote(model, safe="")) + suffix


@st.composite
def request(draw: st.DrawFn) -> Request:
    shape = draw(st.sampled_from(sorted(SHAPES)))
    path_model = draw(
        st.one_of(
            st.sampled_from(["gpt-4o-mini", "gemini-2.0-flash"]),
            values.wild_text(big=False, max_small=1000),
            # Long paths, up to past Envoy's 60 KB header limit (httpx's URL limit is 64 KB).
            st.sampled_from([1_000, 8_000, 20_000]).map(lambda n: "m" * n),
        )
    )
    suffix = draw(
        st.sampled_from(["", "/", "?x=1", "//", "/../chat/completions", "%2F", "?key=AIza"])
    )
    path = _path(shape, path_model, suffix)
    if draw(st.booleans()) and draw(st.booleans()):
        path = "/" + quote(draw(values.wild_text(big=False, max_small=1000)), safe="/?=&%")
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]))
    headers: list[tuple[bytes, bytes]] = []
    credentials = draw(st.sampled_from(["as-shape", "as-shape", "none", "twice", "wild"]))
    for name, value in SHAPES[shape][1]:
        if credentials == "as-shape":
            headers.append((name.encode(), value.encode()))
        elif credentials == "twice":
            headers += [(name.encode(), value.encode()), (name.encode(), b"other")]
        elif credentials == "wild":
            headers.append((name.encode(), draw(header_value())))
    for name in IDENTITY:
        if draw(st.booleans()):
            for _ in range(draw(st.integers(1, 2))):
                headers.append((name.encode(), draw(header_value())))
    if draw(st.booleans()):
        headers.append(
            (
                b"content-type",
                draw(
                    st.sampled_from(
                        [
                            b"application/json",
                            b"text/plain",
                            b"",
                            b"application/json; charset=latin-1",
                        ]
                    )
                ),
            )
        )
    if draw(st.booleans()):
        headers.append(
            (b"content-encoding", draw(st.sampled_from([b"gzip", b"deflate", b"br", b"identity"])))
        )
    # Provider token counts are the provider fuzz's business; here a few.
    if draw(st.booleans()):
        headers.append((b"x-fake-completion-tokens", str(draw(st.integers(0, 100_000))).encode()))
    return Request(shape, method, path, _within_envoy_limit(headers, path), draw(body_for(shape)))


# Past Envoy's 60 KB limit for the request line and headers, Envoy's HTTP/1
# codec answers 431 and closes the connection (the client, still writing,
# may see a reset) before any filter runs: nothing of spendgate's to test.
HEADER_BUDGET = 56_000


def _within_envoy_limit(
    headers: list[tuple[bytes, bytes]], path: str
) -> tuple[tuple[bytes, bytes], ...]:
    left = HEADER_BUDGET - len(path)
    kept = []
    for name, value in headers:
        value = value[: max(0, left - len(name) - 4)].strip(b" \t")
        left -= len(name) + len(value) + 4
        kept.append((name, value))
    return tuple(kept)
