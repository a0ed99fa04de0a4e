"""Webhook settings (loaded like every other, errors naming the key), the
0002 migration, retention, and the dispatcher waking on new deliveries."""

from __future__ import annotations

import ipaddress
import time
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from control_plane.config import ConfigError, load_settings
from control_plane.store import webhook_repo
from control_plane.store.db import alembic_config, create_db_engine, migrate
from control_plane.store.models import DeliveryAttemptRow, DeliveryRow, WebhookEventRow
from control_plane.webhooks.ssrf import UrlPolicy
from spendgate.v1 import webhooks_pb2 as wpb
from tests.harness import ADMIN_TOKEN, FakeClock, bearer
from tests.webhooks.conftest import USD, Rig, running_api
from tests.webhooks.receiver import Receiver

REQUIRED = {"SPENDGATE_ADMIN_TOKEN": ADMIN_TOKEN}


def test_defaults_are_safe() -> None:
    s = load_settings(env=REQUIRED)
    assert (s.webhook_allow_http, s.webhook_allowed_hosts, s.webhook_allowed_networks) == (
        False,
        frozenset(),
        (),
    )
    assert (s.webhook_max_attempts, s.webhook_max_age_hours, s.webhook_backoff_base_s) == (
        15,
        48.0,
        10.0,
    )
    assert UrlPolicy.from_settings(s) == UrlPolicy()


def test_loaded_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "control_plane:\n"
        "  webhook_allow_private_ranges: 10.0.0.0/8, fd00::/8\n"
        "  webhook_backoff_base_s: 2\n"
    )
    env = {
        **REQUIRED,
        "SPENDGATE_WEBHOOK_ALLOW_HOSTS": "Hooks.Internal, [::1]",
        "SPENDGATE_CONTROL_PLANE_WEBHOOK_MAX_ATTEMPTS": "4",
    }
    s = load_settings(env=env, file=str(path))
    assert s.webhook_allowed_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert s.webhook_allowed_hosts == frozenset({"hooks.internal", "::1"})
    assert (s.webhook_backoff_base_s, s.webhook_max_attempts) == (2.0, 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"webhook_allow_private_ranges": "10.0.0.0/8,nope"},
            "webhook_allow_private_ranges: 'nope'",
        ),
        ({"webhook_backoff_jitter": 1.5}, "webhook_backoff_jitter must be between 0 and 1"),
        ({"webhook_max_attempts": 0}, "webhook_max_attempts must be at least 1"),
        ({"webhook_read_timeout_s": 0}, "webhook_read_timeout_s must be greater than 0"),
        (
            {"webhook_backoff_base_s": 100, "webhook_backoff_max_s": 10},
            "webhook_backoff_max_s must be at least webhook_backoff_base_s",
        ),
        ({"webhook_allow_http": "maybe"}, "webhook_allow_http must be true or false"),
    ],
)
def test_bad_values_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env=REQUIRED, **overrides)
    assert message in str(e.value)


def test_migration_0002_upgrades_and_downgrades(db_url: str) -> None:
    engine = create_db_engine(db_url)
    try:
        migrate(engine)
        tables = set(inspect(engine).get_table_names())
        assert {
            "webhooks",
            "webhook_events",
            "webhook_deliveries",
            "webhook_delivery_attempts",
        } <= tables
        uniques = inspect(engine).get_unique_constraints("webhook_events")
        assert [u["column_names"] for u in uniques] == [
            ["policy_id", "member", "window_start", "kind", "threshold"]
        ]
        command.downgrade(alembic_config(engine), "0001")
        assert not {t for t in inspect(engine).get_table_names() if t.startswith("webhook")}
        migrate(engine)
        assert "webhooks" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


async def test_retention_forgets_finished_deliveries_and_old_events(
    rig: Rig, receiver: Receiver
) -> None:
    await rig.webhook(receiver.url)
    policy = await rig.policy("1")
    await rig.spend(policy.id, 2 * USD)
    await rig.dispatcher.run_until_idle()
    now = rig.clock()

    def forget(after: timedelta) -> int:
        with Session(rig.engine) as s, s.begin():
            cutoff = now + after
            return webhook_repo.forget(
                s, finished_before=cutoff, window_ended_before=int(cutoff.timestamp())
            )

    assert forget(timedelta(0)) == 0  # just delivered: kept
    # Later: the delivery, its attempt and (its window over) the event go.
    assert forget(timedelta(hours=2)) == 2
    with Session(rig.engine) as s:
        for table in (DeliveryRow, DeliveryAttemptRow, WebhookEventRow):
            assert s.scalars(select(table)).all() == []


def test_new_deliveries_wake_the_dispatcher(tmp_path: Path, receiver: Receiver) -> None:
    """Polling is slow here (30 s); the event must go out at once anyway."""
    clock = FakeClock()
    with running_api(f"sqlite:///{tmp_path}/s.db", clock, webhook_poll_interval_s=30.0) as api:
        api.webhooks.CreateWebhook(
            wpb.CreateWebhookRequest(
                webhook=wpb.Webhook(name="o", format=wpb.WEBHOOK_FORMAT_GENERIC, url=receiver.url)
            ),
            metadata=bearer(ADMIN_TOKEN),
            timeout=10,
        )
        policy = api.policy("1")
        time.sleep(0.2)  # let the dispatcher settle into its 30 s wait
        started = time.monotonic()
        api.report(policy.id, 2 * USD)
        receiver.wait_for(1, timeout=5)
        assert time.monotonic() - started < 5
