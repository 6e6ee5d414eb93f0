"""The chart's Grafana dashboard and Prometheus alert rules, rendered by a real Helm.

The rules pass `promtool check rules` and `promtool test rules` (tests/chart/alerts/rules-test.yaml:
each alert fires on a broken service's series and not on a healthy one's). That every metric
they query exists is checked against a running service in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.chart.charttest import CHART, CI_VALUES, KUBERNETES_VERSION, Rendered, render, render_error
from tests.chart.monitoring import MONITORING_ON, alert_rules, dashboard, dashboard_queries, panels, selectors
from tests.conftest import require_tool

CPU_DEV, EXTERNAL_TLS, GPU_PROD = CI_VALUES
RULES_TEST = Path(__file__).parent / "alerts" / "rules-test.yaml"
ALERTS = ["LoraserveQueueStuck", "LoraserveNoServingWorkers", "LoraserveHighFailureRatio", "LoraserveWebhooksGivenUp"]


@pytest.fixture(scope="module")
def monitored() -> Rendered:
    return render(values=MONITORING_ON)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([require_tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_both_are_off_by_default_and_on_where_a_value_set_asks() -> None:
    kinds = {name: render(*files).kinds() for name, files in {"defaults": [], "tls": [EXTERNAL_TLS]}.items()}
    assert "PrometheusRule" not in kinds["defaults"] and "ConfigMap" not in kinds["defaults"]
    assert {"PrometheusRule", "ConfigMap", "ServiceMonitor"} <= set(kinds["tls"])


def test_the_dashboard_is_a_configmap_the_grafana_sidecar_loads(monitored: Rendered) -> None:
    configmap = monitored.one("ConfigMap", "-dashboard")
    kubernetes_validate.validate(configmap, KUBERNETES_VERSION, strict=True)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "namespace" not in configmap["metadata"]
    board = dashboard(monitored)
    assert board == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    assert board["uid"] == "loraserve"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        assert panel["targets"] and panel["description"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    # The panels the operators asked for, each on the metrics it is named after.
    titles = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels(board)}
    for title, metric in {
        "Waiting and running": "loraserve_queue_depth",
        "Queue wait": "loraserve_queue_wait_seconds_bucket",
        "Throughput": "loraserve_requests_finished_total",
        "Refusals and failures": "loraserve_requests_rejected_total",
        "Throughput by tenant": "loraserve_tenant_requests_finished_total",
        "Refusals by tenant and limit": "loraserve_requests_refused_total",
        "Generation time": "loraserve_inference_seconds_bucket",
        "LoRA hits and misses": "loraserve_cache_misses_total",
        "LoRA switch time": "loraserve_adapter_load_seconds_bucket",
        "Replicas reporting": "loraserve_worker_generation_seconds_count",
        "Dispatching": "loraserve_dispatch_paused",
        "Webhook deliveries ended": "loraserve_webhooks_finished_total",
    }.items():
        assert metric in titles[title], title
    # Every query parses as PromQL (the variable's too), and each panel's selects its namespace's series only.
    assert dashboard_queries(board) and all(selectors(q) for q in dashboard_queries(board))
    for query in dashboard_queries(board, variables=False):
        for name, labels in selectors(query):
            assert "namespace" in labels, (name, query)


def test_the_sidecars_namespace_label_and_annotations_are_values() -> None:
    values = {
        "grafanaDashboard": {"enabled": True, "namespace": "grafana", "labels": {"grafana_dashboard": "loraserve"}},
    }
    configmap = render(values=values).one("ConfigMap", "-dashboard")
    assert configmap["metadata"]["namespace"] == "grafana"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "loraserve"
    tls = render(EXTERNAL_TLS).one("ConfigMap", "-dashboard")
    assert tls["metadata"]["annotations"] == {"grafana_folder": "loraserve"}


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests(monitored: Rendered, tmp_path: Path) -> None:
    rule = monitored.one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    assert [r["alert"] for r in alert_rules(monitored)] == ALERTS
    # promtool reads the spec as Prometheus reads a rule file: strictly, every expression parsed.
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    assert "SUCCESS: 4 rules found" in promtool("check", "rules", tmp_path / "rules.yaml").stdout
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    promtool("test", "rules", tmp_path / RULES_TEST.name)


def test_the_rules_select_this_releases_series_and_the_thresholds_are_values() -> None:
    values = {**MONITORING_ON, "prometheusRule": {"enabled": True, "failureRatio": 0.25, "labels": {"release": "kps"}}}
    r = render(values=values)
    assert r.one("PrometheusRule")["metadata"]["labels"]["release"] == "kps"
    rules = {rule["alert"]: rule for rule in alert_rules(r)}
    assert "> 0.25\n" in rules["LoraserveHighFailureRatio"]["expr"]
    for rule in rules.values():
        for name, labels in selectors(rule["expr"]):
            assert {"namespace", "job"} <= labels, (rule["alert"], name)
    # Without the workers' metrics port, only the gateway can tell that no worker serves.
    without_port = {rule["alert"]: rule for rule in alert_rules(render(values={**values, "workers": {"metricsPort": 0}}))}
    assert [name for name, _ in selectors(without_port["LoraserveNoServingWorkers"]["expr"])] == ["loraserve_dispatch_paused"]


def test_the_rules_without_the_service_monitor_are_refused() -> None:
    error = render_error(values={"prometheusRule": {"enabled": True}})
    assert "at '/serviceMonitor/enabled': value must be true" in error


def test_the_documented_example_turns_on_the_dashboard_and_the_alerts(tmp_path: Path) -> None:
    page = (CHART.parents[1] / "docs" / "operations.md").read_text()
    example = page.split("## Dashboard and alerts", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "values.yaml").write_text(example)
    r = render(tmp_path / "values.yaml")
    assert r.one("ServiceMonitor")["metadata"]["labels"]["release"] == "prometheus"
    assert r.one("PrometheusRule")["metadata"]["labels"]["release"] == "prometheus"
    assert r.one("ConfigMap", "-dashboard")["metadata"]["labels"]["grafana_dashboard"] == "1"
