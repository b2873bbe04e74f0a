"""deploy/kubernetes builds, and every object in it is valid for Kubernetes, without a cluster.

Each buildable directory (deploy/kubernetes itself, its base and each overlay) is walked the
way kustomize walks it (no missing path, no overlay inside its base) and rendered by the real
kustomize where kubectl has one; every object, rendered and as written in its file, is checked
against its kind's schema (tests/deploy/manifests.py). Then what the fleet needs of them: the
metrics port bound where Prometheus and the kubelet reach it, probes on /livez and /readyz,
grace periods above the gateway's shutdown grace and the worker's drain, disruption budgets,
the headless Service, monitors that find the metrics ports, the alert rules as a
PrometheusRule, and a KEDA ScaledObject on the demand of the model the workers serve.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.cli import build_parser
from tests.deploy.manifests import (
    CRD_KINDS,
    K8S,
    REPO,
    load_all,
    render,
    tree,
    validate,
)
from tests.deploy.promql import exported_names, fleet_gauges_outside_max, metric_names

KUSTOMIZATIONS = {p.parent: yaml.safe_load(p.read_text()) for p in K8S.rglob("kustomization.yaml")}
BUILDS = sorted(d for d, k in KUSTOMIZATIONS.items() if k.get("kind") != "Component")
"""What `kubectl apply -k` takes: deploy/kubernetes, its base and the overlays."""
ALERTS = REPO / "deploy" / "monitoring" / "prometheus" / "alerts.yml"
RENDER_RULES = K8S / "monitoring" / "render-prometheusrule.py"


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(out) == len(docs), "two objects of the same kind and name"
    return out


def written(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The objects of every manifest file `directory` builds from, as written."""
    return by_kind([d for p in tree(directory).manifests for d in load_all(p)])


@pytest.fixture(scope="module")
def fleet() -> dict[tuple[str, str], dict[str, Any]]:
    """The objects of every build together, as written (the Ascend worker included)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for directory in BUILDS:
        out.update(written(directory))
    return out


@pytest.fixture(scope="module")
def config(fleet: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = fleet["ConfigMap", "npuserve-config"]["data"]
    return data


def pod_spec(fleet: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = fleet["Deployment", name]["spec"]["template"]["spec"]
    return spec


def parse(container: dict[str, Any]) -> argparse.Namespace:
    return build_parser().parse_args([*container["command"], *container["args"]][1:])


def port(container: dict[str, Any], name: str) -> int:
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(number)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In) matches `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


WORKERS = ("npuserve-worker", "npuserve-worker-ascend-tp8")


def test_the_builds_are_the_fleet_its_base_and_the_overlays() -> None:
    assert [rel(p) for p in BUILDS] == [
        "deploy/kubernetes", "deploy/kubernetes/base", "deploy/kubernetes/overlays/ascend",
        "deploy/kubernetes/overlays/autoscaling", "deploy/kubernetes/overlays/monitoring"]


@pytest.mark.parametrize("directory", BUILDS, ids=rel)
def test_every_build_walks_without_a_cycle_or_a_missing_file(directory: Path) -> None:
    walked = tree(directory)
    assert walked.manifests, f"{rel(directory)} builds nothing"


def test_every_file_under_deploy_kubernetes_is_used_by_some_build() -> None:
    used: set[Path] = set()
    for directory in BUILDS:
        walked = tree(directory)
        used |= {*walked.kustomizations, *walked.manifests}
    files = {p.resolve() for p in K8S.rglob("*.yaml")}
    assert files - used == set(), "files no build reads"


def test_the_cycle_kustomize_refuses_is_caught(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [a.yaml]\n")
    (tmp_path / "a.yaml").write_text("kind: ConfigMap\n")
    inner = tmp_path / "overlay"
    inner.mkdir()
    (inner / "kustomization.yaml").write_text("resources: [../]\n")
    with pytest.raises(AssertionError, match="cycle"):
        tree(inner)


def test_the_plain_build_needs_no_custom_resources() -> None:
    """`kubectl apply -k deploy/kubernetes` works on a cluster without prometheus-operator
    or KEDA: their kinds come only with the overlays that ask for them."""
    for directory in (K8S, K8S / "base", K8S / "overlays" / "ascend"):
        kinds = {kind for kind, _ in written(directory)}
        assert not kinds & CRD_KINDS, rel(directory)


@pytest.mark.parametrize("path", sorted({p for d in BUILDS for p in tree(d).manifests}),
                         ids=rel)
def test_every_manifest_file_is_valid_for_its_kind(path: Path) -> None:
    for doc in load_all(path):
        validate(doc)


@pytest.mark.parametrize("directory", BUILDS, ids=rel)
def test_kustomize_builds_valid_objects_in_the_npuserve_namespace(directory: Path) -> None:
    docs = render(directory)
    objects = by_kind(docs)
    assert ("Namespace", "npuserve") in objects
    for doc in docs:
        validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "npuserve", (doc["kind"],
                                                                    doc["metadata"]["name"])
    made = {("ConfigMap", "npuserve-redis-acl")}  # deploy/redis's configMapGenerator
    assert set(written(directory)) | made == set(objects), "objects made or lost on the way"


def test_autoscaling_leaves_the_worker_count_to_keda() -> None:
    objects = by_kind(render(K8S / "overlays" / "autoscaling"))
    assert "replicas" not in objects["Deployment", "npuserve-worker"]["spec"]
    assert objects["Deployment", "npuserve-gateway"]["spec"]["replicas"] >= 2


def test_metrics_listen_on_all_addresses_on_the_port_the_pods_declare(
        fleet: dict[tuple[str, str], dict[str, Any]], config: dict[str, str]) -> None:
    for component, deployment in (("GATEWAY", "npuserve-gateway"),
                                  *(("WORKER", w) for w in WORKERS)):
        spec = pod_spec(fleet, deployment)
        [container] = spec["containers"]
        metrics = int(config[f"NPUSERVE_{component}_METRICS_PORT"])
        assert port(container, "metrics") == metrics, deployment
        assert config[f"NPUSERVE_{component}_METRICS_HOST"] == "0.0.0.0"
        assert {"configMapRef": {"name": "npuserve-config"}} in container["envFrom"]
        notes = fleet["Deployment", deployment]["spec"]["template"]["metadata"]["annotations"]
        assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics),
                         "prometheus.io/path": "/metrics"}, deployment


@pytest.mark.parametrize("deployment", WORKERS)
def test_worker_probes_are_livez_and_readyz_on_the_metrics_port(
        fleet: dict[tuple[str, str], dict[str, Any]], deployment: str) -> None:
    [c] = pod_spec(fleet, deployment)["containers"]
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"),
                        ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}, (deployment, probe)


def test_gateway_ready_on_grpc_health_live_on_livez_and_its_grace_fits(
        fleet: dict[tuple[str, str], dict[str, Any]], config: dict[str, str]) -> None:
    spec = pod_spec(fleet, "npuserve-gateway")
    [c] = spec["containers"]
    grpc_port = int(parse(c).listen.rsplit(":", 1)[1])
    assert c["readinessProbe"]["grpc"]["port"] == grpc_port
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    grace = float(config["NPUSERVE_GATEWAY_SHUTDOWN_GRACE_S"])
    assert 0 < grace <= spec["terminationGracePeriodSeconds"] - 5


@pytest.mark.parametrize("deployment", WORKERS)
def test_worker_drain_ends_before_its_termination_grace(
        fleet: dict[tuple[str, str], dict[str, Any]], config: dict[str, str],
        deployment: str) -> None:
    drain = float(config["NPUSERVE_DRAIN_TIMEOUT_S"])
    assert 0 < drain <= pod_spec(fleet, deployment)["terminationGracePeriodSeconds"] - 5


@pytest.mark.parametrize("deployment", ["npuserve-gateway", "npuserve-worker"])
def test_a_disruption_budget_lets_evictions_take_one_pod_at_a_time(
        fleet: dict[tuple[str, str], dict[str, Any]], deployment: str) -> None:
    budget = fleet["PodDisruptionBudget", deployment]["spec"]
    assert budget["maxUnavailable"] == 1
    labels = fleet["Deployment", deployment]["spec"]["template"]["metadata"]["labels"]
    assert selects(budget["selector"], labels)
    budgets = [k for k, d in fleet.items() if k[0] == "PodDisruptionBudget"
               and selects(d["spec"]["selector"], labels)]
    assert budgets == [("PodDisruptionBudget", deployment)], "one budget per pod"


def test_gateways_have_a_headless_service_beside_the_cluster_ip_one(
        fleet: dict[tuple[str, str], dict[str, Any]]) -> None:
    service = fleet["Service", "npuserve-gateway"]["spec"]
    headless = fleet["Service", "npuserve-gateway-headless"]["spec"]
    assert "clusterIP" not in service and headless["clusterIP"] == "None"
    assert headless["selector"] == service["selector"]
    assert not headless.get("publishNotReadyAddresses"), "DNS must list only ready gateways"
    [grpc] = headless["ports"]
    assert grpc["targetPort"] == "grpc" and grpc["appProtocol"] == "grpc"
    assert "metrics" not in {p["name"] for p in headless["ports"]}  # scraped once, not twice


def test_the_service_monitor_finds_the_gateways_metrics_port(
        fleet: dict[tuple[str, str], dict[str, Any]]) -> None:
    monitor = fleet["ServiceMonitor", "npuserve-gateway"]["spec"]
    scraped = [k for k, d in fleet.items() if k[0] == "Service"
               and selects(monitor["selector"], d["metadata"]["labels"])
               and {e["port"] for e in monitor["endpoints"]}
               & {p["name"] for p in d["spec"]["ports"]}]
    assert scraped == [("Service", "npuserve-gateway")]
    [endpoint] = monitor["endpoints"]
    assert endpoint["path"] == "/metrics"


def test_the_pod_monitor_finds_every_workers_metrics_port(
        fleet: dict[tuple[str, str], dict[str, Any]]) -> None:
    monitor = fleet["PodMonitor", "npuserve-worker"]["spec"]
    [endpoint] = monitor["podMetricsEndpoints"]
    found = []
    for (kind, name), doc in fleet.items():
        if kind == "Deployment" and selects(monitor["selector"],
                                            doc["spec"]["template"]["metadata"]["labels"]):
            [c] = doc["spec"]["template"]["spec"]["containers"]
            assert port(c, endpoint["port"]) and endpoint["path"] == "/metrics"
            found.append(name)
    assert sorted(found) == sorted(WORKERS)


def test_the_alert_rules_match_the_job_names_the_monitors_give() -> None:
    """prometheus-operator names a ServiceMonitor's job after the Service and a PodMonitor's
    namespace/name."""
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"]
             for r in g["rules"]}
    for alert, job in (("NpuserveGatewayDown", "npuserve-gateway"),
                       ("NpuserveWorkerDown", "npuserve/npuserve-worker")):
        [pattern] = re.findall(r'job=~"([^"]+)"', rules[alert])
        assert re.fullmatch(pattern, job), (alert, job)


def test_the_prometheus_rule_is_the_alert_rules_file() -> None:
    [rule] = load_all(K8S / "monitoring" / "prometheusrule.yaml")
    expected = yaml.safe_load(ALERTS.read_text())["groups"]
    assert rule["spec"]["groups"] == expected, (
        f"stale: run `.venv/bin/python {rel(RENDER_RULES)}` after changing {rel(ALERTS)}")


def test_rendering_the_prometheus_rule_reproduces_the_committed_file(tmp_path: Path) -> None:
    out = tmp_path / "prometheusrule.yaml"
    subprocess.run([sys.executable, str(RENDER_RULES), str(out)], check=True, timeout=60)
    assert out.read_text() == (K8S / "monitoring" / "prometheusrule.yaml").read_text()


def test_keda_scales_the_cpu_workers_on_the_demand_for_their_model(
        fleet: dict[tuple[str, str], dict[str, Any]], config: dict[str, str]) -> None:
    scaled = fleet["ScaledObject", "npuserve-worker"]["spec"]
    assert ("Deployment", scaled["scaleTargetRef"]["name"]) in fleet
    assert scaled["minReplicaCount"] >= 1  # no worker, no queue to call one up
    assert scaled["maxReplicaCount"] > scaled["minReplicaCount"]
    [c] = pod_spec(fleet, scaled["scaleTargetRef"]["name"])["containers"]
    args = parse(c)
    model = args.name or Path(args.model).name
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metricType"] == "AverageValue"  # replicas = ceil(demand / threshold)
    query = trigger["metadata"]["query"]
    assert set(re.findall(r'model="([^"]*)"', query)) == {model}
    assert metric_names(query) <= exported_names()
    assert "npuserve_queue_depth" in metric_names(query)
    assert not fleet_gauges_outside_max(query), "gateways report fleet gauges alike: max"
    threshold = float(trigger["metadata"]["threshold"])
    assert 0 < threshold <= int(config["NPUSERVE_MAX_NUM_SEQS"]), "at most one worker's slots"
