"""The processes one benchmark run needs, all on this machine:

upstream     Envoy answering a fixed chat completion with direct_response
             (fast enough never to be the bottleneck)
streamer     the fake provider (Python, a process of its own so that its pacing
             never waits for the benchmark's client), for the streaming
             measurements only
plain        Envoy routing to the upstream, no ext_proc: the floor
spendgate    Envoy with the repo's bootstrap (ext_proc filter) + ext_proc +
             control plane, with realistic policies loaded
floor        the same Envoy bootstrap in front of bench/floor.py, a Python
             ext_proc that only answers: what the protocol itself costs
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from spendgate import envoy_config
from spendgate.v1 import budget_pb2 as pb
from spendgate.v1 import budget_pb2_grpc
from tests.harness import EnvoyProcess, free_port, wait_until

ADMIN = "bench-admin-token-0123456789"
DATA_PLANE = "bench-data-plane-token-0123"
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
)


def upstream_config() -> dict[str, Any]:
    """An Envoy that answers every request with COMPLETION, as fast as Envoy can."""
    config: dict[str, Any] = yaml.safe_load((Path(__file__).parent / "upstream.yaml").read_text())
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    routes[0]["direct_response"]["body"]["inline_string"] = COMPLETION
    return config


def without_access_logs(config: dict[str, Any]) -> dict[str, Any]:
    """Access logs cost the same with or without spendgate; leave them out."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                f["typed_config"].pop("access_log", None)
    return config


def plain_config(spendgate: dict[str, Any]) -> dict[str, Any]:
    """The same bootstrap with both ext_proc filters (admission, metering) removed."""
    plain = copy.deepcopy(spendgate)
    hcm = plain["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["http_filters"] = [
        f
        for f in hcm["typed_config"]["http_filters"]
        if "ext_proc.v3" not in json.dumps(f["typed_config"])
    ]
    return plain


@dataclass
class Topology:
    workdir: Path
    upstream: EnvoyProcess
    streamer: subprocess.Popen[bytes]
    plain: EnvoyProcess
    spendgate: EnvoyProcess
    control_plane: subprocess.Popen[bytes]
    ext_procs: list[subprocess.Popen[bytes]]
    cp_address: str
    floor: EnvoyProcess
    floor_server: subprocess.Popen[bytes]
    children: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for env in (self.spendgate, self.plain, self.floor, self.upstream):
            env.stop()
        for proc in (*self.ext_procs, self.floor_server, self.control_plane, self.streamer):
            proc.terminate()
            proc.wait(15)


def _python(
    module: str, args: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _serving(address: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


def start(
    *,
    ext_procs: int = 1,
    ext_proc_args: list[str] | None = None,
    database_url: str | None = None,
) -> Topology:
    """The topology with ``ext_procs`` ext_proc processes in one Envoy cluster
    (each a data plane of its own); the control plane on ``database_url``
    (default: SQLite in the run's folder)."""
    workdir = Path(tempfile.mkdtemp(prefix="spendgate-bench-"))
    upstream_cfg = upstream_config()
    up_port = free_port()
    upstream_cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = (
        up_port
    )
    upstream = EnvoyProcess(upstream_cfg, workdir)
    # EnvoyProcess assigns its own listener port: read it back.
    up_port = upstream.port
    env = {
        **os.environ,
        "SPENDGATE_ADMIN_TOKEN": ADMIN,
        "SPENDGATE_DATA_PLANE_TOKEN": DATA_PLANE,
        "SPENDGATE_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "warning"),
        # Metrics on (their cost is part of what is measured), on free ports.
        "SPENDGATE_METRICS_LISTEN": "127.0.0.1:0",
        # wrk sends the identity headers from loopback: trust them there.
        "SPENDGATE_EXT_PROC_TRUSTED_HEADER_SOURCES": "127.0.0.1/32",
    }
    streamer_port = free_port()
    streamer = _python(
        "spendgate.demo.fake_provider",
        ["--port", str(streamer_port)],
        env,
        workdir / "fake_provider.log",
    )
    cp_address = f"127.0.0.1:{free_port()}"
    ep_port = free_port()
    control_plane = _python(
        "control_plane",
        ["--listen", cp_address, "--database-url", database_url or f"sqlite:///{workdir}/bench.db"],
        env,
        workdir / "control_plane.log",
    )
    wait_until(lambda: _serving(cp_address), timeout=30, message="control plane")
    wait_until(lambda: _listening(streamer_port), timeout=30, message="fake provider")
    ports = [ep_port, *(free_port() for _ in range(ext_procs - 1))]
    extra = ext_proc_args or []
    # BENCH_PROFILE=DIR: each ext_proc runs under cProfile and writes
    # DIR/ext_proc-PORT.prof when it stops (its event loop thread only: the
    # Python that spendgate and grpc.aio run per message).
    profile = os.environ.get("BENCH_PROFILE", "")
    processes = [
        _python(
            "cProfile" if profile else "ext_proc",
            [
                *(["-o", f"{profile}/ext_proc-{port}.prof", "-m", "ext_proc"] if profile else []),
                "--listen",
                f"127.0.0.1:{port}",
                "--control-plane",
                cp_address,
                *extra,
            ],
            env,
            workdir / f"ext_proc-{port}.log",
        )
        for port in ports
    ]
    for port in ports:
        wait_until(lambda p=port: _serving(f"127.0.0.1:{p}"), timeout=30, message="ext_proc")
    base = without_access_logs(
        envoy_config.adapt(
            envoy_config.load(),
            ext_proc=("127.0.0.1", ep_port),
            providers_to=("127.0.0.1", up_port),
            demo_to=("127.0.0.1", streamer_port),
        )
    )
    envoy_config.set_ext_proc_endpoints(base, [("127.0.0.1", p) for p in ports])
    plain = EnvoyProcess(plain_config(base), workdir)
    spendgate = EnvoyProcess(base, workdir)
    floor_port = free_port()
    floor_server = _python("bench.floor", [str(floor_port)], env, workdir / "floor.log")
    wait_until(lambda: _listening(floor_port), timeout=30, message="floor ext_proc")
    floor_config = copy.deepcopy(base)
    envoy_config.set_ext_proc_endpoints(floor_config, [("127.0.0.1", floor_port)])
    floor = EnvoyProcess(floor_config, workdir)
    return Topology(
        workdir,
        upstream,
        streamer,
        plain,
        spendgate,
        control_plane,
        processes,
        cp_address,
        floor,
        floor_server,
    )


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def load_policies(cp_address: str, count: int = 50) -> int:
    """``count`` policies across scopes; the benchmark request matches several
    of them (global, its user, its team tag, its model, its route, its key)."""
    stub = budget_pb2_grpc.BudgetServiceStub(grpc.insecure_channel(cp_address))
    md = (("authorization", f"Bearer {ADMIN}"),)
    day = pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1)
    matching = [
        (pb.SCOPE_GLOBAL, ""),
        (pb.SCOPE_USER, "bench-user"),
        (pb.SCOPE_USER, "*"),
        (pb.SCOPE_TAG, "team=*"),
        (pb.SCOPE_MODEL, "gpt-4o-mini"),
        (pb.SCOPE_ENDPOINT, "openai"),
        (pb.SCOPE_API_KEY, "sk-bench"),
    ]
    specs = list(matching)
    i = 0
    while len(specs) < count:
        scope = [pb.SCOPE_USER, pb.SCOPE_TAG, pb.SCOPE_MODEL, pb.SCOPE_WORKSPACE][i % 4]
        target = {pb.SCOPE_TAG: f"team=other{i}"}.get(scope, f"other-{i}")
        specs.append((scope, target))
        i += 1
    for n, (scope, target) in enumerate(specs):
        stub.CreateBudgetPolicy(
            pb.CreateBudgetPolicyRequest(
                policy=pb.BudgetPolicy(
                    name=f"bench-{n}",
                    amount_usd="1000000",
                    window=day,
                    action=pb.ACTION_REJECT if n % 2 else pb.ACTION_ALERT,
                    scope=scope,
                    target=target,
                    alert_thresholds=[50, 80, 100],
                )
            ),
            metadata=md,
        )
    time.sleep(1.0)  # the snapshot reaches ext_proc within milliseconds
    return len(matching)
