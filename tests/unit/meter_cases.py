"""What the meter tests share: fixtures, stream builders, expected results, and
the contract every meter is tested against (``meter_contract``).

A meter's test module describes its meter with a ``MeterCases`` and subclasses
``meter_contract(cases)`` to run the shared tests (fixtures whole and byte by
byte, unparseable bodies, finish idempotence and feed after finish, chunking
invariance, truncated streams, garbage); its own tables test the API's shapes.
Test modules call ``pytest.register_assert_rewrite`` for this module before
importing it, so that its asserts explain themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_proc.metering.meters.base import MeterResult, estimate_tokens_from_chars
from spendgate.domain.usage import Usage

FIXTURES = Path(__file__).parent.parent / "fixtures"
CUTS = st.lists(st.integers(min_value=0), max_size=40)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length + 1)."""
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


def bytewise(data: bytes) -> list[bytes]:
    return [bytes([b]) for b in data]


def sse(*events: object, named: bool = False, newline: bytes = b"\n") -> bytes:
    """An event stream: dicts become JSON data (after ``event: <their type>`` when
    ``named``), bytes are sent as data as they are."""
    out = []
    for e in events:
        if isinstance(e, bytes):
            out.append(b"data: " + e)
        else:
            assert isinstance(e, dict)
            name = b"event: " + str(e.get("type", "")).encode() + newline if named else b""
            out.append(name + b"data: " + orjson.dumps(e))
    return b"".join(event + newline + newline for event in out)


def named_sse(*events: object) -> bytes:
    """An event stream whose dicts are sent as ``event: <their type>`` + JSON data."""
    return sse(*events, named=True)


def exact(model: str | None, usage: Usage, error: str | None = None) -> MeterResult:
    """The provider's own usage report was seen."""
    return MeterResult(model=model, usage=usage, complete=True, error=error)


def estimated(model: str | None, chars: int, error: str) -> MeterResult:
    """No usage report: output estimated from ``chars`` generated characters."""
    usage = Usage(output_tokens=estimate_tokens_from_chars(chars), estimated=True)
    return MeterResult(model=model, usage=usage, complete=False, error=error)


def failed(error: str, model: str | None = None) -> MeterResult:
    """Nothing meterable."""
    return MeterResult(model=model, usage=None, complete=False, error=error)


def check_garbage(meter: Any, chunks: list[bytes], aborted: bool, max_buffered: int) -> None:
    """Whatever the bytes, a meter holds at most ``max_buffered`` bytes, never
    raises, and its result is consistent."""
    for piece in chunks:
        meter.feed(piece)
        assert meter.buffered_bytes <= max_buffered
    result = meter.finish(aborted=aborted)
    assert isinstance(result, MeterResult)
    assert result.complete == (result.usage is not None and not result.usage.estimated)
    assert result.complete or result.error is not None
    assert meter.finish() is result


@dataclass(frozen=True)
class MeterCases:
    """A meter under test and its fixture files with their expected results."""

    new_meter: Callable[..., Any]  # (streaming=..., **kw) -> a meter
    fixtures: Path  # the folder of fixture files
    results: Mapping[str, MeterResult]  # fixture file -> the meter's result
    streams: Sequence[str]  # the stream fixture files (any of the folder's)
    garbage: Sequence[bytes]  # framing tokens to mix into garbage
    garbage_fixtures: Sequence[str] = ()  # more files (beyond results) to slice into garbage
    body_model: str | None = None  # the model of a result for an unparseable body
    slack: int = 2  # how far buffered_bytes may exceed max_body_bytes

    def fixture(self, name: str) -> bytes:
        return (self.fixtures / name).read_bytes()

    def is_stream(self, name: str) -> bool:
        return name in self.streams

    def failed(self, error: str) -> MeterResult:
        return failed(error, self.body_model)

    def meter(
        self, *chunks: bytes, streaming: bool, aborted: bool = False, **kw: Any
    ) -> MeterResult:
        """Feed the chunks to a new meter and finish it, checking on the way that
        finish is idempotent, releases the buffers, and that feed after it is ignored."""
        m = self.new_meter(streaming=streaming, **kw)
        for chunk in chunks:
            m.feed(chunk)
        result = m.finish(aborted=aborted)
        m.feed(b'data: {"usage": {}}\n\n{')
        assert m.finish(aborted=not aborted) is result
        assert m.buffered_bytes == 0
        return result

    def garbage_chunks(self) -> st.SearchStrategy[list[bytes]]:
        files = [self.fixture(n) for n in [*self.results, *self.garbage_fixtures]]
        return st.lists(
            st.binary(max_size=64)
            | st.sampled_from(list(self.garbage))
            | st.sampled_from(files).flatmap(
                lambda d: st.integers(0, len(d)).map(lambda i: d[i : i + 200])
            ),
            max_size=30,
        )


# Bodies that are not a JSON object, or too large (with max_body_bytes=100).
UNPARSEABLE = [
    pytest.param([b""], False, "invalid json", id="empty-body"),
    pytest.param([b'{"model": '], False, "invalid json", id="truncated"),
    pytest.param([b'{"model": '], True, "response aborted", id="truncated-aborted"),
    pytest.param([b'{"usage": {"input'], True, "response aborted", id="truncated-in-usage"),
    pytest.param([b"[1, 2]"], False, "invalid json", id="not-an-object"),
    pytest.param([b"<html>502</html>"], False, "invalid json", id="html"),
    pytest.param([b"<html>529</html>"], True, "response aborted", id="html-aborted"),
    pytest.param([b"x" * 60, b"x" * 60], False, "body too large", id="too-large"),
    pytest.param([b"x" * 60, b"x" * 60], True, "body too large", id="too-large-aborted"),
]


def meter_contract(cases: MeterCases) -> type:
    """A base class of the tests every meter must pass, run against ``cases``.

    A test module subclasses it (``class TestContract(meter_contract(CASES))``);
    it may override ``check_truncated`` with what its meter promises about a
    stream cut short.
    """
    names = sorted({*cases.results, *cases.streams})

    class MeterContract:
        @pytest.mark.parametrize(
            ("name", "expected"), [pytest.param(n, r, id=n) for n, r in cases.results.items()]
        )
        def test_fixture(self, name: str, expected: MeterResult) -> None:
            data = cases.fixture(name)
            streaming = cases.is_stream(name)
            assert cases.meter(data, streaming=streaming) == expected
            assert cases.meter(*bytewise(data), streaming=streaming) == expected
            if not streaming:  # a whole body, aborted or not, answering a stream request or not
                assert cases.meter(data, streaming=False, aborted=True) == expected
                assert cases.meter(data, streaming=True) == expected
                assert cases.meter(b"\r\n  " + data, streaming=True) == expected

        @pytest.mark.parametrize(("chunks", "aborted", "error"), UNPARSEABLE)
        def test_unparseable_body(self, chunks: list[bytes], aborted: bool, error: str) -> None:
            result = cases.meter(*chunks, streaming=False, aborted=aborted, max_body_bytes=100)
            assert result == cases.failed(error)

        @settings(database=None)
        @given(st.sampled_from(names), st.integers(min_value=0), st.booleans())
        def test_finish_is_idempotent_and_feed_after_finish_is_ignored(
            self, name: str, cut: int, aborted: bool
        ) -> None:
            data = cases.fixture(name)
            at = cut % (len(data) + 1)
            head, rest = data[:at], data[at:]
            streaming = cases.is_stream(name)
            m = cases.new_meter(streaming=streaming)
            m.feed(head)
            first = m.finish(aborted=aborted)
            m.feed(rest)
            assert m.finish() is first
            assert m.finish(aborted=not aborted) is first
            assert first == cases.meter(head, streaming=streaming, aborted=aborted)

        @settings(database=None)
        @given(st.sampled_from(sorted(cases.results)), CUTS)
        def test_any_chunking_gives_the_same_result(self, name: str, cuts: list[int]) -> None:
            data = cases.fixture(name)
            streaming = cases.is_stream(name)
            assert cases.meter(*split(data, cuts), streaming=streaming) == cases.results[name]

        if cases.streams:  # a meter that never streams has no stream to cut

            @settings(database=None)
            @given(
                st.sampled_from(sorted(cases.streams)),
                st.integers(min_value=0),
                CUTS,
                st.booleans(),
            )
            def test_truncated_streams_are_chunking_invariant(
                self, name: str, end: int, cuts: list[int], aborted: bool
            ) -> None:
                full = cases.fixture(name)
                data = full[: end % (len(full) + 1)]
                whole = cases.meter(data, streaming=True, aborted=aborted)
                assert cases.meter(*split(data, cuts), streaming=True, aborted=aborted) == whole
                assert whole.complete == (whole.usage is not None and not whole.usage.estimated)
                self.check_truncated(full, data, aborted, whole)

        def check_truncated(
            self, full: bytes, data: bytes, aborted: bool, whole: MeterResult
        ) -> None:
            """What the meter promises of a stream ``full`` cut to ``data``."""

        @settings(database=None)
        @given(cases.garbage_chunks(), st.booleans(), st.booleans(), st.integers(16, 400))
        def test_garbage_never_raises_and_stays_bounded(
            self, chunks: list[bytes], streaming: bool, aborted: bool, max_body_bytes: int
        ) -> None:
            m = cases.new_meter(streaming=streaming, max_body_bytes=max_body_bytes)
            check_garbage(m, chunks, aborted, max_body_bytes + cases.slack)

    return MeterContract
