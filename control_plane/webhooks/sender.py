"""One HTTP attempt of a webhook delivery: the only module that sends them.

The host is resolved and every address checked (ssrf.py) right before the
attempt; the request then goes to a checked address with the original host
name as Host header and TLS server name, so certificates are verified for the
name and a changed DNS answer cannot redirect it. Redirects are not followed,
proxies from the environment are not used, and connections are not reused
(a pooled connection must not carry one host's request to another's address).
httpx and resolver errors become one readable line here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime

import httpx

from control_plane.webhooks.backoff import parse_retry_after
from control_plane.webhooks.formats import Outgoing
from control_plane.webhooks.ssrf import ResolveFailed, Resolver, UrlBlocked, UrlPolicy
from control_plane.webhooks.ssrf import system_resolver as _system_resolver

EXCERPT_BYTES = 1024
EXCERPT_CHARS = 500


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status_code: int  # 0 when no response came
    error: str  # empty when the receiver answered 2xx
    retry_after_s: float | None
    duration_ms: int
    excerpt: str

    @property
    def delivered(self) -> bool:
        return 200 <= self.status_code < 300 and not self.error


class Sender:
    """Sends rendered deliveries. Safe to share between tasks of one loop."""

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        resolver: Resolver = _system_resolver,
    ) -> None:
        self.policy = policy
        self.resolver = resolver
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=connect_timeout_s,
                read=read_timeout_s,
                write=read_timeout_s,
                pool=connect_timeout_s,
            ),
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    @property
    def attempt_limit_s(self) -> float:
        """The longest one attempt can take (resolving included)."""
        return 2 * self.connect_timeout_s + self.read_timeout_s + 1.0

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, out: Outgoing, now: datetime) -> AttemptResult:
        """POST ``out``; ``now`` (the control plane's clock) reads Retry-After dates."""
        started = time.monotonic()

        def result(
            status: int, error: str, retry: float | None = None, text: str = ""
        ) -> AttemptResult:
            ms = int((time.monotonic() - started) * 1000)
            return AttemptResult(status, error, retry, ms, text)

        try:
            async with asyncio.timeout(self.attempt_limit_s):
                target, addresses = await self.policy.addresses(out.url, self.resolver)
                response, excerpt = await self._post(out, target.host, target.scheme, addresses)
        except UrlBlocked as e:
            return result(0, f"blocked: {e}")
        except ResolveFailed as e:
            return result(0, str(e))
        except httpx.ConnectTimeout:
            return result(0, f"connect timeout ({self.connect_timeout_s:g}s)")
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
            return result(0, f"read timeout ({self.read_timeout_s:g}s)")
        except TimeoutError:
            return result(0, f"timed out after {self.attempt_limit_s:g}s")
        except httpx.HTTPError as e:
            return result(0, _describe(e))
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"), now)
        if 200 <= status < 300:
            return result(status, "", None, excerpt)
        reason = "redirect not followed" if 300 <= status < 400 else f"HTTP {status}"
        return result(status, reason, retry_after, excerpt)

    async def _post(
        self, out: Outgoing, host: str, scheme: str, addresses: list[str]
    ) -> tuple[httpx.Response, str]:
        url = httpx.URL(out.url)
        last: httpx.ConnectError | None = None
        for address in addresses:
            extensions = {"sni_hostname": host} if scheme == "https" and host != address else {}
            request = self._client.build_request(
                "POST",
                url.copy_with(host=address),
                headers={**out.headers, "host": url.netloc.decode("ascii")},
                content=out.body,
                extensions=extensions,
            )
            try:
                response = await self._client.send(request, stream=True)
            except httpx.ConnectError as e:
                last = e  # try the next address
                continue
            try:
                body = b""
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) >= EXCERPT_BYTES:
                        break
            finally:
                await response.aclose()
            return response, body[:EXCERPT_BYTES].decode("utf-8", "replace")[:EXCERPT_CHARS]
        assert last is not None
        raise last


def _describe(e: httpx.HTTPError) -> str:
    """One line, without the request URL (it may carry a token)."""
    kinds: dict[type[httpx.HTTPError], str] = {
        httpx.ConnectError: "connection failed",
        httpx.RemoteProtocolError: "protocol error",
        httpx.ReadError: "read failed",
        httpx.WriteError: "write failed",
    }
    kind = kinds.get(type(e), type(e).__name__)
    detail = str(e).splitlines()[0] if str(e) else ""
    return f"{kind}: {detail}" if detail else kind
