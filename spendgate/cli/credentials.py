"""Where the CLI finds its server and token.

Order: command-line flags, then SPENDGATE_SERVER / SPENDGATE_TOKEN (or
SPENDGATE_ADMIN_TOKEN), then the credentials file `spendgate up` writes in
its state directory (``credentials.json``, mode 0600): the one --state-dir or
SPENDGATE_STATE_DIR names, else ``.spendgate/`` in the current folder or the
nearest parent that has one (as git finds ``.git``). `spendgate
up` keeps the control plane's secrets key there too (``secrets.key``, 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path(".spendgate")
STATE_DIR_ENV = "SPENDGATE_STATE_DIR"
DEFAULT_SERVER = "127.0.0.1:50051"


@dataclass(frozen=True, slots=True)
class Tokens:
    admin: str
    read: str
    data_plane: str


def credentials_path(state_dir: Path = DEFAULT_STATE_DIR) -> Path:
    return state_dir / "credentials.json"


def load_or_create_tokens(state_dir: Path) -> Tokens:
    """Tokens from the environment, else from the state dir, else new random ones
    (saved there, readable only by this user)."""
    env = os.environ
    if env.get("SPENDGATE_ADMIN_TOKEN"):
        return Tokens(
            env["SPENDGATE_ADMIN_TOKEN"],
            env.get("SPENDGATE_READ_TOKEN", ""),
            env.get("SPENDGATE_DATA_PLANE_TOKEN", "") or secrets.token_urlsafe(24),
        )
    path = credentials_path(state_dir)
    if path.exists():
        data = json.loads(path.read_text())
        return Tokens(data["admin_token"], data["read_token"], data["data_plane_token"])
    tokens = Tokens(*(secrets.token_urlsafe(24) for _ in range(3)))
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(
            {
                "admin_token": tokens.admin,
                "read_token": tokens.read,
                "data_plane_token": tokens.data_plane,
            },
            f,
        )
    return tokens


KEY_SETTINGS_ENV = (
    "SPENDGATE_CONTROL_PLANE_SECRETS_KEY_FILE",
    "SPENDGATE_CONTROL_PLANE_SECRETS_KEY",
    "SPENDGATE_SECRETS_KEY_FILE",
    "SPENDGATE_SECRETS_KEY",
)


def secrets_key_path(state_dir: Path = DEFAULT_STATE_DIR) -> Path:
    return state_dir / "secrets.key"


def secrets_key_env(state_dir: Path) -> dict[str, str]:
    """The control plane's secrets key setting for `spendgate up`: none when
    the environment sets one, else the state dir's key file, made (0600, one
    new key) on first use like the tokens."""
    if any(os.environ.get(name) for name in KEY_SETTINGS_ENV):
        return {}
    from control_plane.keyring import write_new_key_file

    path = secrets_key_path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        write_new_key_file(path)
    return {"SPENDGATE_CONTROL_PLANE_SECRETS_KEY_FILE": str(path)}


def default_state_dir() -> Path:
    """Where `spendgate up` keeps its state unless --state-dir says otherwise."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def find_credentials(state_dir: str | None = None, cwd: Path | None = None) -> Path | None:
    """The credentials file the CLI reads: in ``state_dir`` or
    SPENDGATE_STATE_DIR when given (only there: an explicit folder is not
    second-guessed), else in ``.spendgate/`` of ``cwd`` or its nearest parent."""
    explicit = state_dir or os.environ.get(STATE_DIR_ENV)
    if explicit:
        path = credentials_path(Path(explicit))
        return path if path.is_file() else None
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        path = credentials_path(folder / DEFAULT_STATE_DIR)
        if path.is_file():
            return path
    return None


def client_token(flag: str | None, state_dir: str | None = None) -> str:
    if flag:
        return flag
    env = os.environ
    for name in ("SPENDGATE_TOKEN", "SPENDGATE_ADMIN_TOKEN"):
        if env.get(name):
            return env[name]
    path = find_credentials(state_dir)
    if path is not None:
        try:
            return str(json.loads(path.read_text())["admin_token"])
        except (OSError, ValueError, KeyError):
            return ""
    return ""


def client_server(flag: str | None) -> str:
    return flag or os.environ.get("SPENDGATE_SERVER") or DEFAULT_SERVER
