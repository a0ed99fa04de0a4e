"""Is a local TCP port free, and if not, which process holds it?

``spendgate up`` checks every port it is about to give a child before it
starts any, so a leftover process is named instead of a child failing after
"spendgate is up". The owner is found the way ``ss -p`` finds it on Linux:
the listening socket's inode in /proc/net/tcp{,6}, then the process with a
descriptor on that inode. Elsewhere, or without permission to read another
user's /proc/<pid>/fd, the port is just "in use".
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

_LISTEN = "0A"  # TCP state of a listening socket in /proc/net/tcp


@dataclass(frozen=True, slots=True)
class PortUser:
    pid: int
    command: str  # its command line, shortened; "" when unreadable


def in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``host:port`` cannot be bound for listening (as the services
    bind it: with SO_REUSEADDR, so a closed connection's TIME_WAIT is no use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _listening_inodes(port: int, proc: Path) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def user_of(port: int, proc: Path = Path("/proc")) -> PortUser | None:
    """The process listening on ``port``, when it can be found."""
    inodes = _listening_inodes(port, proc)
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(fd) in targets:
                    return PortUser(int(entry.name), _command(entry))
    return None


def _command(entry: Path) -> str:
    try:
        raw = (entry / "cmdline").read_bytes()
    except OSError:
        return ""
    command = " ".join(p.decode(errors="replace") for p in raw.split(b"\0") if p)
    return command if len(command) <= 80 else command[:77] + "..."


def describe(port: int) -> str:
    """``port 50051 is in use by pid 1234 (python -m control_plane ...)``, or
    ``port 50051 is in use`` when the owner cannot be found."""
    user = user_of(port)
    if user is None:
        return f"port {port} is in use"
    suffix = f" ({user.command})" if user.command else ""
    return f"port {port} is in use by pid {user.pid}{suffix}"
