# ruff: noqa: E501  (the table reads best one limit a line)
"""Every bound spendgate puts on what enters it, in one table.

Pure. The constants here are the ones the checks use (or re-exports of the
modules that own them); ``LIMITS`` describes each for people, and the
table in docs/concepts/limits.md is generated from it (``python -m
spendgate.domain.limits``; tests/unit/test_limits_table.py compares the two).

Admin API values that break a bound are refused with INVALID_ARGUMENT and a
``google.rpc.BadRequest`` field violation naming the field and the bound;
request values on the data path with a 400 in the provider's error shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from spendgate.domain.members import MAX_MEMBER_BYTES, MAX_TAGS
from spendgate.domain.pricing import MAX_COST_NANOS, MAX_PRICE_PER_MTOK, NANOS_PER_USD
from spendgate.domain.windows import MAX_COUNT as MAX_WINDOW_COUNT

# ---- admin API ------------------------------------------------------------
MAX_NAME_CHARS = 200
MAX_APPLY_MARKER_CHARS = 200
MAX_DESCRIPTION_CHARS = 2000
MAX_TARGET_CHARS = 512
MAX_AMOUNT_USD = 1_000_000_000
MAX_TIMEZONE_CHARS = 64
MAX_THRESHOLDS = 20
MAX_THRESHOLD_PERCENT = 1000
MAX_FORECAST_WITHIN_S = 366 * 86400  # a policy's forecast_alert.within
MAX_ID_CHARS = 64
MAX_MEMBER_FILTER_CHARS = 512
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_CHARS = 512
MAX_NOTE_CHARS = 500
MAX_URL_CHARS = 2048
# Spend adjustments (control_plane/adjustments.py)
MAX_REASON_CHARS = 500
MAX_AMOUNT_TEXT_CHARS = 64
MAX_MEMBER_INPUT_CHARS = 512  # before canonicalisation (API keys are hashed)
MAX_REQUEST_ID_CHARS = 80
# What an error answer carries at most, so it always fits gRPC's trailers
# (8 KiB by default; the message is percent-encoded, the details base64).
MAX_ERROR_MESSAGE_CHARS = 512  # UTF-8 bytes, in fact
MAX_ERROR_DETAILS_BYTES = 3000  # field names and descriptions, UTF-8
MAX_VIOLATIONS = 10
MAX_FIELD_CHARS = 80
MAX_VIOLATION_CHARS = 200

# ---- data path ------------------------------------------------------------
MAX_MODEL_BYTES = 256
MAX_PATH_BYTES = 8192

# ---- output ---------------------------------------------------------------
MAX_LOG_VALUE_CHARS = 1024
MAX_LABEL_CHARS = 256

__all__ = ["MAX_COST_NANOS", "MAX_MEMBER_BYTES", "MAX_PRICE_PER_MTOK", "MAX_TAGS"]
__all__ += ["MAX_WINDOW_COUNT"]


@dataclass(frozen=True, slots=True)
class Limit:
    """One bound: what it applies to, the bound, where it is checked, and
    what a value beyond it gets."""

    value: str
    bound: str
    where: str
    answer: str


def _usd(n: int | Decimal) -> str:
    return f"${n:,}"


_COST_MAX = Decimal(MAX_COST_NANOS) / NANOS_PER_USD
_ADMIN = "INVALID_ARGUMENT, field violation"

LIMITS: tuple[Limit, ...] = (
    # Admin API
    Limit("policy `name`, webhook `name`", f"1 to {MAX_NAME_CHARS} characters, no control characters", "BudgetService, WebhookService", f"{_ADMIN} `name`"),
    Limit("policy `name`, webhook `name`: unique", "one object per name and kind", "BudgetService, WebhookService", "ALREADY_EXISTS naming `name` and the object that has it"),
    Limit("`apply_marker` (policy, webhook, price override)", f"at most {MAX_APPLY_MARKER_CHARS} characters, no control characters", "BudgetService, WebhookService, PricingService", f"{_ADMIN} `apply_marker`"),
    Limit("`description` (policy, webhook)", f"at most {MAX_DESCRIPTION_CHARS} characters; no control characters but tab and newline", "BudgetService, WebhookService", f"{_ADMIN} `description`"),
    Limit("policy `target`", f"at most {MAX_TARGET_CHARS} characters, no control characters; MODEL at most {MAX_MODEL_BYTES} bytes; USER, WORKSPACE, SERVICE, TAG values canonical members (at most {MAX_MEMBER_BYTES} bytes)", "BudgetService", f"{_ADMIN} `target`"),
    Limit("policy `amount_usd`", f"a decimal above 0, at most {_usd(MAX_AMOUNT_USD)}", "BudgetService", f"{_ADMIN} `amount_usd`"),
    Limit("policy `window.count`", f"1 to {MAX_WINDOW_COUNT:,}", "BudgetService", f"{_ADMIN} `window.count`"),
    Limit("policy `window.week_start`", "0 (the server's week_start) or 1 (Monday) to 7 (Sunday)", "BudgetService", f"{_ADMIN} `window.week_start`"),
    Limit("policy `timezone`", f"an IANA name, at most {MAX_TIMEZONE_CHARS} characters", "BudgetService", f"{_ADMIN} `timezone`"),
    Limit("policy `alert_thresholds`", f"at most {MAX_THRESHOLDS}, each 1 to {MAX_THRESHOLD_PERCENT} (percent), no repeats", "BudgetService", f"{_ADMIN} `alert_thresholds`"),
    Limit("policy `forecast_alert.within`", f"whole seconds, 0 (no such rule) to {MAX_FORECAST_WITHIN_S:,} ({MAX_FORECAST_WITHIN_S // 86400} days)", "BudgetService", f"{_ADMIN} `forecast_alert.within`"),
    Limit("ids in requests (policy, webhook, price override, event)", f"at most {MAX_ID_CHARS} characters, no control characters", "every admin service", f"{_ADMIN} naming the id field"),
    Limit("ListSpend `member`", f"at most {MAX_MEMBER_FILTER_CHARS} characters, no control characters", "BudgetService", f"{_ADMIN} `member`"),
    Limit("`page_size`", f"0 (the default) to {MAX_PAGE_SIZE:,}; more is served as {MAX_PAGE_SIZE:,}", "every List method", f"{_ADMIN} `page_size` (negative)"),
    Limit("`page_token`", f"a token the same list returned: signed (HMAC-SHA256, a key kept in the database), at most {MAX_PAGE_TOKEN_CHARS} characters", "every List method", f"{_ADMIN} `page_token`"),
    Limit("price override `model`", f"1 to {MAX_MODEL_BYTES} bytes, no control characters", "PricingService", f"{_ADMIN} `override.model`"),
    Limit("price override `note`", f"at most {MAX_NOTE_CHARS} characters", "PricingService", f"{_ADMIN} `override.note`"),
    Limit("prices (input, output, cached, ...)", f"0 to {_usd(MAX_PRICE_PER_MTOK)} per million tokens", "PricingService", f"{_ADMIN} `override.<price>`"),
    Limit("webhook `url`", f"at most {MAX_URL_CHARS} characters, http(s), no private addresses", "WebhookService", f"{_ADMIN} `url`"),
    Limit("webhook `routing_key` / `secret`", "1 to 200 of `A-Za-z0-9_-.:` / 24 to 64 bytes", "WebhookService", f"{_ADMIN} `routing_key` / `secret`"),
    Limit("spend adjustment `amount_usd`", f"a signed decimal, not 0, at most 9 decimals and {MAX_AMOUNT_TEXT_CHARS} characters, at most ${_COST_MAX:,} in absolute value; the window's spend stays between 0 and that", "BudgetService.CreateSpendAdjustment", f"{_ADMIN} `adjustment.amount_usd`"),
    Limit("spend adjustment `reason`", f"1 to {MAX_REASON_CHARS} characters of visible text on one line", "BudgetService.CreateSpendAdjustment", f"{_ADMIN} `adjustment.reason`"),
    Limit("spend adjustment `member`", f"at most {MAX_MEMBER_INPUT_CHARS} characters; canonical for the policy's scope", "BudgetService.CreateSpendAdjustment", f"{_ADMIN} `adjustment.member`"),
    Limit("spend adjustment `request_id`", f"1 to {MAX_REQUEST_ID_CHARS} of `A-Za-z0-9._:-`", "BudgetService.CreateSpendAdjustment", f"{_ADMIN} `request_id`"),
    Limit("error answers", f"message at most {MAX_ERROR_MESSAGE_CHARS} bytes; the first {MAX_VIOLATIONS} field violations at most (field at most {MAX_FIELD_CHARS}, description at most {MAX_VIOLATION_CHARS} characters; {MAX_ERROR_DETAILS_BYTES:,} bytes in all)", "control plane (api/errors.py)", "so an error always fits gRPC's 8 KiB of trailers"),
    # Data path
    Limit("model name (body `model`, or the path for Gemini and Bedrock)", f"at most {MAX_MODEL_BYTES} bytes (UTF-8)", "ext_proc", "400 in the provider's error shape, `x-spendgate-error: invalid_model`"),
    Limit("request path", f"at most {MAX_PATH_BYTES:,} bytes", "ext_proc", "400 in the provider's error shape, `x-spendgate-error: invalid_path`"),
    Limit("identity values (user, workspace, service, tag keys and values)", f"canonical members: at most {MAX_MEMBER_BYTES} bytes, no control or invisible characters", "ext_proc", "400, `x-spendgate-error: invalid_identity`"),
    Limit("tags per request", f"at most {MAX_TAGS}", "ext_proc", "400, `x-spendgate-error: invalid_identity`"),
    # Provider answers
    Limit("token counts", "non-negative integers; anything else counts as not reported", "ext_proc meters", "cost saturates (below) rather than overflow"),
    Limit("cost of one response", f"`max_cost_per_response_usd` (default $1,000); saturates at ${_COST_MAX:,}", "ext_proc", "charged, and a `usage.anomaly` event"),
    Limit("model name a provider reports", f"at most {MAX_MODEL_BYTES} bytes", "ext_proc", "the request's model is used instead"),
    # Output
    Limit("string values in log lines", f"control characters escaped (`\\x1b`), clipped at {MAX_LOG_VALUE_CHARS:,} characters with `…[+N chars]`", "every process (spendgate/logs.py)", "-"),
    Limit("metric label values", f"control characters escaped, at most {MAX_LABEL_CHARS} characters", "/metrics of both services", "-"),
    Limit("budgets file (`spendgate apply -f`)", "at most 4 MiB a file, checked against schemas/budgets.schema.json; a `${file:...}` secret at most 64 KiB", "`spendgate apply`", "exit status 1, the file and key named"),
    Limit("CLI output", "control characters in stored or client-supplied values escaped (`\\x1b`)", "`spendgate` commands", "-"),
)  # fmt: skip


def markdown() -> str:
    """The table of limits in docs/concepts/limits.md."""
    rows = ["| Value | Bound | Checked in | Beyond it |", "|---|---|---|---|"]
    rows += [f"| {x.value} | {x.bound} | {x.where} | {x.answer} |" for x in LIMITS]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
