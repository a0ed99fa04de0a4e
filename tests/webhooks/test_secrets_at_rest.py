"""Secrets at rest, SQLite and PostgreSQL: the database holds no webhook URL,
signing secret or routing key in clear (read with plain SQL); migration 0005
encrypts what an earlier release stored; a control plane without a key
refuses to store or start on secrets; `spendgate secrets rotate` re-encrypts
every value under the new key and deliveries go on; a value under a key the
control plane lacks fails its delivery with the reason, never a crash."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from alembic import command
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import text
from standardwebhooks import Webhook as StandardWebhook

from control_plane import keyring
from control_plane import migrate as migrate_command
from control_plane.keyring import SecretsKeyRequired
from control_plane.server import ControlPlaneServer
from control_plane.store.db import alembic_config, create_db_engine, migrate
from control_plane.webhooks.signing import new_secret
from spendgate.cli.main import main as cli
from spendgate.v1 import secrets_pb2 as spb
from spendgate.v1 import secrets_pb2_grpc
from spendgate.v1 import webhooks_pb2 as wpb
from tests.harness import (
    ADMIN_TOKEN,
    READ_TOKEN,
    SECRETS_KEY,
    FakeClock,
    LoopThread,
    bearer,
    wait_until,
)
from tests.webhooks.conftest import USD, Api, make_rig, running_api, settings
from tests.webhooks.receiver import Receiver

ADMIN = bearer(ADMIN_TOKEN)
KEY_A = SECRETS_KEY  # the tests' default key
KEY_B = base64.b64encode(os.urandom(32)).decode()
ID_A = keyring.key_id(base64.b64decode(KEY_A))
ID_B = keyring.key_id(base64.b64decode(KEY_B))
ROUTING_KEY = "R0123456789abcdefPAGERKEY0000001"


def raw_webhooks(
    db_url: str, columns: str = "id, url, url_masked, secret, routing_key"
) -> list[dict[str, Any]]:
    """The webhooks table as plain SQL sees it."""
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(f"SELECT {columns} FROM webhooks ORDER BY id"))
            return [dict(r._mapping) for r in rows]
    finally:
        engine.dispose()


def secrets_stub(api: Api) -> secrets_pb2_grpc.SecretsServiceStub:
    return secrets_pb2_grpc.SecretsServiceStub(api.channel)


def status(api: Api) -> tuple[str, dict[str, int]]:
    s = secrets_stub(api).GetSecretsStatus(
        spb.GetSecretsStatusRequest(), metadata=bearer(READ_TOKEN), timeout=10
    )
    return s.current_key_id, {x.key_id: x.count for x in s.stored}


def create(api: Api, **fields: Any) -> wpb.Webhook:
    fields.setdefault("name", f"ops-{uuid.uuid4().hex[:8]}")  # names are unique
    fields.setdefault("format", wpb.WEBHOOK_FORMAT_GENERIC)
    return api.webhooks.CreateWebhook(
        wpb.CreateWebhookRequest(webhook=wpb.Webhook(**fields)), metadata=ADMIN, timeout=10
    )


def port_of(api: Api) -> str:
    return f"127.0.0.1:{api.server.port}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def test_the_database_holds_no_secret_in_clear(
    db_url: str, clock: FakeClock, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = new_secret()
    url = f"{receiver.url}?token=qu3ryT0ken"
    slack = "https://hooks.slack.com/services/T0001/B0001/sl4ckT0k3nV4lu3"
    with running_api(db_url, clock) as api:
        generic = create(api, url=url, secret=secret)
        create(api, name="pd", format=wpb.WEBHOOK_FORMAT_PAGERDUTY, routing_key=ROUTING_KEY)
        create(api, name="chat", format=wpb.WEBHOOK_FORMAT_SLACK, url=slack)
        listed = api.webhooks.ListWebhooks(wpb.ListWebhooksRequest(), metadata=ADMIN, timeout=10)
        # Deliveries are signed with the secret the store keeps sealed.
        policy = api.policy("1")
        api.report(policy.id, 2 * USD)
        (got,) = receiver.wait_for(1)
        StandardWebhook(secret).verify(got.body, got.headers)
        assert got.path.endswith("?token=qu3ryT0ken")
    rows = raw_webhooks(db_url)
    assert len(rows) == 3
    clear = (secret, secret.removeprefix("whsec_"), "qu3ryT0ken", ROUTING_KEY, "sl4ckT0k3nV4lu3")
    for row in rows:
        for column in ("url", "secret", "routing_key"):
            value = row[column]
            assert value == "" or value.startswith(f"enc:v1:{ID_A}:"), (column, value)
        assert not any(c in str(row) for c in clear)
    assert {r["url_masked"] for r in rows} == {
        f"{receiver.url}?token=****",
        "https://events.pagerduty.com/v2/enqueue",
        "https://hooks.slack.com/services/T0001/B0001/****",
    }
    # The API shows the masked URL and whether a secret is set, never the values.
    answers = listed.SerializeToString()
    assert not any(c.encode() in answers for c in clear)
    assert [w.has_secret for w in listed.webhooks if w.id == generic.id] == [True]
    out = capsys.readouterr()
    assert not any(c in out.out + out.err for c in clear)


def _insert_clear_webhook(conn: Any, webhook_id: str, **values: Any) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    row = {
        "id": webhook_id,
        "name": webhook_id,
        "description": "",
        "format": "generic",
        "events": "budget_policy.exceeded,budget_policy.threshold_crossed",
        "secret": "",
        "routing_key": "",
        "severity": "error",
        "resolve_on_reset": True,
        "enabled": True,
        "create_time": now,
        "update_time": now,
        "created_by": "admin",
        "updated_by": "admin",
        "version": 1,
        **values,
    }
    columns = ", ".join(row)
    conn.execute(
        text(f"INSERT INTO webhooks ({columns}) VALUES ({', '.join(':' + k for k in row)})"), row
    )


async def test_migration_0005_encrypts_what_an_earlier_release_stored(
    db_url: str,
    clock: FakeClock,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = new_secret()
    engine = create_db_engine(db_url)
    try:
        command.upgrade(alembic_config(engine), "0004")
        with engine.begin() as conn:
            _insert_clear_webhook(conn, "wh_old_generic", url=receiver.url, secret=secret)
            _insert_clear_webhook(
                conn,
                "wh_old_pd",
                url=f"{receiver.url}?pd=1",
                format="pagerduty",
                routing_key=ROUTING_KEY,
            )
        clear = "id, url, secret, routing_key"
        before = raw_webhooks(db_url, clear)
        # No key: refused before anything changes, naming the settings.
        with pytest.raises(SecretsKeyRequired, match="SPENDGATE_CONTROL_PLANE_SECRETS_KEY"):
            migrate(engine)
        assert migrate_command.current_revision(engine) == "0004"
        # The same through `python -m control_plane.migrate`: exit 2, a clear message.
        monkeypatch.setenv("SPENDGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        assert migrate_command.main(["--database-url", db_url]) == 2
        err = capsys.readouterr().err
        assert "encrypts the 2 stored webhook(s)" in err and "secrets_key_file" in err
        assert migrate_command.current_revision(engine) == "0004"
        assert raw_webhooks(db_url, clear) == before
        # With the key (the command reads the same settings as the server).
        monkeypatch.setenv("SPENDGATE_CONTROL_PLANE_SECRETS_KEY", KEY_A)
        assert migrate_command.main(["--database-url", db_url]) == 0
        assert "schema migrated from 0004 to" in capsys.readouterr().out
    finally:
        engine.dispose()
    generic, pd = raw_webhooks(db_url)
    assert generic["url"].startswith(f"enc:v1:{ID_A}:") and receiver.url not in generic["url"]
    assert generic["secret"].startswith(f"enc:v1:{ID_A}:") and generic["routing_key"] == ""
    assert pd["routing_key"].startswith(f"enc:v1:{ID_A}:") and pd["secret"] == ""
    assert (generic["url_masked"], pd["url_masked"]) == (receiver.url, f"{receiver.url}?pd=****")
    # And the migrated webhooks still sign and deliver.
    async with make_rig(db_url, clock) as rig:
        policy = await rig.policy("1")
        await rig.spend(policy.id, 2 * USD)
        assert await rig.dispatcher.run_until_idle() == 2
    by_path = {r.path: r for r in receiver.received()}
    StandardWebhook(secret).verify(by_path["/hook"].body, by_path["/hook"].headers)
    assert by_path["/hook?pd=1"].json()["routing_key"] == ROUTING_KEY


def test_rows_an_earlier_release_writes_during_an_upgrade_are_read_then_rotated(
    db_url: str, clock: FakeClock, receiver: Receiver
) -> None:
    secret = new_secret()
    with running_api(db_url, clock) as api:
        # A replica still on the previous release inserts as it always did.
        engine = create_db_engine(db_url)
        try:
            with engine.begin() as conn:
                _insert_clear_webhook(
                    conn, "wh_from_old_replica", url=f"{receiver.url}?token=t0k3n", secret=secret
                )
        finally:
            engine.dispose()
        got = api.webhooks.GetWebhook(
            wpb.GetWebhookRequest(id="wh_from_old_replica"), metadata=ADMIN, timeout=10
        )
        assert (got.url, got.has_secret) == (f"{receiver.url}?token=****", True)
        assert status(api) == (ID_A, {"clear": 2})
        policy = api.policy("1")
        api.report(policy.id, 2 * USD)
        (sent,) = receiver.wait_for(1)
        StandardWebhook(secret).verify(sent.body, sent.headers)
        rotated = secrets_stub(api).RotateSecrets(
            spb.RotateSecretsRequest(), metadata=ADMIN, timeout=10
        )
        assert (rotated.rotated, rotated.unchanged) == (2, 0)
        assert status(api) == (ID_A, {ID_A: 2})
    (row,) = raw_webhooks(db_url)
    assert row["url"].startswith(f"enc:v1:{ID_A}:") and row["secret"].startswith("enc:v1:")
    assert row["url_masked"] == f"{receiver.url}?token=****"


def test_without_a_key_nothing_secret_is_stored_and_stored_secrets_stop_start_up(
    db_url: str, clock: FakeClock, receiver: Receiver
) -> None:
    with running_api(db_url, clock, secrets_key="") as api:
        # Policies work without a key; a webhook (its URL is a secret) does not.
        api.policy("1")
        with pytest.raises(grpc.RpcError) as e:
            create(api, url=receiver.url)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "SPENDGATE_CONTROL_PLANE_SECRETS_KEY" in (e.value.details() or "")
        assert raw_webhooks(db_url) == []
    with running_api(db_url, clock) as api:
        create(api, url=receiver.url, secret=new_secret())
    loop = LoopThread("no-key-control-plane")
    try:
        server = loop.call(
            lambda: ControlPlaneServer(
                settings(db_url, secrets_key="", listen="127.0.0.1:0"), clock=clock
            )
        )
        with pytest.raises(SecretsKeyRequired, match="holds 2 encrypted webhook secret"):
            loop.run(server.start())
        loop.run(server.sender.aclose())
        server.cp.close()
    finally:
        loop.stop()


def test_rotate_re_encrypts_every_secret_and_deliveries_go_on(
    db_url: str,
    clock: FakeClock,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = new_secret()
    with running_api(db_url, clock) as api:  # key A
        create(api, url=f"{receiver.url}?token=t0k3n", secret=secret)
        create(
            api,
            name="pd",
            url=f"{receiver.url}?pd=1",
            format=wpb.WEBHOOK_FORMAT_PAGERDUTY,
            routing_key=ROUTING_KEY,
        )
        assert status(api) == (ID_A, {ID_A: 4})
    # Step 1 of a key change: the new key first, the old one still readable.
    with running_api(db_url, clock, secrets_key=f"{KEY_B},{KEY_A}") as api:
        assert status(api) == (ID_B, {ID_A: 4})
        server = ["--server", port_of(api), "--token", ADMIN_TOKEN]
        capsys.readouterr()
        assert cli(["secrets", "rotate", *server]) == 0
        out = capsys.readouterr().out
        assert f"re-encrypted 4 stored value(s) under key {ID_B}; 0 already were" in out
        assert status(api) == (ID_B, {ID_B: 4})
        assert all(
            r[c] == "" or r[c].startswith(f"enc:v1:{ID_B}:")
            for r in raw_webhooks(db_url)
            for c in ("url", "secret", "routing_key")
        )
        again = secrets_stub(api).RotateSecrets(
            spb.RotateSecretsRequest(), metadata=ADMIN, timeout=10
        )
        assert (again.rotated, again.unchanged, list(again.unreadable)) == (0, 4, [])
        # The read-only token may look, not rotate.
        with pytest.raises(grpc.RpcError) as e:
            secrets_stub(api).RotateSecrets(
                spb.RotateSecretsRequest(), metadata=bearer(READ_TOKEN), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert cli(["secrets", "status", *server]) == 0
        assert f"current key: {ID_B}" in capsys.readouterr().out
    # Step 3: the old key removed; every webhook still signs and delivers.
    with running_api(db_url, clock, secrets_key=KEY_B) as api:
        policy = api.policy("1")
        api.report(policy.id, 2 * USD)
        got = {r.path: r for r in receiver.wait_for(2)}
        StandardWebhook(secret).verify(
            got["/hook?token=t0k3n"].body, got["/hook?token=t0k3n"].headers
        )
        assert got["/hook?pd=1"].json()["routing_key"] == ROUTING_KEY
    out = capsys.readouterr()
    assert not any(c in out.out + out.err for c in (secret, ROUTING_KEY, "t0k3n", KEY_A, KEY_B))


def test_a_secret_under_an_unknown_key_fails_its_delivery_with_the_reason(
    db_url: str, clock: FakeClock, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_api(db_url, clock, secrets_key=KEY_B) as api:
        hook = create(api, url=receiver.url, secret=new_secret())
    # A control plane that has only key A: it starts (logging the problem) ...
    with running_api(db_url, clock, webhook_max_attempts=1) as api:
        policy = api.policy("1")
        api.report(policy.id, 2 * USD)

        def failed() -> list[wpb.WebhookDelivery]:
            return [d for d in api.deliveries() if d.state == wpb.DELIVERY_STATE_FAILED]

        wait_until(lambda: bool(failed()), timeout=15)
        (delivery,) = failed()
        assert delivery.webhook_id == hook.id
        assert delivery.last_status_code == 0
        assert f"not sent: webhook url encrypted with key {ID_B}, which is not configured" in (
            delivery.last_error
        )
        assert delivery.attempts[0].error.startswith("not sent: webhook url")
        # ... rotation reports what it cannot read and leaves it as it is.
        capsys.readouterr()
        assert cli(["secrets", "rotate", "--server", port_of(api), "--token", ADMIN_TOKEN]) == 1
        captured = capsys.readouterr()
        assert f"cannot read url of webhook {hook.id}" in captured.out
        assert "2 stored value(s) could not be read" in captured.err
        assert status(api) == (ID_A, {ID_B: 2})
        # An update that keeps the unreadable values is refused with the reason;
        # one that sets them again stores them under this control plane's key.
        with pytest.raises(grpc.RpcError) as e:
            api.webhooks.UpdateWebhook(
                wpb.UpdateWebhookRequest(
                    webhook=wpb.Webhook(id=hook.id, name="renamed"),
                    update_mask=FieldMask(paths=["name"]),
                ),
                metadata=ADMIN,
                timeout=10,
            )
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"the stored secret of webhook {hook.id} cannot be read" in (e.value.details() or "")
        api.webhooks.UpdateWebhook(
            wpb.UpdateWebhookRequest(
                webhook=wpb.Webhook(id=hook.id, url=receiver.url, secret=new_secret()),
                update_mask=FieldMask(paths=["url", "secret"]),
            ),
            metadata=ADMIN,
            timeout=10,
        )
        assert status(api) == (ID_A, {ID_A: 2})
    assert receiver.received() == []
