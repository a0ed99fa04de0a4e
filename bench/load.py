"""Load from a separate process: wrk, with a Lua script for the POST body."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"benchmark"}]}'
HEADERS = {
    "content-type": "application/json",
    "authorization": "Bearer sk-bench",
    "x-spendgate-user": "bench-user",
    "x-spendgate-tags": "team=bench",
}


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def script(workdir: Path, stop_after: int = 0) -> Path:
    """A wrk Lua script; stop_after > 0 makes each thread stop after that many responses."""
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in HEADERS.items())
    stop = (
        (
            f"local n = 0\nfunction response()\n  n = n + 1\n"
            f"  if n >= {stop_after} then wrk.thread:stop() end\nend\n"
        )
        if stop_after
        else ""
    )
    path = workdir / f"post-{stop_after}.lua"
    path.write_text(f"wrk.method = \"POST\"\nwrk.body = '{BODY}'\n{headers}\n{stop}")
    return path


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def parse(output: str) -> Result:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Result(rps, p50, p99, requests, int(errs.group(1)) if errs else 0)


def wrk(url: str, *, connections: int, seconds: float, lua: Path, threads: int = 0) -> Result:
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk not found: apt-get install wrk (Debian's package)")
    threads = threads or min(connections, 2)
    out = subprocess.run(
        [
            binary,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{int(seconds)}s",
            "--latency",
            "-s",
            str(lua),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return parse(out)
