"""control_plane/keyring.py: sealing and opening stored secrets, and keys
read from the settings with errors that name the setting."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from control_plane import keyring
from control_plane.config import load_settings
from control_plane.keyring import CLEAR, Keyring, SecretUnreadable
from spendgate.settings import ConfigError
from tests.harness import ADMIN_TOKEN

K1, K2 = os.urandom(32), os.urandom(32)
CTX = "webhooks.secret:wh_1"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_a_value_round_trips_and_names_its_key() -> None:
    ring = Keyring((K1,))
    sealed = ring.encrypt("whsec_top-secret", CTX)
    assert sealed.startswith(f"enc:v1:{keyring.key_id(K1)}:")
    assert "top-secret" not in sealed
    assert ring.decrypt(sealed, CTX) == "whsec_top-secret"
    assert keyring.stored_key_id(sealed) == ring.current_id
    # A fresh nonce every time: equal secrets do not look equal at rest.
    assert ring.encrypt("whsec_top-secret", CTX) != sealed


def test_empty_stays_empty_and_clear_values_are_read_as_they_are() -> None:
    ring = Keyring((K1,))
    assert ring.encrypt("", CTX) == ""
    assert ring.decrypt("https://legacy.example/hook", CTX) == "https://legacy.example/hook"
    assert keyring.stored_key_id("https://legacy.example/hook") == CLEAR
    assert ring.needs_rotation("https://legacy.example/hook")
    assert not ring.needs_rotation("")


def test_a_value_is_bound_to_its_column_and_row() -> None:
    ring = Keyring((K1,))
    sealed = ring.encrypt("whsec_x", CTX)
    for other in ("webhooks.secret:wh_2", "webhooks.url:wh_1"):
        with pytest.raises(SecretUnreadable, match="does not decrypt"):
            ring.decrypt(sealed, other)


def test_old_keys_still_open_and_the_first_key_seals() -> None:
    old = Keyring((K1,)).encrypt("v", CTX)
    both = Keyring((K2, K1))
    assert both.current_id == keyring.key_id(K2)
    assert both.decrypt(old, CTX) == "v"
    assert both.needs_rotation(old)
    assert keyring.stored_key_id(both.encrypt("v", CTX)) == keyring.key_id(K2)


def test_an_unknown_key_or_damage_is_a_clear_error_without_the_value() -> None:
    sealed = Keyring((K1,)).encrypt("whsec_hidden", CTX)
    with pytest.raises(SecretUnreadable) as e:
        Keyring((K2,)).decrypt(sealed, CTX)
    assert f"key {keyring.key_id(K1)}, which is not configured" in str(e.value)
    assert "secrets_key_file" in str(e.value)
    with pytest.raises(SecretUnreadable, match="truncated"):
        Keyring((K1,)).decrypt(sealed[:30], CTX)
    flipped = sealed[:-3] + ("A" if sealed[-3] != "A" else "B") + sealed[-2:]
    with pytest.raises(SecretUnreadable, match="does not decrypt"):
        Keyring((K1,)).decrypt(flipped, CTX)


def test_the_repr_shows_key_ids_only() -> None:
    ring = Keyring((K1, K2))
    text = repr(ring)
    assert keyring.key_id(K1) in text and keyring.key_id(K2) in text
    assert b64(K1) not in text and str(K1) not in text


def test_keys_from_a_file_first_is_current(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# new key first\n{b64(K2)}\n\n{base64.urlsafe_b64encode(K1).decode()}\n")
    path.chmod(0o600)
    ring = keyring.load(str(path), "")
    assert ring is not None and ring.keys == (K2, K1)
    assert keyring.load("", "") is None
    env_ring = keyring.load("", f"{b64(K1)}, {b64(K2)}")
    assert env_ring is not None and env_ring.current_id == keyring.key_id(K1)


def test_a_new_key_file_is_private_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "secrets.key"
    keyring.write_new_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    ring = keyring.load(str(path), "")
    assert ring is not None and len(ring.keys) == 1
    with pytest.raises(FileExistsError):
        keyring.write_new_key_file(path)  # never overwritten: that would lose the secrets


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b64(os.urandom(16)), "a key must be 32 bytes", id="short"),
        pytest.param("not base64!", "not a base64 key", id="malformed"),
        pytest.param("# only a comment\n\n", "holds no key", id="empty"),
        pytest.param(f"{b64(K1)}\n{b64(K1)}", "the same key is listed twice", id="twice"),
    ],
)
def test_bad_key_files_stop_start_up_naming_the_setting(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        keyring.load(str(path), "")
    assert f"secrets_key_file {path}" in str(e.value) and message in str(e.value)
    assert b64(K1) not in str(e.value)


def test_a_missing_key_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"secrets_key_file .*nope: cannot be read"):
        keyring.load(str(tmp_path / "nope"), "")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"SPENDGATE_CONTROL_PLANE_SECRETS_KEY": b64(os.urandom(31))},
            "secrets_key (key 1): a key must be 32 bytes",
            id="short",
        ),
        pytest.param(
            {"SPENDGATE_CONTROL_PLANE_SECRETS_KEY": f"{b64(K1)},???"},
            "secrets_key (key 2): not a base64 key",
            id="malformed-second",
        ),
        pytest.param(
            {
                "SPENDGATE_CONTROL_PLANE_SECRETS_KEY": b64(K1),
                "SPENDGATE_CONTROL_PLANE_SECRETS_KEY_FILE": "/etc/keys",
            },
            "set secrets_key_file or secrets_key, not both",
            id="both",
        ),
    ],
)
def test_bad_key_settings_fail_loading_naming_the_setting(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(env={"SPENDGATE_ADMIN_TOKEN": ADMIN_TOKEN, **env})
    assert message in str(e.value)


def test_the_key_setting_stays_out_of_the_settings_repr() -> None:
    s = load_settings(
        env={"SPENDGATE_ADMIN_TOKEN": ADMIN_TOKEN, "SPENDGATE_CONTROL_PLANE_SECRETS_KEY": b64(K1)}
    )
    assert s.secrets_key == b64(K1)
    assert b64(K1) not in repr(s)
