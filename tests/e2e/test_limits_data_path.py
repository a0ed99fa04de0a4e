"""Request values beyond their bound get a 400 in the provider's error shape,
through the real Envoy with the official SDKs, on SQLite and PostgreSQL
(issue 13, item 1).

Before: 20 requests with distinct 5 MB model names grew ext_proc by 184 MB
for good and wrote 105 MB of log (each name logged in full), and each name
became a member of MODEL ``*`` policies. Now each is refused before the
provider is called, the log stays small, nothing of them is kept, and usage
keeps flowing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
import structlog
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from spendgate import logs
from spendgate.domain.limits import MAX_MODEL_BYTES, MAX_PATH_BYTES
from spendgate.domain.pricing import NANOS_PER_USD, PriceBook, cost_nanos
from spendgate.v1 import budget_pb2 as pb
from tests.conftest import Stack, start_stack, stop_stack
from tests.harness import tempdir, wait_until

pytestmark = pytest.mark.e2e
PRICES = PriceBook.bundled()
MB = 1024 * 1024


@pytest.fixture
def log_file() -> Iterator[Path]:
    """Every service's log, as in production (JSON lines), into a file."""
    path = tempdir() / "services.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    with path.open("w") as f:
        logs.configure(json=True, level="info", stream=f)
        structlog.configure(cache_logger_on_first_use=False)
        try:
            yield path
        finally:
            structlog.reset_defaults()
            root.handlers[:], level = saved
            root.setLevel(level)


@pytest.fixture
def stack(db_url: str, log_file: Path) -> Iterator[Stack]:
    s = start_stack(db_url)
    yield s
    stop_stack(s)


def _models_policy(stack: Stack) -> pb.BudgetPolicy:
    p = stack.budgets.CreateBudgetPolicy(
        pb.CreateBudgetPolicyRequest(
            policy=pb.BudgetPolicy(
                name="each model",
                amount_usd="10",
                window=pb.BudgetWindow(unit=pb.WINDOW_UNIT_DAYS, count=1),
                action=pb.ACTION_ALERT,
                scope=pb.SCOPE_MODEL,
                target="*",
            )
        ),
        metadata=stack.admin,
    )
    wait_until(lambda: p.id in stack.ext.state.index.policies, message="policy reaches ext_proc")
    return p


def _spent(stack: Stack, policy_id: str) -> dict[str, Decimal]:
    resp = stack.budgets.ListSpend(pb.ListSpendRequest(policy_id=policy_id), metadata=stack.admin)
    return {e.member: Decimal(e.spent_usd) for e in resp.entries}


def test_twenty_five_megabyte_model_names_are_refused_and_leave_nothing_behind(
    stack: Stack, log_file: Path
) -> None:
    models = _models_policy(stack)
    client = openai.OpenAI(base_url=stack.envoy.base_url + "/v1", api_key="sk-test", max_retries=0)
    for i in range(20):
        huge = f"{i:02d}" + "m" * (5 * MB)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=huge, messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 400
        assert e.value.code == "invalid_model"
        assert e.value.response.headers["x-spendgate-error"] == "invalid_model"
        assert e.value.message == (
            f"Error code: 400 - The model name is {len(huge)} bytes long; spendgate "
            f"accepts at most {MAX_MODEL_BYTES} bytes (UTF-8)."
        )
    # The bound itself is fine (the provider answers; the name is unpriced).
    at_bound = "m" * MAX_MODEL_BYTES
    client.chat.completions.create(model=at_bound, messages=[{"role": "user", "content": "hi"}])
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert [b.model for b in stack.provider.log.billed] == [at_bound, "gpt-4o"]

    normal = stack.provider.log.billed[-1]
    price = PRICES.lookup("gpt-4o")
    assert price is not None
    exact = Decimal(cost_nanos(normal.usage, price)) / NANOS_PER_USD
    wait_until(
        lambda: _spent(stack, models.id).get("gpt-4o") == exact,
        message="usage after the refusals is delivered, exact",
    )
    # Nothing of the refused names is kept: members, warnings, metrics, quarantine.
    assert set(_spent(stack, models.id)) == {at_bound, "gpt-4o"}
    ctx = stack.ext.ctx
    assert all(len(m) <= MAX_MODEL_BYTES for m in ctx.warned_models)
    assert all(len(k[2]) <= MAX_MODEL_BYTES for k in ctx.stats.metered)
    assert ctx.stats.rejections[("", "invalid_model")] == 20
    assert stack.ext.state.quarantine.counts.get("too_large", 0) == 0
    # The log says so in a few kilobytes, not 100 MB.
    text = log_file.read_text()
    assert text.count('"reason": "invalid_model"') == 20
    assert len(text) < MB
    assert max(len(line) for line in text.splitlines()) < 4096


def test_a_long_model_name_in_a_gemini_path_gets_googles_error_shape(stack: Stack) -> None:
    options = genai_types.HttpOptions(base_url=stack.envoy.base_url, api_version="v1beta")
    client = genai.Client(api_key="gm-test", http_options=options)
    with pytest.raises(genai_errors.ClientError) as e:
        client.models.generate_content(model="g" * 300, contents="hi")
    assert e.value.code == 400
    assert e.value.status == "INVALID_ARGUMENT"
    assert e.value.message == (
        f"The model name is 300 bytes long; spendgate accepts at most {MAX_MODEL_BYTES} "
        "bytes (UTF-8)."
    )
    assert stack.provider.log.requests == []


def test_a_path_over_the_bound_is_refused(stack: Stack) -> None:
    path = "/v1/chat/completions?pad=" + "p" * MAX_PATH_BYTES
    r = httpx.post(
        stack.envoy.base_url + path,
        headers={"authorization": "Bearer sk-test"},
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 400
    assert r.headers["x-spendgate-error"] == "invalid_path"
    assert r.json()["error"]["message"] == (
        f"The request path is longer than {MAX_PATH_BYTES} bytes."
    )
    assert stack.provider.log.requests == []
