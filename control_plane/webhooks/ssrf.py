"""Which webhook URLs may be called: the SSRF guard.

By default a URL must be https, carry no user name or password, and its host
must resolve only to public (globally routable, not multicast) addresses. The
operator may allow plain http, specific hosts (their addresses are then not
checked) or private ranges (CIDRs) in the control plane settings.

URLs are checked when a webhook is written and again before every attempt,
after resolving the host: the request then goes to the checked address (the
host name is kept for the Host header and TLS), so a DNS answer that changes
between check and connect (DNS rebinding) cannot reach an internal address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from control_plane.config import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses to try (IP literals as text).
Resolver = Callable[[str, int], Awaitable[list[str]]]


class UrlBlocked(ValueError):
    """The URL or an address it resolves to is not allowed. The message names
    the problem and the host, never the path or query (they may hold tokens)."""


class ResolveFailed(OSError):
    """The host name did not resolve (checked again at the next attempt)."""


async def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ResolveFailed(f"cannot resolve {host}: {e.strerror}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str
    host: str  # lower-case, IPv6 without brackets
    port: int


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    allow_http: bool = False
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, s: Settings) -> UrlPolicy:
        return cls(s.webhook_allow_http, s.webhook_allowed_hosts, s.webhook_allowed_networks)

    def target(self, url: str) -> Target:
        """Check what can be checked without DNS; raise UrlBlocked."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise UrlBlocked("is not a valid URL") from None
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http"):
            raise UrlBlocked("must be an https:// URL")
        if scheme == "http" and not self.allow_http:
            raise UrlBlocked("must use https (plain http needs the webhook_allow_http setting)")
        if parts.username is not None or parts.password is not None:
            raise UrlBlocked("must not contain a user name or password")
        host = (parts.hostname or "").lower()
        if not host:
            raise UrlBlocked("must name a host")
        target = Target(scheme, host, port or (443 if scheme == "https" else 80))
        literal = _ip(host)
        if literal is not None and host not in self.allow_hosts:
            self._check_address(host, literal)
        return target

    def address_allowed(self, address: Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in n for n in self.allow_networks if n.version == address.version):
            return True
        return address.is_global and not address.is_multicast

    def _check_address(self, host: str, address: Address) -> None:
        if not self.address_allowed(address):
            shown = host if host == str(address) else f"{host} resolves to {address}, which"
            raise UrlBlocked(
                f"{shown} is not a public address (allow it with "
                "webhook_allow_private_ranges or webhook_allow_hosts)"
            )

    async def addresses(self, url: str, resolve: Resolver) -> tuple[Target, list[str]]:
        """The target and the addresses it may be sent to; every address the
        host resolves to must be allowed. Raises UrlBlocked or ResolveFailed."""
        target = self.target(url)
        if _ip(target.host) is not None:
            return target, [target.host]
        found = await resolve(target.host, target.port)
        if not found:
            raise ResolveFailed(f"cannot resolve {target.host}: no addresses")
        if target.host not in self.allow_hosts:
            for text in found:
                address = _ip(text)
                if address is None:
                    raise UrlBlocked(f"{target.host} resolves to {text!r}, not an address")
                self._check_address(target.host, address)
        return target, found


def _ip(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
