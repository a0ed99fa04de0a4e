"""`spendgate up` with TLS upstreams, run as an operator runs it: the
providers' certificates come from a CA made at run time and trusted with
`--upstream-ca`; a certificate for another host is refused; `tls: insecure`
accepts it, with a warning. (A bundle that does not exist stops `up` before
anything starts: tests/e2e/test_up_upstreams.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest
import yaml

from tests.e2e.tls_fake import TlsFakeProvider, fakes_of
from tests.harness import (
    UP_PORT_OPTIONS,
    free_port,
    start_spendgate_up,
)

pytestmark = pytest.mark.e2e
KEY = "sk-secret-never-leaves-envoy"
MESSAGES: list[dict[str, str]] = [{"role": "user", "content": "hi"}]


@dataclass
class Up:
    cwd: Path
    port: int
    good: TlsFakeProvider  # certificate for localhost
    wrong_host: TlsFakeProvider  # certificate for elsewhere.spendgate.test
    output: list[str]
    ca: Path


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    cwd = tmp_path_factory.mktemp("up-tls")
    with fakes_of(cwd) as fakes:
        ca, good, wrong_host = fakes.ca, fakes.good, fakes.wrong_host
        (cwd / "spendgate.yaml").write_text(
            yaml.safe_dump(
                {
                    "providers": {
                        "openai": {"url": f"https://localhost:{good.port}"},
                        "anthropic": {},
                        "compatible": [
                            {
                                "name": "selfsigned",
                                "url": f"https://localhost:{wrong_host.port}",
                                "tls": "insecure",
                                "prefix": "/selfsigned",
                            }
                        ],
                    }
                }
            )
        )
        ports = {name: free_port() for name in UP_PORT_OPTIONS}
        args = [*(f"--{k}={v}" for k, v in ports.items()), "--config", "spendgate.yaml"]
        args += ["--upstream-ca", str(ca)]
        args += ["--upstream", f"anthropic=https://localhost:{wrong_host.port}"]
        proc, output = start_spendgate_up(args, cwd)
        try:
            yield Up(cwd, ports["port"], good, wrong_host, output, ca)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_the_configured_ca_verifies_the_provider(up: Up) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.port}/v1", api_key=KEY)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    assert up.good.log.requests[-1]["path"] == "/v1/chat/completions"
    config = yaml.safe_load((up.cwd / ".spendgate" / "envoy.yaml").read_text())
    (openai_cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "openai"]
    context = openai_cluster["transport_socket"]["typed_config"]["common_tls_context"]
    trusted = context["validation_context"]["trusted_ca"]["filename"]
    assert Path(trusted).resolve() == up.ca.resolve()


def test_a_certificate_for_another_host_is_refused(up: Up) -> None:
    before = up.wrong_host.counts()
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{up.port}", api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as raised:
        client.messages.create(model="claude-3-5-haiku-latest", max_tokens=16, messages=MESSAGES)  # type: ignore[arg-type]
    assert raised.value.status_code == 503
    assert raised.value.response.headers["x-spendgate-error"] == "provider_unreachable"
    up.wrong_host.assert_refused_since(before)
    assert not any(r["path"] == "/v1/messages" for r in up.wrong_host.log.requests)


def test_tls_insecure_accepts_any_certificate_and_says_so(up: Up) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.port}/selfsigned/v1", api_key=KEY)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.usage is not None
    assert up.wrong_host.log.requests[-1]["path"] == "/v1/chat/completions"
    warning = (
        f"warning: compatible-selfsigned (https://localhost:{up.wrong_host.port}) has "
        "tls: insecure: Envoy accepts any certificate there"
    )
    assert any(line.startswith(warning) for line in up.output), up.output
