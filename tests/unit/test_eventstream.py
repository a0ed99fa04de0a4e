"""EventStreamDecoder: header types, bad frames, chunk boundaries, bounded memory.

Streams are encoded by the test-side encoder in tests/fixtures/bedrock/streams.py
and every decode is cross-checked against botocore's EventStreamBuffer.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from botocore.eventstream import EventStreamBuffer, ParserError
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_proc.metering.meters.eventstream import EventMessage, EventStreamDecoder, HeaderValue
from tests.fixtures.bedrock.streams import STREAMS, Header, encode_message

pytest.register_assert_rewrite("tests.unit.meter_cases")
from tests.unit.meter_cases import CUTS, bytewise, split  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "fixtures" / "bedrock"
UUID = bytes(range(16))


def decode(*chunks: bytes, max_message_bytes: int = 1024) -> tuple[list[EventMessage], int, bool]:
    decoder = EventStreamDecoder(max_message_bytes)
    messages = [m for chunk in chunks for m in decoder.feed(chunk)]
    return messages, decoder.bad_frames, decoder.broken


def botocore_decode(data: bytes) -> list[EventMessage]:
    """What botocore decodes, up to the first error it raises."""
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    messages = []
    try:
        for message in buffer:
            messages.append(EventMessage(message.headers, message.payload))
    except ParserError:
        pass
    return messages


def msg(payload: bytes = b"", **headers: HeaderValue) -> EventMessage:
    return EventMessage(headers, payload)


def frame(total: int, headers_len: int, rest: bytes = b"") -> bytes:
    """A prelude with a valid CRC (whatever the lengths say) and what follows."""
    prelude = struct.pack(">II", total, headers_len)
    return prelude + struct.pack(">I", zlib.crc32(prelude)) + rest


def with_crc(data: bytes) -> bytes:
    return data + struct.pack(">I", zlib.crc32(data))


def raw_headers(headers: bytes, payload: bytes = b"") -> bytes:
    """A message with valid CRCs around an arbitrary headers section."""
    return with_crc(frame(16 + len(headers) + len(payload), len(headers), headers + payload))


A = encode_message(b"a", [("n", 7, "1")])
B = encode_message(b"b", [("n", 7, "2")])


@pytest.mark.parametrize(
    ("headers", "payload", "expected"),
    [
        pytest.param([], b"", msg(), id="empty"),
        pytest.param([], b'{"x":1}', msg(b'{"x":1}'), id="payload-only"),
        pytest.param(
            [(":event-type", 7, "metadata"), (":message-type", 7, "event")],
            b"{}",
            msg(b"{}", **{":event-type": "metadata", ":message-type": "event"}),
            id="strings",
        ),
        pytest.param([("t", 0, None), ("f", 1, None)], b"", msg(t=True, f=False), id="bools"),
        pytest.param(
            [("b", 2, -128), ("s", 3, -32768), ("i", 4, 2**31 - 1), ("l", 5, -(2**63))],
            b"",
            msg(b=-128, s=-32768, i=2**31 - 1, l=-(2**63)),
            id="integers",
        ),
        pytest.param([("ts", 8, 1741570283000)], b"", msg(ts=1741570283000), id="timestamp"),
        pytest.param([("raw", 6, b"\x00\xff")], b"", msg(raw=b"\x00\xff"), id="bytes"),
        pytest.param([("id", 9, UUID)], b"", msg(id=UUID), id="uuid"),
        pytest.param([("", 7, "")], b"", msg(**{"": ""}), id="empty-name-and-value"),
        pytest.param([("é", 7, "ü→")], b"\xff", msg(b"\xff", **{"é": "ü→"}), id="utf8"),
        pytest.param([("big", 6, b"x" * 65535)], b"", msg(big=b"x" * 65535), id="max-value-len"),
    ],
)
def test_decode(headers: list[Header], payload: bytes, expected: EventMessage) -> None:
    data = encode_message(payload, headers)
    assert decode(data, max_message_bytes=1 << 20) == ([expected], 0, False)
    assert decode(*bytewise(data), max_message_bytes=1 << 20)[0] == [expected]
    assert botocore_decode(data) == [expected]


def test_fixture_files_match_the_encoder() -> None:
    for name, data in STREAMS.items():
        assert (FIXTURES / name).read_bytes() == data, f"regenerate {name}"
        messages, bad, broken = decode(data)
        assert (bad, broken) == (0, False)
        assert messages == botocore_decode(data)


BAD_PRELUDE_CRC = bytearray(A)
BAD_PRELUDE_CRC[8] ^= 1
BAD_MESSAGE_CRC = bytearray(A)
BAD_MESSAGE_CRC[-1] ^= 1


@pytest.mark.parametrize(
    ("data", "expected", "bad_frames", "broken"),
    [
        pytest.param(A + bytes(BAD_PRELUDE_CRC) + B, [msg(b"a", n="1")], 1, True, id="prelude-crc"),
        pytest.param(A + bytes(BAD_MESSAGE_CRC) + B, [msg(b"a", n="1")], 1, True, id="message-crc"),
        pytest.param(frame(15, 0, bytes(20)) + A, [], 1, True, id="total-below-16"),
        pytest.param(frame(20, 5, bytes(8)) + A, [], 1, True, id="headers-past-end"),
        pytest.param(frame(0xFFFFFFFF, 0xFFFFFFF0) + A, [], 1, True, id="huge-headers-len"),
        pytest.param(
            raw_headers(b"\x01n\x0a") + A, [msg(b"a", n="1")], 1, False, id="unknown-type"
        ),
        pytest.param(
            raw_headers(b"\x01n\x07\x00\x05ab") + A, [msg(b"a", n="1")], 1, False, id="value-cut"
        ),
        pytest.param(raw_headers(b"\x05n") + A, [msg(b"a", n="1")], 1, False, id="name-cut"),
        pytest.param(raw_headers(b"\x01n") + A, [msg(b"a", n="1")], 1, False, id="type-missing"),
        pytest.param(raw_headers(b"\x01n\x04\x00") + A, [msg(b"a", n="1")], 1, False, id="int-cut"),
        pytest.param(
            raw_headers(b"\x01n\x09" + bytes(15)) + A, [msg(b"a", n="1")], 1, False, id="uuid-cut"
        ),
        pytest.param(
            raw_headers(b"\x01\xff\x07\x00\x00") + A, [msg(b"a", n="1")], 1, False, id="bad-utf8"
        ),
        pytest.param(
            encode_message(b"", [("n", 7, "1"), ("n", 7, "2")]) + A,
            [msg(b"a", n="1")],
            1,
            False,
            id="duplicate-header",
        ),
    ],
)
def test_bad_frames(
    data: bytes, expected: list[EventMessage], bad_frames: int, broken: bool
) -> None:
    assert decode(data) == (expected, bad_frames, broken)
    assert decode(*bytewise(data)) == (expected, bad_frames, broken)
    if broken:  # botocore stops there too (it raises)
        assert botocore_decode(data) == expected


def test_oversized_message_is_skipped_unbuffered() -> None:
    big = encode_message(b"x" * 500, [("n", 7, "big")])
    decoder = EventStreamDecoder(max_message_bytes=100)
    messages = []
    for b in A + big + B:
        messages += decoder.feed(bytes([b]))
        assert decoder.buffered_bytes <= 100
    assert messages == [msg(b"a", n="1"), msg(b"b", n="2")]
    assert (decoder.oversized_messages, decoder.bad_frames, decoder.broken) == (1, 0, False)


def test_broken_decoder_ignores_the_rest() -> None:
    decoder = EventStreamDecoder()
    assert decoder.feed(bytes(BAD_PRELUDE_CRC)) == []
    assert decoder.broken
    assert decoder.feed(A) == []
    assert (decoder.bad_frames, decoder.buffered_bytes) == (1, 0)


def test_truncated_stream_keeps_its_partial_message() -> None:
    decoder = EventStreamDecoder()
    assert decoder.feed(A + B[:-1]) == [msg(b"a", n="1")]
    assert decoder.buffered_bytes == len(B) - 1
    assert decoder.feed(B[-1:]) == [msg(b"b", n="2")]
    assert (decoder.buffered_bytes, decoder.bad_frames, decoder.broken) == (0, 0, False)


def test_flush_emits_nothing() -> None:
    decoder = EventStreamDecoder()
    assert decoder.feed(A + B[:-1]) == [msg(b"a", n="1")]
    assert decoder.flush() == []  # a partial message is incomplete: it is never emitted


# -- properties ----------------------------------------------------------------

INT = {2: 8, 3: 16, 4: 32, 5: 64, 8: 64}
VALUES = st.one_of(
    st.sampled_from([(0, None), (1, None)]),
    *(
        st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).map(lambda v, k=k: (k, v))
        for k, bits in INT.items()
    ),
    st.binary(max_size=40).map(lambda v: (6, v)),
    st.text(max_size=40).map(lambda v: (7, v)),
    st.binary(min_size=16, max_size=16).map(lambda v: (9, v)),
)
HEADERS = st.dictionaries(st.text(max_size=20), VALUES, max_size=6).map(
    lambda d: [(name, kind, value) for name, (kind, value) in d.items()]
)
MESSAGES = st.lists(st.tuples(HEADERS, st.binary(max_size=200)), min_size=1, max_size=6)


def expected_value(kind: int, value: HeaderValue | None) -> HeaderValue | None:
    return kind == 0 if kind in (0, 1) else value


@settings(database=None)
@given(MESSAGES, CUTS)
def test_any_stream_decodes_like_botocore_in_any_chunks(
    messages: list[tuple[list[Header], bytes]], cuts: list[int]
) -> None:
    data = b"".join(encode_message(payload, headers) for headers, payload in messages)
    expected = [
        EventMessage({n: expected_value(k, v) for n, k, v in headers}, payload)
        for headers, payload in messages
    ]
    assert botocore_decode(data) == expected
    assert decode(*split(data, cuts), max_message_bytes=1 << 20) == (expected, 0, False)


@settings(database=None)
@given(st.sampled_from(sorted(STREAMS)), st.data())
def test_any_corrupted_byte_breaks_the_stream_there(name: str, data: st.DataObject) -> None:
    stream = STREAMS[name]
    at = data.draw(st.integers(0, len(stream) - 1))
    flip = data.draw(st.integers(1, 255))
    corrupted = bytearray(stream)
    corrupted[at] ^= flip
    messages, bad, broken = decode(*split(bytes(corrupted), data.draw(CUTS)))
    assert (bad, broken) == (1, True)
    assert messages == botocore_decode(bytes(corrupted))
    assert messages == botocore_decode(stream)[: len(messages)]


@settings(database=None)
@given(st.sampled_from(sorted(STREAMS)), st.integers(min_value=0), CUTS)
def test_truncations_decode_the_complete_messages(name: str, end: int, cuts: list[int]) -> None:
    stream = STREAMS[name][: end % (len(STREAMS[name]) + 1)]
    assert decode(*split(stream, cuts)) == (botocore_decode(stream), 0, False)


GARBAGE = st.lists(
    st.binary(max_size=64)
    | st.sampled_from([frame(16, 0), frame(40, 4), frame(2**31, 0), A, B, A[:13], B[5:]]),
    max_size=30,
)


@settings(database=None)
@given(GARBAGE, st.integers(0, 300))
def test_garbage_never_raises_and_stays_bounded(chunks: list[bytes], max_message: int) -> None:
    decoder = EventStreamDecoder(max_message)
    for chunk in chunks:
        for message in decoder.feed(chunk):
            assert isinstance(message, EventMessage)
        assert decoder.buffered_bytes <= max(max_message, 12)
    assert not decoder.broken or decoder.bad_frames > 0
