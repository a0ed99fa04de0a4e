"""One stack with metrics on (ephemeral ports) and a webhook receiver, shared
by the metrics tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from spendgate.v1 import webhooks_pb2 as wpb
from spendgate.v1 import webhooks_pb2_grpc
from tests.conftest import Stack, start_stack, stop_stack
from tests.harness import grpc_channel
from tests.metrics.scrape import Scrape, scrape
from tests.webhooks.receiver import Receiver

METRICS = {"metrics_listen": "127.0.0.1:0"}
# The receiver is plain http on 127.0.0.1: allow it.
LOCAL_WEBHOOKS = {
    "webhook_allow_http": True,
    "webhook_allow_private_ranges": "127.0.0.0/8",
    "webhook_poll_interval_s": 0.05,
}


@dataclass
class MetricsStack:
    stack: Stack
    receiver: Receiver

    def ext_proc(self) -> Scrape:
        return scrape(self.stack.ext.metrics_port)

    def control_plane(self) -> Scrape:
        return scrape(self.stack.cp.metrics_port)


@pytest.fixture(scope="package")
def metrics_stack() -> Iterator[MetricsStack]:
    receiver = Receiver().start()
    stack = start_stack(control_plane={**METRICS, **LOCAL_WEBHOOKS}, ext_proc=METRICS)
    webhooks = webhooks_pb2_grpc.WebhookServiceStub(grpc_channel(stack.cp.port))
    webhooks.CreateWebhook(
        wpb.CreateWebhookRequest(
            webhook=wpb.Webhook(name="ops", format=wpb.WEBHOOK_FORMAT_GENERIC, url=receiver.url)
        ),
        metadata=stack.admin,
        timeout=10,
    )
    yield MetricsStack(stack, receiver)
    stop_stack(stack)
    receiver.stop()
