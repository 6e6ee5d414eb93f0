"""The PromQL the chart's Grafana dashboard and PrometheusRule run, read from a rendered chart.

Both the chart test (syntax, promtool) and the running-service test (every metric exists) walk the
same queries, parsed by a real PromQL parser rather than matched by pattern.
"""

from __future__ import annotations

import json
import re
from typing import Any

import promql_parser

from tests.chart.charttest import Rendered

# The chart's defaults with the dashboard and the rules on (the rules need the ServiceMonitor's series).
MONITORING_ON: dict[str, Any] = {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}}
# What Grafana puts in place of the dashboard's variables before it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": "images"}
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*\w+\)$")
# Labels Prometheus adds to every series of a target the ServiceMonitor scrapes.
TARGET_LABELS = frozenset({"namespace", "job", "pod"})


def dashboard(rendered: Rendered) -> dict[str, Any]:
    configmap = rendered.one("ConfigMap", "-dashboard")
    loaded: dict[str, Any] = json.loads(configmap["data"]["loraserve.json"])
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def dashboard_queries(board: dict[str, Any], variables: bool = True) -> list[str]:
    """Every panel's query and (with `variables`) every query variable's selector, variables substituted."""
    queries = [t["expr"] for p in panels(board) for t in p["targets"]]
    for variable in board["templating"]["list"] if variables else []:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"variable {variable['name']}: not a label_values() query"
            queries.append(match["selector"])
    for name, value in GRAFANA_VARIABLES.items():
        queries = [q.replace(name, value) for q in queries]
    return queries


def alert_rules(rendered: Rendered) -> list[dict[str, Any]]:
    rule = rendered.one("PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def selectors(query: str) -> list[tuple[str, frozenset[str]]]:
    """(metric name, names of the labels it matches on) of each series selector in the query."""
    found: list[tuple[str, frozenset[str]]] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {query!r}"
            found.append((node.name, frozenset(m.name for m in node.matchers.matchers)))

    promql_parser.walk(promql_parser.parse(query), visit)
    assert found, f"no series selector in {query!r}"
    return found
