"""A real ``python -m ext_proc`` killed with SIGKILL loses no flushed usage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_proc.server import SYNC_HEALTH_SERVICE, USAGE_HEALTH_SERVICE
from spendgate.domain.usage import Usage
from spendgate.v1 import reports_pb2 as rp
from spendgate.v1 import reports_pb2_grpc
from tests.durability.conftest import ADMIN, Env, create_policy, spend
from tests.extproc.protocol import (
    COMPLETION,
    chat_body,
    chat_headers,
    price,
    request_body,
    request_headers,
    response_body,
    response_headers,
)
from tests.harness import DATA_PLANE_TOKEN, env_without_spendgate, free_port, wait_until

ROOT = Path(__file__).parent.parent.parent
REQUESTS = 5


def start_ext_proc(env: Env, port: int, log: Path) -> subprocess.Popen[bytes]:
    environ = env_without_spendgate() | {
        "SPENDGATE_DATA_PLANE_TOKEN": DATA_PLANE_TOKEN,
        "SPENDGATE_EXT_PROC_JOURNAL_DIR": str(env.journal),
        "SPENDGATE_EXT_PROC_DATA_PLANE_ID": "kill9-dp",
        "SPENDGATE_EXT_PROC_METRICS_LISTEN": "",
        # One stream per request, driven here as Envoy with one filter does.
        "SPENDGATE_EXT_PROC_RESPONSE_METERING": "inline",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ext_proc",
                "--listen",
                f"127.0.0.1:{port}",
                "--control-plane",
                f"127.0.0.1:{env.cp_port}",
            ],
            cwd=ROOT,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def health(port: int, service: str) -> int:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
        return int(resp.status)
    except grpc.RpcError:
        return -1


def metered_request(port: int) -> None:
    body = chat_body()
    messages: list[ep.ProcessingRequest] = [
        request_headers(headers=chat_headers(body)),
        request_body(body),
        response_headers(200, "application/json"),
        response_body(COMPLETION, end_of_stream=True),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        answers = list(ExternalProcessorStub(ch).Process(iter(messages), timeout=5))
    # Every message is answered but the last body message: the stream ends
    # instead (Envoy goes on unchanged).
    assert len(answers) == len(messages) - 1


def report_total(env: Env) -> tuple[int, int]:
    """(nano-dollars, requests) of every chargeback rollup of the last day."""
    now = int(time.time())
    with env.channel() as ch:
        resp = reports_pb2_grpc.ReportServiceStub(ch).QuerySpend(
            rp.QuerySpendRequest(
                start_time=Timestamp(seconds=now - 86400), end_time=Timestamp(seconds=now + 3600)
            ),
            metadata=ADMIN,
            timeout=10,
        )
    return sum(g.cost_nanos for g in resp.groups), sum(g.request_count for g in resp.groups)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_kill_9_while_the_control_plane_is_down_loses_nothing(env: Env, tmp_path: Path) -> None:
    policy = create_policy(env)
    cp = env.start_cp()
    port = free_port()
    log = tmp_path / "ext_proc.log"
    proc = start_ext_proc(env, port, log)
    try:
        wait_until(
            lambda: health(port, SYNC_HEALTH_SERVICE) == health_pb2.HealthCheckResponse.SERVING,
            timeout=20,
            message="ext_proc synced with the control plane",
        )
        env.loop.run(cp.stop(grace=0))
        for _ in range(REQUESTS):
            metered_request(port)
        # A flush failed, so the usage is in the journal (fsynced before the send).
        wait_until(
            lambda: (
                health(port, USAGE_HEALTH_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
            message="usage piling up",
        )
        time.sleep(0.3)  # a few more flush intervals
        kill9(proc)

        cp = env.start_cp()
        proc = start_ext_proc(env, port, log)
        cost = price(Usage(19, 0, output_tokens=10, reasoning_tokens=0))
        expected = (Decimal(cost * REQUESTS) / 10**9, REQUESTS)
        wait_until(lambda: spend(env, policy.id) == expected, timeout=20, message="spend")
        time.sleep(0.3)  # nothing more arrives: no double count
        assert spend(env, policy.id) == expected
        # The chargeback rollups were journaled with the usage: exactly once too.
        assert report_total(env) == (cost * REQUESTS, REQUESTS)
        proc.terminate()
        assert proc.wait(10) == 0
        assert (env.journal / "usage.v1.journal").stat().st_size == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        env.loop.run(cp.stop(grace=0))
