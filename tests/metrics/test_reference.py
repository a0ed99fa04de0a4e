"""The Grafana dashboard and the metrics reference (docs/operations/metrics.md) name exactly what
the running services export (read from real scrapes, not from a list)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.metrics.conftest import MetricsStack
from tests.metrics.scrape import Family, Scrape

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parent.parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "spendgate.json"
# A metric name in PromQL: an identifier not followed by "(" (a function) and
# not inside {...} or [...] (labels, ranges); keywords and label names of
# by/on/without/group_left lists are removed before this is applied.
_NAME = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_LABEL_LISTS = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "le"}


@pytest.fixture(scope="module")
def exported(metrics_stack: MetricsStack) -> Scrape:
    """Both services' families, each from a real scrape."""
    ext, cp = metrics_stack.ext_proc(), metrics_stack.control_plane()
    ext_names = {n for n in ext.families if n.startswith("spendgate_")}
    cp_names = {n for n in cp.families if n.startswith("spendgate_")}
    # Only the supervised tasks' failures are counted by both, by task name.
    assert ext_names and cp_names and ext_names & cp_names == {"spendgate_task_failures"}
    return Scrape({**ext.families, **cp.families})


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers, ranges, strings,
    label lists and Grafana variables removed first)."""
    text = re.sub(r"label_values\(([^,)]+)(,[^)]*)?\)", r"\1", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _LABEL_LISTS.sub("", text)
    text = re.sub(r"\$\w+", "", text)
    return {n for n in _NAME.findall(text) if n.lower() not in _KEYWORDS}


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, phase) (rate(a_b_bucket{phase=~"x|y"}'
        "[$__rate_interval]))) / on(policy_id) group_left(name) max by (policy_id, name) "
        "(c_info) * 3600 > bool 2 and d_total offset 5m"
    )
    assert metric_names(expr) == {"a_b_bucket", "c_info", "d_total"}
    assert metric_names("label_values(spendgate_policy_info, policy_id)") == {
        "spendgate_policy_info"
    }


def _exprs(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: panel targets and variable queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            # Panel targets have "expr"; query variables a "query" calling a function.
            if isinstance(value, str) and (key == "expr" or (key == "query" and "(" in value)):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_every_dashboard_query_uses_metrics_the_services_export(exported: Scrape) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(_exprs(dashboard))
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            family = exported.family_of(name)
            assert family is not None, f"{name} (in {expr!r}) is not exported"
            used.add(family.name)
    # The panels the issue asks for are there.
    for needed in (
        "spendgate_policy_spend_usd",
        "spendgate_policy_limit_usd",
        "spendgate_policy_remaining_ratio",
        "spendgate_ext_proc_requests_rejected",
        "spendgate_ext_proc_cost_usd",
        "spendgate_ext_proc_tokens",
        "spendgate_webhook_deliveries",
        "spendgate_webhook_attempt_duration_seconds",
        "spendgate_ext_proc_sync_lag_seconds",
        "spendgate_ext_proc_unsent_usage_records",
        "spendgate_ext_proc_decision_duration_seconds",
    ):
        assert needed in used


def test_dashboard_reads_prometheus_through_its_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert (variable["name"], variable["query"]) == ("DS_PROMETHEUS", "prometheus")

    def datasources(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            if "datasource" in node:
                yield node["datasource"]
            for value in node.values():
                yield from datasources(value)
        elif isinstance(node, list):
            for item in node:
                yield from datasources(item)

    found = list(datasources(dashboard["panels"]))
    assert found and all(d == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for d in found)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) from the table in docs/operations/metrics.md."""
    text = (ROOT / "docs" / "operations" / "metrics.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `(\w+)` \| (\w+) \| ([^|]*) \|", line)
        if m:
            labels = set(re.findall(r"`(\w+)`", m.group(3)))
            rows[m.group(1)] = (m.group(2), labels)
    return rows


def test_the_docs_list_exactly_the_exported_metrics(exported: Scrape) -> None:
    documented = documented_metrics()
    ours: dict[str, Family] = {
        f.display_name: f for f in exported.families.values() if f.name.startswith("spendgate_")
    }
    assert set(documented) == set(ours)
    for name, (kind, labels) in documented.items():
        family = ours[name]
        assert kind == family.type, name
        if family.samples:  # a labelled family shows its labels once it has samples
            assert labels == family.label_names(), name
    # Everything else is the standard process collector's, as docs/operations/metrics.md says.
    others = {f.name for f in exported.families.values() if not f.name.startswith("spendgate_")}
    assert others and all(n.startswith("process_") for n in others)
