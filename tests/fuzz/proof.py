"""The one stack the fuzz tests share, and the proof run after every example:
one normal request of known price reaches the control plane and is charged
exactly, every process is alive, every health service is SERVING, and Envoy
saw no ext_proc stream fail or time out."""

from __future__ import annotations

import collections
import json
import urllib.request
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

import grpc
import openai
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.server import MAINTENANCE_HEALTH, SERVICE_NAMES, WEBHOOKS_HEALTH
from ext_proc.server import SYNC_HEALTH_SERVICE, USAGE_HEALTH_SERVICE
from spendgate.domain.pricing import NANOS_PER_USD, PriceBook, cost_nanos
from spendgate.domain.usage import Usage
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack, start_stack, stop_stack
from tests.fuzz import provider
from tests.harness import grpc_channel, wait_until

WEBHOOK_HOST = "hooks.example.invalid"
CANARY_MODEL = "gpt-4o-mini"
CANARY_USAGE = Usage(input_tokens=9, output_tokens=16)
# Envoy's ext_proc filter counters that mean "ext_proc broke a request".
EXT_PROC_FAILURES = ("streams_failed", "message_timeouts", "failure_mode_allowed")


def canary_price() -> Decimal:
    price = PriceBook.bundled().lookup(CANARY_MODEL)
    assert price is not None
    return Decimal(cost_nanos(CANARY_USAGE, price)) / NANOS_PER_USD


@dataclass
class FuzzStack:
    """A started stack plus the canary policy: ALERT, one budget per USER."""

    stack: Stack
    canary_policy: str
    cp_channel: grpc.Channel
    ext_channel: grpc.Channel
    sdk: openai.OpenAI
    proofs: int = 0
    failures_seen: dict[str, int] = field(default_factory=dict)
    # What the examples got (method or request kind -> answer): printed at
    # the end, so a run shows it reached past the first validation.
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def base_url(self) -> str:
        return self.stack.envoy.base_url

    def envoy_counters(self) -> dict[str, int]:
        url = f"http://127.0.0.1:{self.stack.envoy.admin_port}/stats?filter=ext_proc&format=json"
        with urllib.request.urlopen(url, timeout=10) as r:
            stats = json.load(r)["stats"]
        counters: dict[str, int] = {}
        for s in stats:
            name = str(s.get("name", ""))
            for failure in EXT_PROC_FAILURES:
                if name.endswith("." + failure):
                    counters[failure] = counters.get(failure, 0) + int(s.get("value", 0))
        return counters

    def prove(self) -> None:
        """Raise AssertionError unless spendgate is still whole."""
        self.proofs += 1
        assert self.stack.envoy.proc.poll() is None, "envoy exited"
        assert self.stack.loop.thread.is_alive(), "the services' event loop died"
        member = f"canary-{uuid.uuid4().hex}"
        answer = self.sdk.chat.completions.with_raw_response.create(
            model=CANARY_MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={
                "x-spendgate-user": member,
                "x-fake-prompt-tokens": str(CANARY_USAGE.input_tokens),
                "x-fake-completion-tokens": str(CANARY_USAGE.output_tokens),
            },
        )
        assert answer.http_response.status_code == 200
        price = canary_price()
        wait_until(
            lambda: self.spent(member) is not None,
            timeout=30,
            message=f"the canary request's usage ({member}) reaches the control plane",
        )
        assert self.spent(member) == price, (
            f"canary charged {self.spent(member)}, its price is {price}"
        )
        self.assert_serving()
        counters = self.envoy_counters()
        assert counters == self.failures_seen, (
            f"Envoy counted ext_proc failures: {counters}, before {self.failures_seen}"
        )

    def spent(self, member: str) -> Decimal | None:
        resp = self.stack.budgets.ListSpend(
            pb.ListSpendRequest(policy_id=self.canary_policy, member=member),
            metadata=self.stack.admin,
            timeout=30,
        )
        entry = next((e for e in resp.entries if e.member == member), None)
        return None if entry is None else Decimal(entry.spent_usd)

    def not_serving(self) -> list[str]:
        bad = []
        cp_services = ("", *SERVICE_NAMES, WEBHOOKS_HEALTH, MAINTENANCE_HEALTH)
        checks = [(self.cp_channel, "control plane", n) for n in cp_services] + [
            (self.ext_channel, "ext_proc", n)
            for n in ("", SYNC_HEALTH_SERVICE, USAGE_HEALTH_SERVICE)
        ]
        for channel, who, name in checks:
            try:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                    .status
                )
            except grpc.RpcError as e:
                bad.append(f"{who} {name or '(server)'}: {e.code().name}")
                continue
            if status != health_pb2.HealthCheckResponse.SERVING:
                bad.append(f"{who} {name or '(server)'}: {status}")
        return bad

    def assert_serving(self) -> None:
        # Health is set by tasks of its own: give a change a moment to land.
        try:
            wait_until(lambda: not self.not_serving(), timeout=15, message="health SERVING")
        except AssertionError:
            raise AssertionError(f"not SERVING: {self.not_serving()}") from None


def start() -> FuzzStack:
    # Webhooks the examples create pass the SSRF check by name; the name
    # resolves nowhere, so no delivery leaves the machine.
    stack = start_stack(control_plane={"webhook_allow_hosts": WEBHOOK_HOST})
    provider.script(stack.provider)
    policy = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name="fuzz canary",
                amount_usd="1000",
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                action=pb.ACTION_ALERT,
                scope=pb.SCOPE_USER,
                target="*",
            )
        ),
        metadata=stack.admin,
    )
    wait_until(lambda: policy.id in stack.ext.state.index.policies, message="canary policy")
    fuzz = FuzzStack(
        stack,
        policy.id,
        grpc_channel(stack.cp.port),
        grpc_channel(stack.ext.port),
        openai.OpenAI(base_url=stack.envoy.base_url + "/v1", api_key="sk-fuzz", max_retries=0),
    )
    fuzz.failures_seen = fuzz.envoy_counters()
    fuzz.prove()
    return fuzz


def stop(fuzz: FuzzStack) -> None:
    print(f"\nfuzz: {fuzz.proofs} proofs; outcomes:")
    for outcome, n in sorted(fuzz.outcomes.items()):
        print(f"  {n:6d}  {outcome}")
    fuzz.sdk.close()
    fuzz.cp_channel.close()
    fuzz.ext_channel.close()
    stop_stack(fuzz.stack)
