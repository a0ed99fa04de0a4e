"""The last state the control plane sent, kept on disk next to the journal.

An ext_proc that restarts while no control plane is reachable starts from
this file: it enforces the policies, prices and window totals it last knew
(plus its own usage) instead of admitting everything and charging nothing.
Written atomically (temporary file, fsync, rename) at most once a second
while something changed; a missing or damaged file is a start without it.

The state is large (70 bytes a window total, one per member of a ``*``
policy): the event loop only takes a shallow copy of it (``Parts``, C-level
dict and list copies); building the message, serialising and writing it run
in a thread (``write``), while the loop keeps serving requests.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from google.protobuf.message import DecodeError

from spendgate.v1 import dataplane_pb2 as dp
from spendgate.v1 import pricing_pb2 as pp
from spendgate.wire import timestamp

log = structlog.get_logger("spendgate.ext_proc")
FILE_NAME = "snapshot.pb"
# One writer of a file at a time: a save still running in its thread when
# ext_proc stops must not share the temporary file with the last save, nor
# replace a newer snapshot with its older one (the generation written last, per
# file, under the lock).
_WRITING = threading.Lock()
_written: dict[Path, int] = {}
_generations = itertools.count(1)
# Windows (or policies, prices) serialised per call into protobuf (encode).
CHUNK = 2000
# The writing thread's pieces: 500 windows (under a millisecond of the GIL),
# each followed by a pause with the GIL released (see encode).
WRITE_CHUNK = 500
WRITE_PAUSE_S = 0.0002


@dataclass(frozen=True)
class Parts:
    """A copy of what the snapshot keeps, taken on the event loop; owned by the
    thread that writes it afterwards (nothing in it is changed in place by the
    loop: window totals are tuples, policies and prices messages replaced whole).

    ``spend``: (policy id, member, window start) -> (spent nanos, window end);
    ``seqs``: the adjustment sequence of each of those windows (absent: 0);
    ``generation``: later copies have larger ones (taken at creation).
    """

    spend: dict[tuple[str, str, int], tuple[int, int]]
    seqs: dict[tuple[str, str, int], int]
    policies: list[dp.VersionedPolicy]
    prices: list[pp.PriceOverride]
    generation: int = field(default_factory=lambda: next(_generations))


def build(parts: Parts) -> dp.StateUpdate:
    """The message saved: the parts as increments on an empty state
    (LocalState.apply_update reads it back)."""
    update = dp.StateUpdate()
    update.ParseFromString(encode(parts))
    return update


def encode(parts: Parts, chunk: int = CHUNK, *, pause_s: float = 0.0) -> bytes:
    """``build(parts)`` serialised, made of pieces of ``chunk`` windows or
    policies: each piece is one short call into protobuf's C code, which holds
    the GIL throughout, so the event loop waits for one piece at most (a whole
    message of 63,000 windows would hold it for about 60 ms). Serialised
    messages concatenated parse as one, their repeated fields appended.

    ``pause_s`` (the writing thread): sleep that long after each piece, the
    GIL released, so the event loop takes it between pieces instead of after
    the interpreter's switch interval (5 ms) each time it needs it: a request
    answered during a save of 1,000,000 windows otherwise waited several of
    those intervals."""
    pieces = [
        # The two change sets are present even when empty, as in one message.
        dp.StateUpdate(
            policy_changes=dp.PolicyChanges(), price_changes=dp.PriceOverrideChanges()
        ).SerializeToString()
    ]
    seqs = parts.seqs
    # In pieces from the dict itself (the copy this thread owns): a list of
    # every item first would hold the GIL for one long call.
    items = iter(parts.spend.items())
    while piece := list(itertools.islice(items, chunk)):
        windows = [
            dp.WindowSpend(
                policy_id=k[0],
                member=k[1],
                window_start=timestamp(k[2]),
                window_end=timestamp(v[1]),
                spent_nanos=v[0],
                adjustment_seq=seqs.get(k, 0),
            )
            for k, v in piece
        ]
        pieces.append(dp.StateUpdate(spend=windows).SerializeToString())
        if pause_s:
            time.sleep(pause_s)
    for i in range(0, len(parts.policies), chunk):
        changes = dp.PolicyChanges(upserts=parts.policies[i : i + chunk])
        pieces.append(dp.StateUpdate(policy_changes=changes).SerializeToString())
    for i in range(0, len(parts.prices), chunk):
        prices = dp.PriceOverrideChanges(upserts=parts.prices[i : i + chunk])
        pieces.append(dp.StateUpdate(price_changes=prices).SerializeToString())
    return b"".join(pieces)


def write(directory: str | Path, parts: Parts) -> bool:
    """Build and save the snapshot (for a thread: touches no loop state); False,
    writing nothing, when a later copy is already on disk. Raises OSError when
    the disk refuses."""
    data = encode(parts, WRITE_CHUNK, pause_s=WRITE_PAUSE_S)
    return _replace(Path(directory) / FILE_NAME, data, parts.generation)


def save(directory: str | Path, update: dp.StateUpdate) -> None:
    """Replace the saved snapshot with ``update``; raises OSError when the disk refuses."""
    _replace(Path(directory) / FILE_NAME, update.SerializeToString(), None)


def _replace(path: Path, data: bytes, generation: int | None) -> bool:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename),
    unless a later ``generation`` was written there (None: always write)."""
    tmp = path.with_suffix(".tmp")
    with _WRITING:
        if generation is not None:
            if generation < _written.get(path, 0):
                return False
            _written[path] = generation
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a leftover .tmp keeps its mode through O_TRUNC
            view = memoryview(data)
            while view:  # os.write may write less than asked (large files)
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    return True


def load(directory: str | Path) -> dp.StateUpdate | None:
    path = Path(directory) / FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("saved state not readable; starting without it", path=str(path), error=str(e))
        return None
    update = dp.StateUpdate()
    try:
        update.ParseFromString(data)
    except DecodeError as e:
        log.warning("saved state is damaged; starting without it", path=str(path), error=str(e))
        return None
    return update
