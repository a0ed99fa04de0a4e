"""The fake provider behind TLS, with a certificate chosen by the test, that
counts what reaches it: TCP connections, TLS handshakes completed and
failed, and (in its log) the HTTP requests it decrypted."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spendgate.demo.fake_provider import FakeProviderServer
from tests.e2e.identity_setup import CertificateAuthority, Pem
from tests.harness import wait_until

HANDSHAKE_TIMEOUT_S = 10
OTHER_HOST = "elsewhere.spendgate.test"
WILDCARD_DOMAIN = "wild.spendgate.test"


class TlsFakeProvider(FakeProviderServer):
    """Listens on ::1 and 127.0.0.1 (one dual-stack socket): Envoy may
    resolve ``localhost`` to either."""

    address_family = socket.AF_INET6

    def __init__(self, pem: Pem) -> None:
        super().__init__("::")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pem.cert, pem.key)
        self.counts_lock = threading.Lock()
        self.connections = 0
        self.handshakes = 0
        self.failed_handshakes = 0

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        # The handshake runs in the request's thread (finish_request), so a
        # client that never completes it cannot stall accept().
        wrapped = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.counts_lock:
            self.connections += 1
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError):
            with self.counts_lock:
                self.failed_handshakes += 1
            return
        request.settimeout(None)
        with self.counts_lock:
            self.handshakes += 1
        super().finish_request(request, client_address)

    def counts(self) -> tuple[int, int, int]:
        """(connections, handshakes completed, handshakes failed)."""
        with self.counts_lock:
            return self.connections, self.handshakes, self.failed_handshakes

    def assert_refused_since(self, before: tuple[int, int, int]) -> None:
        """Since ``before`` (counts()), a connection came whose handshake
        failed, and none completed: no byte of a request (nor its key) was
        decrypted. The failure is counted by the fake's own thread, maybe
        after the client already has its 503: wait for it."""
        wait_until(lambda: self.counts()[2] > before[2], message="a failed TLS handshake")
        connections, handshakes, _ = self.counts()
        assert connections > before[0] and handshakes == before[1]


@dataclass
class Fakes:
    ca: Path  # the certificate of the CA that signed the fakes'
    good: TlsFakeProvider  # certificate for localhost and 127.0.0.1
    wrong_host: TlsFakeProvider  # for OTHER_HOST only
    wildcard: TlsFakeProvider  # for *.WILDCARD_DOMAIN only

    def all(self) -> tuple[TlsFakeProvider, ...]:
        return self.good, self.wrong_host, self.wildcard


@contextmanager
def fakes_of(workdir: Path) -> Iterator[Fakes]:
    """A CA made now and three running fakes with certificates from it,
    stopped on exit."""
    ca = CertificateAuthority(workdir)
    fakes = Fakes(
        ca.pem.cert,
        TlsFakeProvider(ca.issue("provider", server=True)),
        TlsFakeProvider(ca.issue("elsewhere", server=True, hosts=(OTHER_HOST,))),
        TlsFakeProvider(ca.issue("wildcard", server=True, hosts=(f"*.{WILDCARD_DOMAIN}",))),
    )
    for fake in fakes.all():
        fake.start_in_thread()
    try:
        yield fakes
    finally:
        for fake in fakes.all():
            fake.shutdown()
            fake.server_close()
