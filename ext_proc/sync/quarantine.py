"""Usage records this data plane cannot send: set aside, never blocking the rest.

A record is quarantined when it cannot be encoded (a member that is not valid
Unicode), when it alone is larger than a usage message may be
(``usage_message_max_bytes``; e.g. a 5 MB model name of a ``*`` policy), or
when the control plane refuses it for good (INVALID_ARGUMENT, or a message
size error, for a batch of that one record). A control plane that is down or
slow is no reason: those batches are retried with the same id.

Each quarantined record is

* appended to ``quarantine.v1.jsonl`` next to the usage journal (one JSON
  object per line, ``fsync``ed; the file is bounded: past ``MAX_BYTES`` it is
  renamed to ``quarantine.v1.jsonl.1``, replacing the previous one),
* counted in ``spendgate_ext_proc_quarantined_records_total{reason}``,
* logged at error level,
* reported to the control plane with the next usage batch (member truncated to
  ``SHOWN_MEMBER`` characters plus its size and SHA-256), which keeps it in its
  ``quarantined_usage`` table for ``spendgate status``.

Its cost is in no window; inspect the file (``jq . quarantine.v1.jsonl``) or
``spendgate status`` and correct the spend by hand if it should count.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import orjson
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from spendgate.v1 import dataplane_pb2 as dp
from spendgate.wire import timestamp

log = structlog.get_logger("spendgate.ext_proc")

FILE_NAME = "quarantine.v1.jsonl"
MAX_BYTES = 16 * 1024 * 1024
SHOWN_MEMBER = 256
# Members the control plane can store (its window_spend.member column).
MAX_MEMBER_CHARS = 512
REASONS = ("too_large", "unencodable", "refused")
# Quarantine reports waiting to go to the control plane (beyond: file only).
MAX_PENDING_REPORTS = 10_000


def _safe_text(text: str) -> str:
    """``text`` as valid UTF-8 (lone surrogates escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def record(
    key: tuple[str, str, int],
    cost_nanos: int,
    requests: int,
    *,
    reason: str,
    detail: str,
    batch_id: str,
    now: datetime,
) -> dp.QuarantinedRecord:
    """The report of one record (encodable whatever the record held)."""
    policy_id, member, window_start = key
    raw = member.encode("utf-8", "surrogatepass")
    return dp.QuarantinedRecord(
        reason=reason,
        detail=detail[:1000],
        policy_id=_safe_text(policy_id[:64]),
        member=_safe_text(member[:SHOWN_MEMBER]),
        member_bytes=len(raw),
        member_sha256=hashlib.sha256(raw).hexdigest(),
        window_start=timestamp(window_start),
        cost_nanos=cost_nanos,
        request_count=requests,
        batch_id=batch_id,
        quarantine_time=timestamp(now),
    )


def _line(r: dp.QuarantinedRecord) -> bytes:
    when = Timestamp()
    when.CopyFrom(r.quarantine_time)
    return (
        orjson.dumps(
            {
                "time": when.ToJsonString(),
                "reason": r.reason,
                "detail": r.detail,
                "batch_id": r.batch_id,
                "policy_id": r.policy_id,
                "member": r.member,
                "member_bytes": r.member_bytes,
                "member_sha256": r.member_sha256,
                "window_start": r.window_start.seconds,
                "cost_nanos": r.cost_nanos,
                "request_count": r.request_count,
            }
        )
        + b"\n"
    )


class Quarantine:
    """The quarantine file (None: no journal directory, log and count only),
    the counters, and the reports not yet handed to a usage batch."""

    def __init__(self, directory: Path | str | None = None, *, max_bytes: int = MAX_BYTES) -> None:
        self.path = Path(directory) / FILE_NAME if directory else None
        self.max_bytes = max_bytes
        self.counts: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.pending: list[dp.QuarantinedRecord] = []
        self.dropped_reports = 0

    def add(self, records: Iterable[dp.QuarantinedRecord]) -> None:
        """Keep ``records`` (durably when there is a file), count and log them."""
        records = list(records)
        if not records:
            return
        if self.path is not None:
            try:
                self._append(b"".join(_line(r) for r in records))
            except OSError as e:
                log.error("could not write the quarantine file", path=str(self.path), error=str(e))
        for r in records:
            self.counts[r.reason] = self.counts.get(r.reason, 0) + 1
            log.error(
                "usage record quarantined; the usage behind it keeps flowing",
                reason=r.reason,
                detail=r.detail,
                policy_id=r.policy_id,
                member_bytes=r.member_bytes,
                member_sha256=r.member_sha256,
                cost_nanos=r.cost_nanos,
                batch_id=r.batch_id,
                file=str(self.path) if self.path else None,
            )
        room = MAX_PENDING_REPORTS - len(self.pending)
        self.pending.extend(records[: max(room, 0)])
        self.dropped_reports += max(len(records) - max(room, 0), 0)

    def take_reports(self) -> list[dp.QuarantinedRecord]:
        out, self.pending = self.pending, []
        return out

    def _append(self, data: bytes) -> None:
        assert self.path is not None
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_size + len(data) > self.max_bytes:
                os.replace(self.path, self.path.with_name(FILE_NAME + ".1"))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
