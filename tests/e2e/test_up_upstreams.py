"""`spendgate up --upstream` and `--config`, run as an operator runs them: a
provider route sent to a local server from the command line, and a settings
file that lets a loopback webhook be registered for trying alerts locally."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import openai
import pytest
import yaml

from spendgate.demo.fake_provider import FakeProviderServer
from tests.harness import (
    SPENDGATE_CLI,
    UP_PORT_OPTIONS,
    env_without_spendgate,
    free_port,
    spendgate_cli,
    start_spendgate_up,
    wait_until,
)

pytestmark = pytest.mark.e2e


@dataclass
class Up:
    cwd: Path
    port: int
    server: str
    provider: FakeProviderServer
    output: list[str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return spendgate_cli(self.cwd, self.server, *args)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    cwd = tmp_path_factory.mktemp("upstreams")
    provider = FakeProviderServer()
    provider.start_in_thread()
    (cwd / "spendgate.yaml").write_text(
        yaml.safe_dump(
            {
                "control_plane": {
                    "webhook_allow_http": True,
                    "webhook_allow_private_ranges": "127.0.0.1/32",
                }
            }
        )
    )
    ports = {name: free_port() for name in UP_PORT_OPTIONS}
    args = [*(f"--{k}={v}" for k, v in ports.items()), "--config", "spendgate.yaml"]
    args += ["--upstream", f"openai=http://127.0.0.1:{provider.port}"]
    args += ["--upstream", "azure-openai=myres"]
    try:
        proc, output = start_spendgate_up(args, cwd)
    except BaseException:
        provider.shutdown()
        raise
    try:
        yield Up(cwd, ports["port"], f"127.0.0.1:{ports['control-plane-port']}", provider, output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        provider.shutdown()


def test_openai_route_reaches_the_upstream_given_on_the_command_line(up: Up) -> None:
    created = up.cli(
        "policy",
        "create",
        "--name",
        "all",
        "--amount",
        "100",
        "--window",
        "1d",
        "--action",
        "alert",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    policy_id = json.loads(created.stdout)["id"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.port}/v1", api_key="sk-local")
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    last = up.provider.log.requests[-1]
    assert last["path"] == "/v1/chat/completions"
    # Host names the origin the operator gave, not api.openai.com.
    headers = {k.lower(): v for k, v in last["headers"].items()}
    assert headers["host"] == f"127.0.0.1:{up.provider.port}"
    assert f"openai=http://127.0.0.1:{up.provider.port}" in "".join(up.output)

    # Metered like any provider: the request's cost reaches the control plane.
    def spent() -> bool:
        spend = json.loads(up.cli("spend", "--json").stdout)
        entry = next(e for e in spend if e["policy_id"] == policy_id)
        return bool(Decimal(entry["spent_usd"]) > 0)

    wait_until(spent, message="usage reaches the control plane")


def test_the_written_bootstrap_sends_azure_to_the_named_resource(up: Up) -> None:
    config = yaml.safe_load((up.cwd / ".spendgate" / "envoy.yaml").read_text())
    [azure] = [c for c in config["static_resources"]["clusters"] if c["name"] == "azure_openai"]
    ep = azure["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert ep["address"]["socket_address"] == {
        "address": "myres.openai.azure.com",
        "port_value": 443,
    }
    assert azure["transport_socket"]["typed_config"]["sni"] == "myres.openai.azure.com"
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    azure_routes = [
        r["route"]
        for r in routes["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        if r.get("route", {}).get("cluster") == "azure_openai"
    ]
    assert azure_routes and all(
        r["host_rewrite_literal"] == "myres.openai.azure.com" and "auto_host_rewrite" not in r
        for r in azure_routes
    )


def test_config_file_reaches_the_control_plane(up: Up) -> None:
    # Refused without webhook_allow_http / webhook_allow_private_ranges.
    created = up.cli(
        "webhook",
        "create",
        "--name",
        "local",
        "--url",
        f"http://127.0.0.1:{free_port()}/hook",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["name"] == "local"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--upstream", "opneai=http://127.0.0.1:1"], "unknown provider 'opneai' (one of: "),
        (["--upstream", "openai"], "expected NAME=URL"),
        (["--upstream", "openai=ftp://x"], "scheme must be http or https"),
        (["--upstream", "openai=http://h/v1"], "give the origin only"),
        (["--upstream", "openai=http://u:s3cret@h"], "no credentials in the URL"),
        (["--upstream", "bedrock=mars-1"], "or an AWS region like us-west-2"),
        (["--upstream", "openai=http://a:1", "--upstream", "openai=http://b:2"], "already"),
        (["--config", "missing.yaml"], "--config missing.yaml: "),
        (
            ["--upstream-ca", "corp-ca.pem"],
            "spendgate: upstream_ca_file (--upstream-ca): /",  # the path it tried, absolute
        ),
        (["--upstream-ca", "."], "is not a file"),
    ],
)
def test_bad_values_stop_up_before_anything_starts(
    tmp_path: Path, args: list[str], message: str
) -> None:
    ports = {name: free_port() for name in UP_PORT_OPTIONS}
    done = subprocess.run(
        [*SPENDGATE_CLI, "up", *(f"--{k}={v}" for k, v in ports.items()), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env_without_spendgate(),
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "s3cret" not in done.stderr
    assert not (tmp_path / ".spendgate").exists()  # nothing was started or written
