"""The alert rules and the Grafana dashboard in deploy/monitoring agree with the code.

- The rules pass `promtool check rules` and their unit tests (`promtool test rules
  alerts_test.yml`), and every alert has a case that fires and one that must not.
- Every metric an alert or a dashboard panel queries is one the gateway or a worker exports
  (the names are read off their registries, so a renamed metric fails here, not on a
  dashboard that silently goes blank).
- The fleet gauges, which every gateway reports alike, are only ever taken with max.
- The dashboard is a Grafana dashboard of schema 39 with a Prometheus datasource variable and
  a model variable, its panels tile the grid, and every query parses (promtool).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import promtool
from tests.deploy.promql import exported_names, fleet_gauges_outside_max, metric_names

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
ALERTS = MONITORING / "prometheus" / "alerts.yml"
ALERTS_TEST = MONITORING / "prometheus" / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana" / "npuserve.json"

GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}


def test_metric_names_finds_selectors_and_skips_the_rest() -> None:
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{model=~"$model",'
            'le!="1"}[$__rate_interval]))) > 1e9 and on (instance, job) b '
            'unless ignoring (x) c[5m] offset 1h / d{} + max without (le) (e) > bool 2')
    assert metric_names(expr) == {"a_bucket", "b", "c", "d", "e"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row keeps its panels inside
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query, the variables' included."""
    board = dashboard()
    found = [(p["title"], t["expr"]) for p in panels(board) for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            selector = re.fullmatch(r"label_values\((.+), *\w+\)", query)
            assert selector, f"variable {var['name']}: unexpected query {query}"
            found.append((f"${var['name']}", selector.group(1)))
    return found


def test_alert_rules_pass_promtool_check() -> None:
    out = promtool.run("check", "rules", ALERTS)
    assert f"SUCCESS: {len(alert_rules())} rules found" in out


def test_alert_rules_pass_their_unit_tests() -> None:
    out = promtool.run("test", "rules", ALERTS_TEST)
    assert "SUCCESS" in out


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases: dict[str, list[list[Any]]] = {}
    for group in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    for rule in alert_rules():
        expected = cases.get(rule["alert"], [])
        assert any(expected), f"{rule['alert']}: no test case where it fires"
        assert not all(expected), f"{rule['alert']}: no test case where it must not fire"
    assert set(cases) <= {r["alert"] for r in alert_rules()}, "tests of unknown alerts"


def test_every_alert_waits_has_a_severity_and_says_what_to_do() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "alert names repeat"
    for rule in rules:
        assert rule["alert"].startswith("Npuserve"), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{rule['alert']}: no for:"
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and len(notes["description"]) > 60, rule["alert"]


def test_the_alerts_asked_for_exist() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert {"NpuserveQueueDepthHigh", "NpuserveRequestLatencyP99High",
            "NpuserveTimeToFirstTokenP99High", "NpuserveQueueOldestWaiterHigh",
            "NpuserveMemoryHigh", "NpuserveMemoryCritical", "NpuserveDeviceMemoryHigh",
            "NpuserveDeviceTemperatureHigh", "NpuserveNoLiveWorker", "NpuserveNoAcceptingWorker",
            "NpuserveWorkerHeartbeatLost", "NpuserveWorkerDown", "NpuserveGatewayNotServing",
            "NpuserveRequestErrorRateHigh", "NpuserveRejectionRateHigh"} <= names
    by_name = {r["alert"]: r for r in alert_rules()}
    assert by_name["NpuserveMemoryHigh"]["labels"]["severity"] == "warning"
    assert by_name["NpuserveMemoryCritical"]["labels"]["severity"] == "critical"


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_queried_is_exported_by_the_code(source: str) -> None:
    if source == "alerts":
        exprs = [(r["alert"], r["expr"]) for r in alert_rules()]
    else:
        exprs = dashboard_exprs()
    known = exported_names()
    missing = {f"{where}: {name}" for where, expr in exprs for name in metric_names(expr)
               if name not in known}
    assert not missing, "queried but exported by nothing:\n" + "\n".join(sorted(missing))
    assert all(metric_names(expr) for _, expr in exprs), "a query selects no metric"


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_fleet_gauges_are_taken_with_max_never_summed_over_gateways(source: str) -> None:
    if source == "alerts":
        exprs = [(r["alert"], r["expr"]) for r in alert_rules()]
    else:
        exprs = [e for e in dashboard_exprs() if not e[0].startswith("$")]
    for where, expr in exprs:
        assert not fleet_gauges_outside_max(expr), f"{where}: {expr}"


def test_dashboard_is_a_grafana_dashboard_with_its_variables() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] == "npuserve" and board["title"] and board["id"] is None
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["multi"] and model["includeAll"]
    assert model["datasource"]["uid"] == "${datasource}"


def test_dashboard_panels_query_the_datasource_variable_and_tile_the_grid() -> None:
    board = dashboard()
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        title = panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, title
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{title} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}, title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets), title
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}", title
            assert target["expr"].strip(), title


def test_dashboard_uses_only_variables_it_defines() -> None:
    board = dashboard()
    defined = {v["name"] for v in board["templating"]["list"]} | GRAFANA_VARIABLES
    for where, expr in dashboard_exprs():
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= defined, f"{where}: undefined variables {used - defined}"


def test_dashboard_charts_what_an_operator_needs() -> None:
    charted = set().union(*(metric_names(e) for _, e in dashboard_exprs()))
    assert {
        "npuserve_queue_depth", "npuserve_queue_oldest_age_seconds",
        "npuserve_gateway_generated_tokens_total", "npuserve_gateway_requests_total",
        "npuserve_gateway_time_to_first_token_seconds_bucket",
        "npuserve_gateway_inter_token_latency_seconds_bucket",
        "npuserve_gateway_request_duration_seconds_bucket",
        "npuserve_gateway_queue_wait_seconds_bucket",
        "npuserve_gateway_rejected_requests_total", "npuserve_worker_batch_size_sum",
        "npuserve_worker_step_seconds_bucket", "npuserve_worker_kv_cache_usage_ratio",
        "npuserve_worker_preemptions_total", "npuserve_workers", "npuserve_workers_accepting",
        "npuserve_worker_device_memory_used_bytes", "npuserve_worker_device_memory_total_bytes",
        "npuserve_worker_device_utilization_ratio", "npuserve_worker_device_temperature_celsius",
        "process_resident_memory_bytes", "npuserve_memory_limit_bytes",
    } <= charted


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (Grafana's variables filled in)."""
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs()):
        filled = expr.replace("$__rate_interval", "5m").replace("$model", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": filled})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool.run("check", "rules", path)


def test_the_readme_lists_every_alert() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Alerts"):readme.index("### Dashboard")]
    missing = [r["alert"] for r in alert_rules() if f"`{r['alert']}`" not in section]
    assert not missing, f"README's Monitoring: Alerts does not list {missing}"
