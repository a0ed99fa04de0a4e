"""The SSRF guard: URL rules, every resolved address checked, and the send
going to the checked address (DNS rebinding cannot redirect it)."""

from __future__ import annotations

import ipaddress
import re

import pytest

from control_plane.webhooks.formats import Outgoing
from control_plane.webhooks.sender import Sender
from control_plane.webhooks.ssrf import ResolveFailed, UrlBlocked, UrlPolicy
from tests.webhooks.conftest import recent_instant
from tests.webhooks.receiver import Receiver

STRICT = UrlPolicy()
LOCAL = UrlPolicy(allow_http=True, allow_networks=(ipaddress.ip_network("127.0.0.0/8"),))


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://hooks.slack.com/services/T/B/x", None),
        ("https://93.184.216.34/hook", None),
        ("https://[2606:4700::1111]/hook", None),
        ("http://hooks.example.com/x", "must use https"),
        ("ftp://example.com/x", "must be an https:// URL"),
        ("hooks.example.com/x", "must be an https:// URL"),
        ("https://user:pw@example.com/x", "must not contain a user name or password"),
        ("https:///x", "must name a host"),
        ("https://example.com:99999/x", "is not a valid URL"),
        ("https://127.0.0.1/x", "127.0.0.1 is not a public address"),
        ("https://10.1.2.3/x", "10.1.2.3 is not a public address"),
        ("https://169.254.169.254/latest/meta-data", "169.254.169.254 is not a public address"),
        ("https://[::1]/x", "::1 is not a public address"),
        ("https://[::ffff:10.0.0.1]/x", "is not a public address"),
        ("https://100.64.0.1/x", "is not a public address"),
        ("https://0.0.0.0/x", "is not a public address"),
        ("https://224.0.0.1/x", "is not a public address"),
    ],
)
def test_url_rules(url: str, problem: str | None) -> None:
    if problem is None:
        STRICT.target(url)
        return
    with pytest.raises(UrlBlocked) as e:
        STRICT.target(url)
    assert problem in str(e.value)
    assert "/x" not in str(e.value) and "meta-data" not in str(e.value)


def test_allowlists() -> None:
    assert LOCAL.target("http://127.0.0.1:8080/x").port == 8080
    with pytest.raises(UrlBlocked):
        LOCAL.target("http://10.0.0.1/x")
    hosts = UrlPolicy(allow_hosts=frozenset({"10.0.0.5", "internal.corp"}))
    hosts.target("https://10.0.0.5/x")
    with pytest.raises(UrlBlocked):
        hosts.target("https://10.0.0.6/x")


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise ResolveFailed(f"cannot resolve {host}: Name or service not known")
        return table[host]

    return resolve


async def test_every_resolved_address_must_be_allowed() -> None:
    table = {
        "public.test": ["93.184.216.34"],
        "mixed.test": ["93.184.216.34", "10.0.0.7"],
        "metadata.test": ["169.254.169.254"],
    }
    target, addresses = await STRICT.addresses("https://public.test/x", resolver(table))
    assert (target.host, target.port, addresses) == ("public.test", 443, ["93.184.216.34"])
    with pytest.raises(
        UrlBlocked, match=re.escape("mixed.test resolves to 10.0.0.7, which is not a public")
    ):
        await STRICT.addresses("https://mixed.test/x", resolver(table))
    with pytest.raises(UrlBlocked, match=re.escape("169.254.169.254")):
        await STRICT.addresses("https://metadata.test/x", resolver(table))
    with pytest.raises(ResolveFailed, match=re.escape("cannot resolve nowhere.test")):
        await STRICT.addresses("https://nowhere.test/x", resolver(table))
    allowed = UrlPolicy(allow_hosts=frozenset({"mixed.test"}))
    assert (await allowed.addresses("https://mixed.test/x", resolver(table)))[1] == [
        "93.184.216.34",
        "10.0.0.7",
    ]


async def test_send_goes_to_the_checked_address_with_the_original_host() -> None:
    receiver = Receiver().start()
    table = {"receiver.test": ["127.0.0.1"]}
    sender = Sender(LOCAL, connect_timeout_s=2, read_timeout_s=2, resolver=resolver(table))
    try:
        url = f"http://receiver.test:{receiver.port}/hook?x=1"
        result = await sender.send(Outgoing(url, {"x-test": "1"}, b"{}"), recent_instant())
        assert (result.status_code, result.error, result.delivered) == (200, "", True)
        (got,) = receiver.received()
        assert got.headers["host"] == f"receiver.test:{receiver.port}"
        assert got.path == "/hook?x=1"
        assert got.headers["x-test"] == "1"
    finally:
        await sender.aclose()
        receiver.stop()


async def test_dns_rebinding_to_a_private_address_is_blocked_at_send_time() -> None:
    """The name resolved to a public address when the webhook was written;
    now it resolves to an internal one: nothing is sent."""
    receiver = Receiver().start()
    table = {"rebind.test": ["93.184.216.34"]}
    strict_http = UrlPolicy(allow_http=True)
    sender = Sender(strict_http, connect_timeout_s=1, read_timeout_s=1, resolver=resolver(table))
    try:
        url = f"http://rebind.test:{receiver.port}/hook"
        await strict_http.addresses(url, resolver(table))  # fine when written
        table["rebind.test"] = ["127.0.0.1"]
        result = await sender.send(Outgoing(url, {}, b"{}"), recent_instant())
        assert result.status_code == 0
        assert result.error == (
            "blocked: rebind.test resolves to 127.0.0.1, which is not a public address "
            "(allow it with webhook_allow_private_ranges or webhook_allow_hosts)"
        )
        assert receiver.received() == []
    finally:
        await sender.aclose()
        receiver.stop()


async def test_redirects_are_not_followed() -> None:
    from tests.webhooks.receiver import Reply

    receiver = Receiver().start()
    receiver.reply(Reply(307, b"", {"location": "http://169.254.169.254/"}))
    sender = Sender(LOCAL, connect_timeout_s=1, read_timeout_s=1)
    try:
        result = await sender.send(Outgoing(receiver.url, {}, b"{}"), recent_instant())
        assert (result.status_code, result.error) == (307, "redirect not followed")
        assert len(receiver.received()) == 1
    finally:
        await sender.aclose()
        receiver.stop()
