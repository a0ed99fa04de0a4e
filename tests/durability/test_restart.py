"""Usage survives an ext_proc restart while the control plane was unreachable."""

from __future__ import annotations

import functools
from decimal import Decimal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_proc.server import USAGE_HEALTH_SERVICE, ExtProcServer
from ext_proc.sync.journal import FILE_NAME, scan
from spendgate.domain.policies import Policy
from spendgate.v1 import dataplane_pb2_grpc
from tests.durability.conftest import DATA, Env, create_policy, spend
from tests.harness import wait_until

COSTS = (1_250_000_000, 2_000_000_000, 750_000_000)  # $4 in three responses


def usage_health(ext: ExtProcServer) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{ext.port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=USAGE_HEALTH_SERVICE), timeout=5
        )
    return int(resp.status)


def charge_while_unreachable(env: Env, policy: Policy) -> None:
    """Charge usage with no control plane, let it be journaled, stop ext_proc."""
    ext = env.start_ext()
    for cost in COSTS:
        env.loop.call(
            functools.partial(ext.state.charge, [(policy, "")], cost, env.clock(), estimated=False)
        )
    wait_until(lambda: not ext.state.pending and ext.sync.backlog, message="a failed flush")
    assert usage_health(ext) == health_pb2.HealthCheckResponse.NOT_SERVING
    env.loop.run(ext.stop(grace=0))
    assert (env.journal / FILE_NAME).stat().st_size > 0


def deliver_after_restart(env: Env, policy: Policy) -> None:
    ext = env.start_ext()
    assert ext.state.in_flight  # replayed from the journal before the first flush
    wait_until(lambda: not ext.state.in_flight, message="the replayed batches acknowledged")
    wait_until(lambda: ext.sync.backlog is False, message="backlog cleared")
    assert usage_health(ext) == health_pb2.HealthCheckResponse.SERVING
    env.loop.run(ext.stop(grace=0))
    assert (env.journal / FILE_NAME).stat().st_size == 0  # clean shutdown: empty journal
    assert spend(env, policy.id) == (Decimal(sum(COSTS)) / 10**9, len(COSTS))


def test_usage_charged_while_unreachable_is_delivered_after_restart(env: Env) -> None:
    policy = create_policy(env)
    charge_while_unreachable(env, policy)
    cp = env.start_cp()
    try:
        assert spend(env, policy.id) == (Decimal(0), 0)
        deliver_after_restart(env, policy)
    finally:
        env.loop.run(cp.stop(grace=0))


def test_a_batch_applied_before_its_ack_was_lost_is_not_counted_twice(env: Env) -> None:
    policy = create_policy(env)
    charge_while_unreachable(env, policy)
    cp = env.start_cp()
    try:
        # The control plane applied the journaled batches, but ext_proc never
        # heard back: on restart it sends them again with the same ids.
        batches = scan((env.journal / FILE_NAME).read_bytes()).batches
        assert batches
        with env.channel() as ch:
            stub = dataplane_pb2_grpc.DataPlaneServiceStub(ch)
            for msg in batches:
                msg.data_plane_id = "durable-dp"
                stub.ReportUsage(msg, metadata=DATA, timeout=10)
        assert spend(env, policy.id) == (Decimal(sum(COSTS)) / 10**9, len(COSTS))
        deliver_after_restart(env, policy)
    finally:
        env.loop.run(cp.stop(grace=0))
