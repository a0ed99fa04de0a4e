"""Encryption of the secrets the control plane stores (webhook URLs, signing
secrets, PagerDuty routing keys): AES-256-GCM under keys the operator gives.

Keys come from ``secrets_key_file`` (one key per line; blank lines and ``#``
comments ignored) or ``secrets_key`` (``SPENDGATE_CONTROL_PLANE_SECRETS_KEY``,
several separated by commas). A key is 32 random bytes in base64 (standard
or URL-safe, e.g. from ``spendgate secrets new-key``). The **first** key is
the current one: everything written is encrypted under it. The others are
only read, so a key can be replaced without a moment when stored values are
unreadable (see ``spendgate secrets rotate``).

A stored value is ``enc:v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>``.
The key id is 8 hex digits derived from the key (not secret, not the key), so
a value says which key opens it. The associated data binds a value to its
column and row: a ciphertext copied to another row or column does not open.
The empty string stays empty (it means "not set"). Values without the prefix
are cleartext written before encryption existed (or by an older replica
during an upgrade); they are read as they are, and rotation encrypts them.

Nothing here logs or puts key material or plaintext into an error message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spendgate.settings import ConfigError

log = structlog.get_logger("spendgate.control_plane")

PREFIX = "enc:v1:"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_SETTINGS = "secrets_key_file or secrets_key (SPENDGATE_CONTROL_PLANE_SECRETS_KEY)"
CLEAR = "clear"  # the key id reported for values stored without encryption


class SecretsKeyRequired(ConfigError):
    """Stored secrets need a key and none is configured (fails start-up)."""


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted; the message says why, never the value."""


def key_id(key: bytes) -> str:
    """8 hex digits naming ``key`` (a hash: says nothing useful about the key)."""
    return hashlib.sha256(b"spendgate secrets key id\x00" + key).hexdigest()[:8]


def new_key() -> str:
    """A fresh key in the form the settings take."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def parse_key(text: str, where: str) -> bytes:
    """The 32 bytes of one base64 key; ConfigError naming ``where`` otherwise."""
    t = text.strip()
    try:
        raw = base64.b64decode(t.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{where}: not a base64 key (make one with `spendgate secrets new-key`)"
        ) from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(
            f"{where}: a key must be {KEY_BYTES} bytes (base64 of 32 random bytes), "
            f"this one is {len(raw)}"
        )
    return raw


def parse_keys(lines: list[str], where: str, *, file: bool = True) -> list[bytes]:
    """Keys from ``lines`` (blank and ``#`` lines skipped), the current first;
    errors name the key's position (and its line in a ``file``)."""
    keys: list[bytes] = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        position = f"key {len(keys) + 1}, line {n}" if file else f"key {len(keys) + 1}"
        keys.append(parse_key(text, f"{where} ({position})"))
    if not keys:
        raise ConfigError(f"{where}: holds no key")
    ids = [key_id(k) for k in keys]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: the same key is listed twice")
    return keys


@dataclass(frozen=True, slots=True)
class Keyring:
    """The configured keys; ``current`` encrypts, every key decrypts."""

    keys: tuple[bytes, ...]
    _ciphers: dict[str, AESGCM] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a keyring needs at least one key")
        object.__setattr__(self, "_ciphers", {key_id(k): AESGCM(k) for k in self.keys})

    def __repr__(self) -> str:  # never the keys
        return f"Keyring(current={self.current_id}, ids={list(self.ids)})"

    @property
    def current_id(self) -> str:
        return key_id(self.keys[0])

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(key_id(k) for k in self.keys)

    def encrypt(self, plaintext: str, context: str) -> str:
        """``plaintext`` sealed under the current key, bound to ``context``
        (e.g. ``"webhooks.secret:wh_…"``); "" stays ""."""
        if not plaintext:
            return ""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.current_id].encrypt(nonce, plaintext.encode(), context.encode())
        body = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{PREFIX}{self.current_id}:{body}"

    def decrypt(self, stored: str, context: str) -> str:
        """The plaintext of a stored value (cleartext values are returned as
        they are); SecretUnreadable when its key is not configured or it
        does not open under ``context``."""
        if not is_encrypted(stored):
            return stored
        kid, body = _split(stored)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SecretUnreadable(
                f"encrypted with key {kid}, which is not configured "
                f"(configured: {', '.join(self.ids)}; see {KEY_SETTINGS})"
            )
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise SecretUnreadable(f"stored value under key {kid} is not valid base64") from None
        if len(raw) < NONCE_BYTES + 16:
            raise SecretUnreadable(f"stored value under key {kid} is truncated")
        try:
            return cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode()
        except InvalidTag:
            raise SecretUnreadable(
                f"stored value under key {kid} does not decrypt (damaged, or copied "
                "from another row or column)"
            ) from None

    def needs_rotation(self, stored: str) -> bool:
        """True when ``stored`` is cleartext or sealed under another key."""
        return bool(stored) and stored_key_id(stored) != self.current_id


def is_encrypted(stored: str) -> bool:
    return stored.startswith(PREFIX)


def stored_key_id(stored: str) -> str:
    """The key id a stored value is sealed under, ``CLEAR`` for cleartext."""
    return _split(stored)[0] if is_encrypted(stored) else CLEAR


def _split(stored: str) -> tuple[str, str]:
    kid, _, body = stored.removeprefix(PREFIX).partition(":")
    return kid, body


def load(key_file: str, key_text: str) -> Keyring | None:
    """The keyring the settings name (None when neither is set).

    ConfigError names the setting: an unreadable or empty file, a key that is
    not base64 of 32 bytes. A key file everyone may read is logged as a warning.
    """
    if key_file and key_text:
        raise ConfigError("set secrets_key_file or secrets_key, not both")
    if key_text:
        return Keyring(tuple(parse_keys(key_text.split(","), "secrets_key", file=False)))
    if not key_file:
        return None
    where = f"secrets_key_file {key_file}"
    try:
        text = Path(key_file).read_text()
        mode = os.stat(key_file).st_mode
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"{where}: cannot be read ({reason})") from None
    # Group bits are how Kubernetes (fsGroup) lets a non-root process read a
    # mounted Secret; readable by everyone is a mistake.
    if mode & stat.S_IRWXO:
        log.warning(
            "secrets key file is readable by every user; make it mode 0600 (or 0400)",
            path=key_file,
            mode=oct(stat.S_IMODE(mode)),
        )
    return Keyring(tuple(parse_keys(text.splitlines(), where)))


def write_new_key_file(path: Path) -> None:
    """Create ``path`` (mode 0600) holding one new key; FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            "# spendgate secrets key(s): the first encrypts, all decrypt. Keep it private\n"
            "# and back it up: stored webhook secrets cannot be read without it.\n"
            f"{new_key()}\n"
        )
