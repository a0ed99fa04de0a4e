"""Page tokens: opaque, signed, and only good for the list that made them.

A token is ``base64url(payload) "." base64url(mac)``, where the payload is
the list's name and the position parts joined by U+001F, and the mac is the
first 16 bytes of HMAC-SHA256 under a key kept in the database (table
``server_keys``, created by the first replica that needs it, so every
replica of one database accepts the others' tokens). Anything else, or a
token of another list, is INVALID_ARGUMENT; a client cannot craft positions.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control_plane.errors import InvalidArgument
from control_plane.store.models import ServerKeyRow
from spendgate.domain.limits import MAX_PAGE_TOKEN_CHARS

KEY_NAME = "page_token"
_SEP = "\x1f"
_MAC_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, kind: str, *parts: str) -> str:
        payload = _SEP.join((kind, *parts)).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def decode(self, kind: str, token: str, nparts: int) -> list[str]:
        """The parts ``encode(kind, ...)`` was given; InvalidArgument naming
        ``page_token`` for anything else."""
        bad = InvalidArgument.one(
            "page_token", "is not a token this list returned (pass the next_page_token as is)"
        )
        if len(token) > MAX_PAGE_TOKEN_CHARS or not token.isascii():
            raise bad
        body, dot, mac = token.partition(".")
        try:
            payload, given = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError):
            raise bad from None
        if not dot or not hmac.compare_digest(given, self._mac(payload)):
            raise bad
        try:
            found, *parts = payload.decode().split(_SEP)
        except UnicodeDecodeError:
            raise bad from None
        if found != kind or len(parts) != nparts:
            raise bad
        return parts


def load_key(session: Session, now: datetime) -> bytes:
    """The database's page token key, created if it has none yet."""
    row = session.get(ServerKeyRow, KEY_NAME)
    if row is None:
        try:
            with session.begin_nested():
                row = ServerKeyRow(name=KEY_NAME, key=secrets.token_hex(32), create_time=now)
                session.add(row)
        except IntegrityError:  # another replica created it first
            row = session.get(ServerKeyRow, KEY_NAME, populate_existing=True)
            assert row is not None
    return bytes.fromhex(row.key)
