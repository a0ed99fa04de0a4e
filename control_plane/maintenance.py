"""Maintenance: what the control plane forgets on a timer (old usage batch
ids and quarantined records, spend of old windows, expired holds, old
chargeback rollups, finished webhook deliveries), each in short transactions.
control_plane/server.py runs them as a supervised background task."""

from __future__ import annotations

from datetime import timedelta

import structlog

from control_plane import quarantine, reports
from control_plane.runtime import Runtime
from control_plane.store import repo, webhook_repo

log = structlog.get_logger("spendgate.control_plane")

# Spend rows of old windows deleted per transaction (forget_old_spend).
SPEND_CHUNK = 5_000


async def forget_expired_holds(cp: Runtime) -> int:
    at = int(cp.clock().timestamp())
    return await cp.run(lambda s: repo.forget_holds(s, at))


async def forget_old_spend(cp: Runtime, retention: timedelta, chunk: int = SPEND_CHUNK) -> int:
    """Delete the spend rows of windows that ended more than ``retention``
    ago, ``chunk`` rows a transaction (other writers wait for one chunk at
    most); how many."""
    cutoff = int((cp.clock() - retention).timestamp())
    removed = 0
    while True:
        n = await cp.run(lambda s: repo.forget_spend(s, ended_before=cutoff, limit=chunk))
        removed += n
        if n < chunk:
            break
    if removed:
        log.info("forgot spend of old windows", count=removed, ended_before=cutoff)
    return removed


async def forget_old_batches(cp: Runtime, retention: timedelta) -> int:
    """Drop batch ids older than ``retention``. A data plane retries a batch
    until it is acknowledged, so retention only has to outlast the longest
    control plane outage a data plane rides out with usage unsent."""
    cutoff = cp.clock() - retention
    removed = await cp.run(lambda s: repo.forget_batches(s, cutoff))
    if removed:
        log.info("forgot old usage batch ids", count=removed)
    old = cp.clock() - quarantine.RETENTION
    forgotten = await cp.run(lambda s: quarantine.forget(s, before=old))
    if forgotten:
        log.info("forgot old quarantined usage records", count=forgotten)
    return removed


async def forget_old_rollups(cp: Runtime, retention: timedelta) -> int:
    """Delete chargeback rollups of hours older than ``retention``."""
    before = cp.clock() - retention
    removed = await cp.run(lambda s: reports.forget(s, before))
    if removed:
        log.info("forgot old usage rollups", count=removed, before=before.isoformat())
    return removed


async def forget_old_deliveries(cp: Runtime, retention: timedelta) -> int:
    """Delete webhook deliveries finished, and events of windows ended, more
    than ``retention`` ago; how many."""
    cutoff = cp.clock() - retention
    removed = await cp.run(
        lambda s: webhook_repo.forget(
            s, finished_before=cutoff, window_ended_before=int(cutoff.timestamp())
        )
    )
    if removed:
        log.info("forgot old webhook deliveries and events", count=removed)
    return removed
