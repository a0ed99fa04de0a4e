"""`spendgate report`: chargeback reports (ReportService.QuerySpend) as a
table, CSV or JSON.

    spendgate report --by user,model --since 2026-11-01 [--until 2026-12-01]
                     [--tag team] [--filter provider=openai] [--format csv]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from spendgate.cli.client import AdminClient, CliError
from spendgate.cli.output import echo, table
from spendgate.domain.pricing import format_usd
from spendgate.v1 import reports_pb2 as rp

DIMENSIONS = ("route", "provider", "model", "user", "workspace", "api_key", "hour")
FORMATS = ("table", "csv", "json")
PAGE_SIZE = 1000
# Spreadsheets run a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def add_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    admin_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "report",
        help="chargeback report: cost, tokens and requests grouped by any dimension",
        description="Cost, tokens and requests of every metered response (budgets or not), "
        "summed from hourly rollups and grouped by the dimensions asked for.",
    )
    p.add_argument(
        "--by",
        default="",
        help="comma-separated dimensions to group by: " + ", ".join(DIMENSIONS),
    )
    p.add_argument(
        "--since",
        required=True,
        help="first day or time, UTC unless it has an offset (2026-11-01, 2026-11-01T08:00)",
    )
    p.add_argument("--until", help="end (exclusive), same forms as --since (default: now)")
    p.add_argument("--tag", help="also group by this tag key (requests without it: an empty value)")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="DIMENSION=VALUE",
        help="only this value of a dimension (or tag:KEY=VALUE); repeatable",
    )
    p.add_argument("--format", choices=FORMATS, default="table", help="output (default table)")
    admin_flags(p)


def parse_time(flag: str, text: str) -> Timestamp:
    """``2026-11-01`` (UTC midnight) or an ISO 8601 date and time."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(
            f"{flag}: {text[:40]!r} is not a date (2026-11-01) or ISO time (2026-11-01T08:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ts = Timestamp()
    try:
        ts.FromDatetime(when.astimezone(UTC))
    except (ValueError, OverflowError):
        raise CliError(f"{flag}: {text[:40]!r} is out of range") from None
    return ts


def build_request(args: argparse.Namespace) -> rp.QuerySpendRequest:
    by = [d.strip() for d in args.by.split(",") if d.strip()]
    filters = []
    for f in args.filter:
        dimension, sep, value = f.partition("=")
        if not sep or not dimension.strip():
            raise CliError(f"--filter: {f[:60]!r} is not DIMENSION=VALUE")
        filters.append(rp.DimensionFilter(dimension=dimension.strip(), value=value))
    req = rp.QuerySpendRequest(
        group_by=by,
        tag_key=args.tag or "",
        start_time=parse_time("--since", args.since),
        filters=filters,
        page_size=PAGE_SIZE,
    )
    if args.until:
        req.end_time.CopyFrom(parse_time("--until", args.until))
    return req


def fetch(client: AdminClient, req: rp.QuerySpendRequest) -> rp.QuerySpendResponse:
    """Every page of the report, in one response."""
    whole = rp.QuerySpendResponse()
    while True:
        resp: rp.QuerySpendResponse = client.call("QuerySpend", req)
        if not whole.columns:
            whole.columns.extend(resp.columns)
        whole.groups.extend(resp.groups)
        if not resp.next_page_token:
            return whole
        req.page_token = resp.next_page_token


def run_report(args: argparse.Namespace, client: AdminClient) -> None:
    report = fetch(client, build_request(args))
    fmt = "json" if args.json else args.format
    echo(render(report, fmt))


def _total(groups: Sequence[rp.SpendGroup]) -> rp.SpendGroup:
    nanos = sum(g.cost_nanos for g in groups)
    return rp.SpendGroup(
        cost_nanos=nanos,
        cost_usd=format_usd(nanos).removeprefix("$"),
        input_tokens=sum(g.input_tokens for g in groups),
        output_tokens=sum(g.output_tokens for g in groups),
        request_count=sum(g.request_count for g in groups),
        estimated_count=sum(g.estimated_count for g in groups),
    )


def render(report: rp.QuerySpendResponse, fmt: str) -> str:
    columns = list(report.columns)
    metrics = ["cost_usd", "requests", "input_tokens", "output_tokens", "estimated"]

    def numbers(g: rp.SpendGroup) -> list[str]:
        return [
            g.cost_usd,
            str(g.request_count),
            str(g.input_tokens),
            str(g.output_tokens),
            str(g.estimated_count),
        ]

    if fmt == "json":
        rows: list[dict[str, Any]] = [
            {
                **dict(zip(columns, g.values, strict=True)),
                "cost_usd": g.cost_usd,
                "cost_nanos": g.cost_nanos,
                "requests": g.request_count,
                "input_tokens": g.input_tokens,
                "output_tokens": g.output_tokens,
                "estimated": g.estimated_count,
            }
            for g in report.groups
        ]
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*columns, *metrics])
        for g in report.groups:
            writer.writerow([*(_cell(v) for v in g.values), *numbers(g)])
        return out.getvalue().rstrip("\n")
    if not report.groups:
        return "(no usage in this period)"
    rows_text = [
        [
            *(_shown(c, v) for c, v in zip(columns, g.values, strict=True)),
            format_usd(g.cost_nanos),
            *numbers(g)[1:],
        ]
        for g in report.groups
    ]
    total = _total(report.groups)
    if columns:
        rows_text.append(
            ["TOTAL", *[""] * (len(columns) - 1), format_usd(total.cost_nanos), *numbers(total)[1:]]
        )
    return table(
        [*columns, "cost", "requests", "input tokens", "output tokens", "estimated"], rows_text
    )


def _shown(column: str, value: str) -> str:
    """A table cell: an empty value is a dash, or "(none)" for a tag."""
    return value or ("(none)" if column.startswith("tag:") else "-")


def _cell(value: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula (a leading ')."""
    return "'" + value if value.startswith(_FORMULA_START) else value
