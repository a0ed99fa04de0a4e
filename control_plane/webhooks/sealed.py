"""Which webhook columns are secret, and how they are sealed and opened.

``url`` (a Slack URL is itself the credential, other URLs may carry tokens in
the query), ``secret`` (the Standard Webhooks signing key) and
``routing_key`` (PagerDuty's) are stored encrypted, each bound to its column
and row id. They are opened only to send (or test) a delivery, and to keep
a stored value on update. Pure apart from the keyring's randomness.
"""

from __future__ import annotations

from control_plane.errors import FailedPrecondition
from control_plane.keyring import KEY_SETTINGS, Keyring, SecretUnreadable, is_encrypted

COLUMNS = ("url", "secret", "routing_key")


def context(column: str, row_id: str) -> str:
    """The associated data a column's value is sealed with."""
    return f"webhooks.{column}:{row_id}"


def seal(keyring: Keyring | None, column: str, row_id: str, value: str) -> str:
    """``value`` as stored. FailedPrecondition when there is something to
    encrypt and no key is configured: secrets are never stored in clear."""
    if not value:
        return ""
    if keyring is None:
        raise FailedPrecondition(
            f"webhook {column}s are stored encrypted and this control plane has no key: "
            f"set {KEY_SETTINGS}"
        )
    return keyring.encrypt(value, context(column, row_id))


def unseal(keyring: Keyring | None, column: str, row_id: str, stored: str) -> str:
    """The plaintext of a stored value; SecretUnreadable says why not."""
    if keyring is None:
        if is_encrypted(stored):
            raise SecretUnreadable(f"encrypted, and this control plane has no key ({KEY_SETTINGS})")
        return stored
    return keyring.decrypt(stored, context(column, row_id))
