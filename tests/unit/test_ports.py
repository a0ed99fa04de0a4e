"""Who holds a port: read from /proc (a fake tree here, the real one in
tests/e2e/test_up_children.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from spendgate import ports

HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode\n"
)


def fake_proc(tmp_path: Path, port: int, inode: str, state: str = "0A") -> Path:
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    line = (
        f"   0: 0100007F:{port:04X} 00000000:0000 {state} 00000000:00000000 "
        f"00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
    )
    (proc / "net" / "tcp").write_text(HEADER + line)
    (proc / "net" / "tcp6").write_text(HEADER)
    fd = proc / "4242" / "fd"
    fd.mkdir(parents=True)
    os.symlink("pipe:[1]", fd / "0")
    os.symlink(f"socket:[{inode}]", fd / "7")
    (proc / "4242" / "cmdline").write_bytes(b"python\0-m\0control_plane\0")
    (proc / "self").mkdir()
    return proc


def test_the_listening_process_is_found(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 50051, "987654")
    assert ports.user_of(50051, proc) == ports.PortUser(4242, "python -m control_plane")
    assert ports.user_of(50052, proc) is None


def test_a_connection_that_is_not_listening_is_nobodys_port(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 50051, "987654", state="01")  # ESTABLISHED
    assert ports.user_of(50051, proc) is None


def test_in_use_binds_like_the_services() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()
        assert ports.in_use(port)
        assert ports.describe(port).startswith(f"port {port} is in use by pid {os.getpid()} (")
    assert not ports.in_use(port)
