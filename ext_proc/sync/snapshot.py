"""The last state the control plane sent, kept on disk next to the journal.

An ext_proc that restarts while no control plane is reachable starts from
this file: it enforces the policies, prices and window totals it last knew
(plus its own usage) instead of admitting everything and charging nothing.
Written atomically (temporary file, fsync, rename) at most once a second
while something changed; a missing or damaged file is a start without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from google.protobuf.message import DecodeError

from spendgate.v1 import dataplane_pb2 as dp

log = structlog.get_logger("spendgate.ext_proc")
FILE_NAME = "snapshot.pb"


def save(directory: str | Path, update: dp.StateUpdate) -> None:
    """Replace the saved snapshot; raises OSError when the disk refuses."""
    path = Path(directory) / FILE_NAME
    tmp = path.with_suffix(".tmp")
    data = update.SerializeToString()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover .tmp keeps its mode through O_TRUNC
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load(directory: str | Path) -> dp.StateUpdate | None:
    path = Path(directory) / FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("saved state not readable; starting without it", path=str(path), error=str(e))
        return None
    update = dp.StateUpdate()
    try:
        update.ParseFromString(data)
    except DecodeError as e:
        log.warning("saved state is damaged; starting without it", path=str(path), error=str(e))
        return None
    return update
