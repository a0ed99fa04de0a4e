"""Checks of the usage anomalies a data plane reports (ReportUsageRequest.anomalies).

Each becomes a ``usage.anomaly`` event in the batch's transaction
(control_plane/webhooks/outbox.py, ``record_anomalies``); this module only
refuses what could not be stored, before any transaction.
"""

from __future__ import annotations

from control_plane.errors import InvalidArgument
from control_plane.webhooks.events import MAX_ANOMALY_ID
from spendgate.v1 import dataplane_pb2 as dp

MAX_ANOMALIES_PER_BATCH = 1000


def check(req: dp.ReportUsageRequest) -> None:
    """INVALID_ARGUMENT naming the field: an anomaly needs an id that keys its event."""
    if len(req.anomalies) > MAX_ANOMALIES_PER_BATCH:
        raise InvalidArgument.one("anomalies", f"at most {MAX_ANOMALIES_PER_BATCH} per batch")
    if req.anomalies and not req.batch_id:
        raise InvalidArgument.one("batch_id", "is required when there are anomalies")
    for i, a in enumerate(req.anomalies):
        if not a.id or len(a.id) > MAX_ANOMALY_ID or "\x00" in a.id:
            raise InvalidArgument.one(
                f"anomalies[{i}].id", f"must be 1 to {MAX_ANOMALY_ID} characters"
            )
