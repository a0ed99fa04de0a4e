"""Write-ahead journal of usage batches, so a crash loses (almost) no usage.

Every flush interval, before a batch is sent, its increments are appended to
the journal and made durable (``fdatasync``). When the control plane
acknowledges a batch, an ack record is appended (not synced: a lost ack only
means the batch is sent again with the same id, and the control plane
ignores a batch id it has already applied). On start, every batch without an
ack is replayed, with its original ``batch_id``. A ``kill -9`` therefore loses
at most the usage charged since the last flush (``flush_interval_ms``).

Files in the journal directory::

    usage.v1.journal   the records, append only
    lock               flock()ed while a process owns the directory, so two
                       ext_procs never share (and double-send) one journal

File format (``usage.v1.journal``): a sequence of records, nothing else::

    record  := length:u32be  crc:u32be  payload[length]
    crc     := zlib.crc32(payload)
    payload := kind:u8  body
    kind 'B' (0x42): body = a serialized ReportUsageRequest with batch_id and
                     increments (data_plane_id empty). Several B records may
                     carry the same batch_id; their increments (and
                     chargeback rollups) add up. A batch
                     is only extended this way before it is first sent.
    kind 'A' (0x41): body = the acknowledged batch_id, UTF-8. A batch that
                     was split (too large, or refused) is acknowledged
                     in the same write that adds its pieces (new ids derived
                     from its own); a quarantined one after the record went
                     to the quarantine file (ext_proc/sync/quarantine.py).

Reading stops at the first record that is incomplete, longer than
``MAX_RECORD``, fails its CRC or does not parse; that is a torn write from a
crash (or damage), and the rest of the file is logged and cut off, never
applied. When no batch is left unacknowledged the file is truncated to zero,
and when it grows past ``COMPACT_BYTES`` it is rewritten (write to a temporary
file, fsync, rename, fsync the directory) with only the unacknowledged batches.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from google.protobuf.message import DecodeError

from spendgate.v1 import dataplane_pb2 as dp

log = structlog.get_logger("spendgate.ext_proc")

FILE_NAME = "usage.v1.journal"
LOCK_NAME = "lock"
HEADER = struct.Struct(">II")
KIND_BATCH = 0x42
KIND_ACK = 0x41
MAX_RECORD = 64 * 1024 * 1024
COMPACT_BYTES = 4 * 1024 * 1024

_datasync = getattr(os, "fdatasync", os.fsync)


class JournalError(Exception):
    """The journal directory cannot be used (e.g. another process owns it)."""


@dataclass(frozen=True, slots=True)
class Scan:
    """What a journal file holds: unacknowledged batches, oldest first."""

    batches: list[dp.ReportUsageRequest]
    good_bytes: int  # length of the valid prefix
    problem: str | None  # why reading stopped early, if it did


def encode_record(kind: int, body: bytes) -> bytes:
    payload = bytes((kind,)) + body
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def encode_batch(msg: dp.ReportUsageRequest) -> bytes:
    return encode_record(KIND_BATCH, msg.SerializeToString())


def encode_ack(batch_id: str) -> bytes:
    return encode_record(KIND_ACK, batch_id.encode())


def scan(data: bytes) -> Scan:
    """Parse a journal file's bytes (pure: no I/O)."""
    live: dict[str, dp.ReportUsageRequest] = {}
    pos, problem = 0, None
    while pos < len(data):
        if len(data) - pos < HEADER.size:
            problem = "truncated record header"
            break
        length, crc = HEADER.unpack_from(data, pos)
        if length < 1 or length > MAX_RECORD:
            problem = f"bad record length {length}"
            break
        payload = data[pos + HEADER.size : pos + HEADER.size + length]
        if len(payload) < length:
            problem = "truncated record"
            break
        if zlib.crc32(payload) != crc:
            problem = "CRC mismatch"
            break
        kind, body = payload[0], payload[1:]
        if kind == KIND_BATCH:
            msg = dp.ReportUsageRequest()
            try:
                msg.ParseFromString(body)
            except DecodeError:
                problem = "undecodable batch record"
                break
            if not msg.batch_id:
                problem = "batch record without batch_id"
                break
            if msg.batch_id in live:
                live[msg.batch_id].increments.extend(msg.increments)
                live[msg.batch_id].rollups.extend(msg.rollups)
            else:
                live[msg.batch_id] = msg
        elif kind == KIND_ACK:
            try:
                live.pop(body.decode(), None)
            except UnicodeDecodeError:
                problem = "undecodable ack record"
                break
        else:
            problem = f"unknown record kind {kind}"
            break
        pos += HEADER.size + length
    return Scan(list(live.values()), pos, problem)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Journal:
    """One process's journal file. Not thread-safe: used from the event loop."""

    def __init__(self, directory: Path | str, *, compact_bytes: int = COMPACT_BYTES) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self.compact_bytes = compact_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        os.fchmod(self._lock_fd, 0o600)  # also a file an earlier release made wider
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise JournalError(f"journal {self.directory} is in use by another process") from None
        self._fd = -1
        self.size = 0
        self._unacked: set[str] = set()

    def open(self) -> list[dp.ReportUsageRequest]:
        """Read the file, cut off a damaged tail, and return the unacknowledged batches."""
        data = self.path.read_bytes() if self.path.exists() else b""
        found = scan(data)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(self._fd, 0o600)  # usage is private: also a file an earlier release made
        if found.problem is not None:
            log.error(
                "usage journal has a damaged tail; ignoring it",
                path=str(self.path),
                problem=found.problem,
                offset=found.good_bytes,
                ignored_bytes=len(data) - found.good_bytes,
            )
            os.ftruncate(self._fd, found.good_bytes)
            _datasync(self._fd)
        self.size = found.good_bytes
        self._unacked = {b.batch_id for b in found.batches}
        if found.batches:
            log.info(
                "replaying unacknowledged usage from the journal",
                path=str(self.path),
                batches=len(found.batches),
            )
        return found.batches

    def append(self, msg: dp.ReportUsageRequest) -> None:
        """Append (part of) a batch and make it durable before returning."""
        record = encode_batch(msg)
        _write_all(self._fd, record)
        _datasync(self._fd)
        self.size += len(record)
        self._unacked.add(msg.batch_id)

    def acknowledge(self, batch_id: str) -> None:
        self._unacked.discard(batch_id)
        if not self._unacked:
            # Nothing left to replay: start over with an empty file.
            os.ftruncate(self._fd, 0)
            self.size = 0
            return
        record = encode_ack(batch_id)
        _write_all(self._fd, record)
        self.size += len(record)

    def replace(self, batch_id: str, pieces: Iterable[dp.ReportUsageRequest]) -> None:
        """Replace a batch by ``pieces`` (a split): the pieces and the batch's
        ack in one durable write. A torn write leaves the batch unacknowledged
        (and possibly some pieces): replayed, it is split again into the same
        piece ids and the pieces already present are not written twice."""
        msgs = list(pieces)
        data = b"".join(encode_batch(m) for m in msgs) + encode_ack(batch_id)
        _write_all(self._fd, data)
        _datasync(self._fd)
        self.size += len(data)
        self._unacked.update(m.batch_id for m in msgs)
        self._unacked.discard(batch_id)
        if not self._unacked:
            os.ftruncate(self._fd, 0)
            self.size = 0

    def needs_compaction(self) -> bool:
        return self.size > self.compact_bytes

    def compact(self, live: Iterable[dp.ReportUsageRequest]) -> None:
        """Atomically replace the file with just ``live`` (the unacknowledged batches)."""
        msgs = list(live)
        records = [encode_batch(m) for m in msgs]
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a leftover .tmp keeps its mode through O_TRUNC
            _write_all(fd, b"".join(records))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = sum(len(r) for r in records)
        self._unacked = {m.batch_id for m in msgs}

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                _datasync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
