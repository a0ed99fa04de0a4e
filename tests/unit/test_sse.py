"""SSEDecoder: line endings, fields, chunk boundaries and bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_proc.metering.meters.sse import SSEDecoder, SSEEvent, _whole_events

pytest.register_assert_rewrite("tests.unit.meter_cases")
from tests.unit.meter_cases import CUTS, bytewise, split  # noqa: E402

BOM = b"\xef\xbb\xbf"


def decode(*chunks: bytes, max_event_bytes: int = 1024 * 1024) -> list[SSEEvent]:
    decoder = SSEDecoder(max_event_bytes)
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.flush()


def ev(data: bytes, event: str | None = None) -> SSEEvent:
    return SSEEvent(event, data)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param([b"data: a\n\n"], [ev(b"a")], id="lf"),
        pytest.param([b"data: a\r\n\r\n"], [ev(b"a")], id="crlf"),
        pytest.param([b"data: a\r\r"], [ev(b"a")], id="cr"),
        pytest.param([b"data: a\r\ndata: b\rdata: c\n\n"], [ev(b"a\nb\nc")], id="mixed-endings"),
        pytest.param([b"data: a\r", b"\ndata: b\r\n\r\n"], [ev(b"a\nb")], id="crlf-split"),
        pytest.param([b"data: a\r", b"\r\n"], [ev(b"a")], id="cr-then-crlf-is-blank"),
        pytest.param([b"data: a\ndata: b\n\n"], [ev(b"a\nb")], id="multi-data-joined"),
        pytest.param([b"event: ping\ndata: {}\n\n"], [ev(b"{}", "ping")], id="event-field"),
        pytest.param([b"event:\ndata: x\n\n"], [ev(b"x")], id="empty-event-is-none"),
        pytest.param([b": keep-alive\n\ndata: x\n\n"], [ev(b"x")], id="comment-block"),
        pytest.param([b"data: x\n:comment\n\n"], [ev(b"x")], id="comment-in-event"),
        pytest.param([b"data\n\n"], [ev(b"")], id="field-without-colon"),
        pytest.param([b"data:\n\n"], [ev(b"")], id="empty-data"),
        pytest.param([b"data:x\n\n"], [ev(b"x")], id="no-space-after-colon"),
        pytest.param([b"data:  x \n\n"], [ev(b" x ")], id="only-one-space-stripped"),
        pytest.param([b"data: a:b\n\n"], [ev(b"a:b")], id="colon-in-value"),
        pytest.param([b"id: 1\nretry: 5\nfoo: bar\ndata: x\n\n"], [ev(b"x")], id="other-fields"),
        pytest.param([b"event: x\nid: 1\n\n"], [], id="no-data-no-event"),
        pytest.param([b"\n\n\r\n\r"], [], id="only-blank-lines"),
        pytest.param([BOM + b"data: x\n\n"], [ev(b"x")], id="bom"),
        pytest.param([BOM[:1], BOM[1:2], BOM[2:] + b"data: x\n\n"], [ev(b"x")], id="bom-split"),
        pytest.param(
            [b"data: x\n\n" + BOM + b"data: y\n\n"], [ev(b"x")], id="late-bom-not-stripped"
        ),
        pytest.param([b"data: x\n"], [ev(b"x")], id="flush-pending-event"),
        pytest.param([b"data: x"], [ev(b"x")], id="flush-unterminated-line"),
        pytest.param([b"data: x\r"], [ev(b"x")], id="flush-after-cr"),
        pytest.param([b"data: \xff\xfe\n\n"], [ev(b"\xff\xfe")], id="non-utf8-data-kept"),
        pytest.param([b"event: \xff\ndata: x\n\n"], [ev(b"x", "\ufffd")], id="non-utf8-event"),
        pytest.param(
            [b"data: 1\n\nevent: e\ndata: 2\n\n"], [ev(b"1"), ev(b"2", "e")], id="two-events"
        ),
    ],
)
def test_decode(chunks: list[bytes], expected: list[SSEEvent]) -> None:
    assert decode(*chunks) == expected
    assert decode(*bytewise(b"".join(chunks))) == expected


@pytest.mark.parametrize(
    ("stream", "expected", "oversized"),
    [
        pytest.param(b"data: " + b"x" * 40 + b"\n\ndata: ok\n\n", [ev(b"ok")], 1, id="long-line"),
        pytest.param(b"data: abcdefgh\n" * 3 + b"\ndata: ok\n\n", [ev(b"ok")], 1, id="long-event"),
        pytest.param(b":" + b"x" * 40 + b"\n\ndata: ok\n\n", [ev(b"ok")], 1, id="long-comment"),
        pytest.param(b"data: " + b"x" * 40 + b"\r\r\ndata: ok\n\n", [ev(b"ok")], 1, id="cr-resync"),
        pytest.param(b"data: " + b"y" * 40, [], 1, id="long-unterminated"),
        pytest.param(b"data: " + b"y" * 40 + b"\ndata: z\n", [], 1, id="no-resync-before-eof"),
        pytest.param(
            b"data: 0123456789abcdefghijklmn\n\n",
            [ev(b"0123456789abcdefghijklmn")],
            0,
            id="exactly-max",
        ),
    ],
)
def test_oversized_events_are_dropped(
    stream: bytes, expected: list[SSEEvent], oversized: int
) -> None:
    max_event_bytes = 30
    for chunks in ([stream], bytewise(stream)):
        decoder = SSEDecoder(max_event_bytes)
        events = [e for chunk in chunks for e in decoder.feed(chunk)] + decoder.flush()
        assert (events, decoder.oversized_events) == (expected, oversized)


def test_memory_is_bounded_without_line_breaks() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    for _ in range(1000):
        assert decoder.feed(b"data: " + b"x" * 4096) == []
        assert decoder.buffered_bytes <= 1000
    assert decoder.feed(b"\n\ndata: ok\n\n") == [ev(b"ok")]
    assert decoder.oversized_events == 1


# -- properties --------------------------------------------------------------

TERMINATORS = st.sampled_from([b"\n", b"\r\n", b"\r"])
VALUE = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
NAME = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), min_size=1)
EVENT = st.tuples(
    st.none() | NAME,
    st.lists(VALUE, min_size=1, max_size=4),
    st.lists(VALUE.map(lambda v: b":" + v), max_size=2),  # comments
)


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    lines: list[bytes] = []
    expected: list[SSEEvent] = []
    for name, data, comments in draw(st.lists(EVENT, max_size=6)):
        lines += comments
        if name is not None:
            lines.append(b"event: " + name.encode())
        lines += [b"data: " + value for value in data]
        lines.append(b"")
        expected.append(SSEEvent(name, b"\n".join(data)))
    out = bytearray(BOM if draw(st.booleans()) else b"")
    for line in lines:
        end = draw(TERMINATORS)
        if not line and out.endswith(b"\r") and end == b"\n":
            end = b"\r\n"  # "\r" + "\n" would read as one CRLF, not a blank line
        out += line + end
    return bytes(out), expected


@settings(database=None)
@given(event_streams(), CUTS)
def test_any_chunking_yields_the_same_events(
    stream: tuple[bytes, list[SSEEvent]], cuts: list[int]
) -> None:
    data, expected = stream
    assert decode(data) == expected
    assert decode(*split(data, cuts)) == expected


SOUP = st.lists(
    st.sampled_from(
        [b"data:", b"event: e", b" ", b":", b"x", b"x" * 30, b"\r", b"\n", BOM, b"\xff"]
    )
    | st.binary(max_size=12),
    max_size=60,
).map(b"".join)


@settings(database=None)
@given(SOUP, CUTS, st.integers(1, 40))
def test_garbage_is_chunking_invariant_and_bounded(
    data: bytes, cuts: list[int], max_event_bytes: int
) -> None:
    whole = SSEDecoder(max_event_bytes)
    expected = whole.feed(data) + whole.flush()
    decoder = SSEDecoder(max_event_bytes)
    events: list[SSEEvent] = []
    for chunk in split(data, cuts):
        events += decoder.feed(chunk)
        assert decoder.buffered_bytes <= max_event_bytes + 2
    events += decoder.flush()
    assert events == expected
    assert decoder.oversized_events == whole.oversized_events
    assert all(len(e.data) <= max_event_bytes for e in events)


# -- the whole-events path (a chunk of complete events, as providers send them) --


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        pytest.param(b'data: {"a":1}\n\n', [ev(b'{"a":1}')], id="openai"),
        pytest.param(b"data:x\n\ndata: y\n\n", [ev(b"x"), ev(b"y")], id="two-no-space"),
        pytest.param(
            b"event: message_delta\ndata: {}\n\n", [ev(b"{}", "message_delta")], id="anthropic"
        ),
        pytest.param(b": t=1\ndata: a\ndata: b\n\n", [ev(b"a\nb")], id="comment-multiline"),
    ],
)
def test_whole_events_take_the_short_path(chunk: bytes, expected: list[SSEEvent]) -> None:
    assert _whole_events(chunk, 1024) == expected
    decoder = SSEDecoder()
    decoder.feed(b"")  # past the BOM check
    assert decoder.feed(chunk) == expected
    assert decoder.buffered_bytes == 0


@pytest.mark.parametrize(
    "chunk",
    [
        b"data: a\n",  # unterminated
        b"data: a\r\n\r\n",
        b"\n\ndata: a\n\n",  # a blank line first
        b"id: 1\ndata: a\n\n",
        b"data\n\n",  # a field without a colon
        b"retry: 5\n\n",
        b": keep-alive\n\n",  # a lone comment: rare, left to the general path
        b"data: " + b"x" * 2000 + b"\n\n",  # longer than the limit
    ],
)
def test_anything_else_takes_the_general_path(chunk: bytes) -> None:
    assert _whole_events(chunk, 1024) is None


@settings(database=None)
@given(event_streams() | SOUP.map(lambda b: (b, [])), st.integers(1, 60))
def test_the_short_path_agrees_with_the_general_one(
    stream: tuple[bytes, list[SSEEvent]], max_event_bytes: int
) -> None:
    data = stream[0].replace(b"\r", b"")
    whole = SSEDecoder(max_event_bytes)
    events = whole.feed(data) + whole.flush()
    assert events == bytewise_decode(data, max_event_bytes)


def bytewise_decode(data: bytes, max_event_bytes: int) -> list[SSEEvent]:
    """One byte at a time: never a chunk of whole events, always the general path."""
    decoder = SSEDecoder(max_event_bytes)
    events = [e for i in range(len(data)) for e in decoder.feed(data[i : i + 1])]
    return events + decoder.flush()
