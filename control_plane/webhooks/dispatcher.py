"""The webhook dispatcher: claims due deliveries, sends them, records every
attempt. One per control plane process; several replicas share the work.

A round claims the oldest due delivery of each idle webhook in a short
transaction (on PostgreSQL with FOR UPDATE SKIP LOCKED, so replicas never
claim the same row), sends outside any transaction, then records the attempt
and the delivery's new state. A claim is a lease: if this process dies while
sending, the row is due again when the lease runs out (at-least-once). Within
one process a webhook's deliveries go out one at a time in event order; a
retried delivery does not hold later ones back.

The dispatcher wakes when this process commits new deliveries
(``ControlPlane.deliveries_ready``), when a send finishes, and every
``webhook_poll_interval_s`` (deliveries written by other replicas, retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import secrets
from datetime import UTC, datetime, timedelta

import orjson
import structlog

from control_plane.config import Settings
from control_plane.errors import Unavailable
from control_plane.keyring import Keyring, SecretUnreadable
from control_plane.service import Clock, ControlPlane
from control_plane.store import webhook_repo
from control_plane.store.webhook_repo import AttemptRecord, Claimed
from control_plane.webhooks import backoff, events
from control_plane.webhooks.backoff import RetryPolicy
from control_plane.webhooks.convert import receiver
from control_plane.webhooks.formats import Message, render
from control_plane.webhooks.sender import AttemptResult, Sender
from spendgate.supervise import Supervisor

log = structlog.get_logger("spendgate.webhooks")
# Supervised task names (spendgate/supervise.py).
DISPATCHER_TASK = "webhook-dispatcher"
DELIVERY_TASK = "webhook-delivery"


class Dispatcher:
    def __init__(
        self,
        cp: ControlPlane,
        sender: Sender,
        settings: Settings,
        *,
        clock: Clock,
        keyring: Keyring | None,
        rng: random.Random | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        """``keyring`` opens the webhooks' stored secrets to send."""
        self.cp = cp
        self.keyring = keyring
        self.supervisor = supervisor or Supervisor(log)
        self.sender = sender
        self.clock = clock
        self.retry = RetryPolicy.from_settings(settings)
        self.poll_interval_s = settings.webhook_poll_interval_s
        self.max_in_flight = settings.webhook_max_in_flight
        # Long enough to send and record; after it, the row is due again.
        self.lease = timedelta(seconds=2 * sender.attempt_limit_s)
        self.rng = rng or random.Random()
        self._busy: dict[str, asyncio.Task[None]] = {}  # webhook id -> its send
        self._wake = asyncio.Event()
        self._stopping = False

    # ---- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until cancelled or ``stop`` is called."""
        while not self._stopping:
            self._wake.clear()
            self.cp.deliveries_ready.clear()
            try:
                claimed = await self.dispatch_due()
            except Unavailable:
                claimed = 0  # logged by the service; try again next round
            if claimed and len(self._busy) < self.max_in_flight:
                continue
            await self._sleep()

    async def _sleep(self) -> None:
        waits = [
            asyncio.create_task(self._wake.wait()),
            asyncio.create_task(self.cp.deliveries_ready.wait()),
        ]
        try:
            await asyncio.wait(
                waits, timeout=self.poll_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()

    async def stop(self, grace: float) -> None:
        """Stop claiming; give sends in flight ``grace`` seconds, then cancel them
        (their leases run out and they are retried, here or by a replica)."""
        self._stopping = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._busy and (remaining := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._busy.values()), timeout=remaining)
            await asyncio.sleep(0)  # let the done callbacks empty _busy
        late = list(self._busy.values())
        for task in late:
            task.cancel()
        for task in late:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def dispatch_due(self) -> int:
        """Claim what is due for idle webhooks and start sending; how many."""
        room = self.max_in_flight - len(self._busy)
        if room <= 0 or self._stopping:
            return 0
        now = self.clock()
        token = secrets.token_hex(8)
        busy = list(self._busy)
        claimed = await self.cp.run(
            lambda s: webhook_repo.claim_due(
                s,
                now=now,
                lease_until=now + self.lease,
                token=token,
                limit=room,
                busy_webhooks=busy,
            )
        )
        for c in claimed:
            # A send that crashes is logged and counted by the supervisor, not
            # retried in place: its lease runs out and it is claimed again.
            task = self.supervisor.spawn(
                DELIVERY_TASK,
                functools.partial(self._deliver, c),
                doing=f"sending webhook delivery {c.delivery.id} and recording the attempt",
                restart=False,
            )
            self._busy[c.webhook.id] = task
            task.add_done_callback(self._done)
        return len(claimed)

    def _done(self, task: asyncio.Task[None]) -> None:
        for webhook_id, t in list(self._busy.items()):
            if t is task:
                del self._busy[webhook_id]
        self._wake.set()  # its next delivery may be due

    async def run_until_idle(self) -> int:
        """Dispatch rounds until nothing is due and nothing in flight; how many
        deliveries were attempted. For tests and tools: deterministic with a
        fake clock, since nothing waits for time to pass."""
        total = 0
        while True:
            claimed = await self.dispatch_due()
            total += claimed
            if self._busy:
                await asyncio.wait(list(self._busy.values()))
            elif not claimed:
                return total

    # ---- one delivery ------------------------------------------------------------

    def _due_since(self, c: Claimed) -> datetime:
        """When the delivery first became due (resolves: at the window's end)."""
        if c.event.kind == events.WINDOW_RESET:
            return max(c.delivery.create_time, datetime.fromtimestamp(c.event.window_end, UTC))
        return c.delivery.create_time

    async def _deliver(self, c: Claimed) -> None:
        # Database gone: the lease runs out and the delivery is retried.
        with contextlib.suppress(Unavailable):
            await self._attempt(c)

    async def _attempt(self, c: Claimed) -> None:
        start = self.clock()
        due_since = self._due_since(c)
        if backoff.expired(self.retry, now=start, due_since=due_since):
            result = AttemptResult(
                0, "not sent: " + backoff.too_old_message(self.retry), None, 0, ""
            )
            outcome = backoff.Outcome(backoff.FAILED, start, backoff.too_old_message(self.retry))
            self.cp.metrics.webhook_attempt(outcome.state, None)
        else:
            message = Message(
                c.delivery.id, c.event.kind, orjson.loads(c.event.data), c.event.create_time
            )
            try:
                out = render(receiver(c.webhook, self.keyring), message, start)
            except SecretUnreadable as e:
                # Not sent; retried like any failed attempt, so a replica that
                # has the key (or this one, once configured) can still send it.
                result = AttemptResult(0, f"not sent: {e}", None, 0, "")
                sent = False
            else:
                result = await self.sender.send(out, start)
                sent = True
            outcome = backoff.after_attempt(
                self.retry,
                delivered=result.delivered,
                attempts=c.number,
                now=self.clock(),
                due_since=due_since,
                retry_after_s=result.retry_after_s,
                rng=self.rng,
            )
            self.cp.metrics.webhook_attempt(outcome.state, result.duration_ms if sent else None)
        error = result.error
        if outcome.gave_up and not error.endswith(outcome.gave_up):
            error = f"{error} ({outcome.gave_up})" if error else outcome.gave_up
        record = AttemptRecord(
            start, result.duration_ms, result.status_code, result.error, result.excerpt
        )
        finished = self.clock()
        await self.cp.run(
            lambda s: webhook_repo.record_attempt(
                s,
                c,
                record,
                state=outcome.state,
                next_attempt_at=outcome.next_attempt_at,
                delivery_error=error,
                finished=finished,
            )
        )
        # Never the URL (it may carry a token), the secret or the response body.
        fields = {
            "delivery_id": c.delivery.id,
            "webhook_id": c.webhook.id,
            "event_id": c.event.id,
            "event_type": c.event.kind,
            "policy_id": c.event.policy_id,
            "attempt": c.number,
            "status_code": result.status_code,
        }
        if outcome.state == backoff.DELIVERED:
            log.info("webhook delivered", **fields)
        elif outcome.state == backoff.FAILED:
            log.error("webhook delivery failed; given up", error=error, **fields)
        else:
            log.warning(
                "webhook attempt failed; will retry",
                error=error,
                next_attempt=outcome.next_attempt_at.isoformat(),
                **fields,
            )
