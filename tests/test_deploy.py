"""Deployment files: promtool checks and rule unit tests, Grafana provisioning and dashboard schema, and the
consistency of docker-compose.yml, the Dockerfile and the Kubernetes manifests (no Docker engine or cluster here:
those are checked as files)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, cli_env

PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
K8S = REPO / "deploy" / "k8s"
DASHBOARD = GRAFANA / "dashboards" / "imgpipe.json"
COMPOSE = REPO / "docker-compose.yml"


# What Grafana puts in place of its variables before sending a query (scrape interval 15 s: 4 x 15 s = 1 m).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def grafana_expr(expr: str) -> str:
    """A dashboard query as Grafana sends it to Prometheus."""
    for name, text in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, text)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query in the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: apt-get install -y prometheus (.ci/run installs it)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_names() -> set[str]:
    rules = load_yaml(PROMETHEUS / "rules" / "alerts.yml")
    return {r["alert"] for g in rules["groups"] for r in g["rules"]}


def recording_names() -> set[str]:
    rules = load_yaml(PROMETHEUS / "rules" / "recording.yml")
    return {r["record"] for g in rules["groups"] for r in g["rules"]}


# --- Prometheus ----------------------------------------------------------------------------------------------


def test_promtool_accepts_config_and_rules() -> None:
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = sorted(str(p) for p in (PROMETHEUS / "rules").glob("*.yml"))
    result = promtool("check", "rules", *rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_and_recording_rule_unit_tests_pass() -> None:
    tests = sorted(str(p) for p in (PROMETHEUS / "tests").glob("*.yml"))
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_shown_firing_by_a_unit_test() -> None:
    fired: set[str] = set()
    tested_records: set[str] = set()
    for path in (PROMETHEUS / "tests").glob("*.yml"):
        for group in load_yaml(path)["tests"]:
            fired |= {c["alertname"] for c in group.get("alert_rule_test", []) if c.get("exp_alerts")}
            tested_records |= {c["expr"] for c in group.get("promql_expr_test", [])}
    assert alert_names() == {
        "ImgpipeBacklogStalled",
        "ImgpipeErrorRatioHigh",
        "ImgpipeWorkerDown",
        "ImgpipeDeadLettersGrowing",
        "ImgpipeDrainTimeHigh",
        "ImgpipeExporterBlind",
    }
    assert fired == alert_names()
    assert recording_names() <= tested_records


def test_scrape_targets_match_the_ports_the_services_listen_on() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    compose = load_yaml(COMPOSE)["services"]
    worker_port = jobs["imgpipe-worker"]["dns_sd_configs"][0]["port"]
    assert jobs["imgpipe-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert compose["worker"]["command"] == ["worker", "--metrics-port", str(worker_port)]
    exporter_target = jobs["imgpipe-exporter"]["static_configs"][0]["targets"][0]
    assert exporter_target == f"exporter:{compose['exporter']['command'][-1]}"
    # The alerts select on these job names.
    alerts = (PROMETHEUS / "rules" / "alerts.yml").read_text()
    assert 'job="imgpipe-worker"' in alerts and 'job="imgpipe-exporter"' in alerts


# --- Grafana -------------------------------------------------------------------------------------------------


def test_grafana_provisioning_files() -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"] == "http://prometheus:9090"  # the compose service
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "imgpipe.yml")
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["name"] and provider["orgId"] == 1
    # The provider's path is where compose mounts the dashboards folder.
    mounts = load_yaml(COMPOSE)["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


KNOWN_PANEL_TYPES = {"row", "stat", "timeseries", "heatmap", "table", "gauge", "bargauge", "state-timeline"}


def test_dashboard_json_has_the_fields_grafana_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    uid = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]["uid"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert dashboard.get("id") is None  # provisioning assigns ids
    assert isinstance(dashboard["templating"]["list"], list) and "time" in dashboard
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in dashboard["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles))
    for panel in dashboard["panels"]:
        assert panel["type"] in KNOWN_PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "xywh") and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == uid


def test_dashboard_answers_the_questions_of_the_issue() -> None:
    """Panels for: images/s total and per worker, backlog and drain time, batch sizes, p50/p95/p99 per stage,
    errors by reason, dead letters, workers up, GPU memory and utilisation, model version per worker."""
    exprs = " ".join(t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", []))
    for needle in (
        "rate(imgpipe_images_total",
        "sum by (instance) (rate(imgpipe_images_total",
        "imgpipe_backlog_images",
        "imgpipe_drain_seconds",
        "imgpipe_batch_size_bucket",
        "sum by (reason) (rate(imgpipe_errors_total",
        "imgpipe_dead_letter_messages",
        "imgpipe_dead_letters_total",
        'up{job="imgpipe-worker"}',
        "imgpipe_gpu_memory_used_bytes",
        "imgpipe_gpu_utilization_ratio",
        "imgpipe_model_info",
    ):
        assert needle in exprs, needle
    for stage in ("decode", "infer", "write"):
        for q in ("0.5", "0.95", "0.99"):
            assert (
                f'histogram_quantile({q}, sum by (le) (rate(imgpipe_stage_seconds_bucket{{stage="{stage}"}}' in exprs
            ), (stage, q)


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as recording rules), with Grafana's variables filled in."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": grafana_expr(expr)}
                    for i, (_title, expr) in enumerate(dashboard_targets())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- docker-compose.yml and the Dockerfile --------------------------------------------------------------------


def test_compose_file_runs_the_whole_stack() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"redis", "worker", "exporter", "prometheus", "grafana"} <= set(services)
    worker = services["worker"]
    assert worker["environment"]["IMGPIPE_REDIS_URL"] == "redis://redis:6379/0"
    assert worker["environment"]["IMGPIPE_ALLOWED_ROOTS"] == "/data"
    assert services["exporter"]["environment"]["IMGPIPE_REDIS_URL"] == "redis://redis:6379/0"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in services["redis"]
    # Every bind mount of the repository points at something that exists.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} missing"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert set(compose["volumes"]) >= {
        v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(("./", "$"))
    }


def test_dockerfile_builds_the_package_and_exposes_the_metrics_ports() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1\d", text, re.M)
    for package in ("imgpipe", "model", "producer", "worker"):
        assert re.search(rf"^COPY {package} \./{package}$", text, re.M), package
    assert re.search(r"^EXPOSE 9400 9808$", text, re.M)
    assert 'ENTRYPOINT ["imgpipe"]' in text
    assert re.search(r"^USER ", text, re.M), "the image should not run as root"


# --- Kubernetes ----------------------------------------------------------------------------------------------


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_k8s_manifests_fit_together() -> None:
    docs = k8s_documents()
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "imgpipe", doc["metadata"]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert {"redis", "imgpipe-worker", "imgpipe-exporter"} <= set(deployments)
    pod_labels = {}
    ports = {}
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        pod_labels[name] = labels
        ports[name] = {
            p["name"]: p["containerPort"]
            for c in d["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
    for svc in (d for d in docs if d["kind"] == "Service"):
        selected = [n for n, labels in pod_labels.items() if svc["spec"]["selector"].items() <= labels.items()]
        assert selected, f"service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports[selected[0]], (svc["metadata"]["name"], port)
    # Metrics ports: container port, scrape annotation and the command's flag agree.
    for name, flag in (("imgpipe-worker", "--metrics-port"), ("imgpipe-exporter", "--port")):
        pod = deployments[name]["spec"]["template"]
        args = pod["spec"]["containers"][0]["args"]
        port = int(args[args.index(flag) + 1])
        assert ports[name]["metrics"] == port == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    # The Redis URL (may carry a password) comes from a Secret.
    for name in ("imgpipe-worker", "imgpipe-exporter"):
        env = {e["name"]: e for e in deployments[name]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["IMGPIPE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "imgpipe-redis"


def test_k8s_autoscaling_uses_the_drain_time_rule() -> None:
    docs = k8s_documents()
    [scaled] = [d for d in docs if d["kind"] == "ScaledObject"]
    [hpa] = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "imgpipe-worker"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "imgpipe-worker"}
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA trigger metadata must be strings"
    assert trigger["metadata"]["query"] in recording_names()
    assert float(trigger["metadata"]["threshold"]) > 0
    assert hpa["spec"]["metrics"][0]["external"]["target"]["type"] == "Value"
    # kustomization lists files that exist, and only one autoscaler.
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert all((K8S / r).is_file() for r in kustomization["resources"])
    assert "keda-scaledobject.yaml" in kustomization["resources"]
    assert "hpa-prometheus-adapter.yaml" not in kustomization["resources"]


def test_k8s_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    [config_map] = [d for d in k8s_documents() if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    config["rule_files"] = [str(PROMETHEUS / "rules" / "*.yml")]  # where the rules ConfigMap is mounted
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert {j["job_name"] for j in config["scrape_configs"]} == {"imgpipe-worker", "imgpipe-exporter"}


# --- Packaging: a producer host installs no torch --------------------------------------------------------------

# Signs in pip's output that the package index could not be reached (not a packaging mistake of ours).
_PIP_OFFLINE = ("Could not find a version", "No matching distribution", "connection", "Network is unreachable")


@pytest.mark.timeout(300)
def test_a_plain_install_runs_the_producer_commands_without_torch(tmp_path: Path, redis_url: str) -> None:
    """`pip install imgpipe` (the wheel, no extras) in a fresh venv: enqueue, watch, status, results and exporter
    work and torch is absent; a torch command names the extra to install. Dependencies come from this machine's
    pip configuration (its package index or local mirror); the test skips, saying so, if pip cannot reach one."""
    wheelhouse = tmp_path / "wheelhouse"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheelhouse), "."],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [wheel] = wheelhouse.glob("imgpipe-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if installed.returncode != 0 and any(sign in installed.stderr for sign in _PIP_OFFLINE):
        pytest.skip(f"pip could not install the base dependencies offline here: {installed.stderr.strip()[-300:]}")
    assert installed.returncode == 0, installed.stderr

    python = venv / "bin" / "python"
    imgpipe = venv / "bin" / "imgpipe"
    env = cli_env(IMGPIPE_REDIS_URL=redis_url)

    def run(*args: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)

    absent = run(str(python), "-c", "import importlib.util as u; print([m for m in ('torch', 'torchvision', 'numpy', "
                 "'PIL', 'sklearn', 'matplotlib') if u.find_spec(m)])")  # fmt: skip
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    for command in ("enqueue", "watch", "status", "results", "exporter"):
        result = run(str(imgpipe), command, "--help")
        assert result.returncode == 0 and "Usage: imgpipe" in result.stdout, (command, result.stderr)
    # Against a real Redis: a job is created and enqueued, and its status reads back.
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not decoded by the producer")  # the producer only lists file names
    enqueued = run(str(imgpipe), "enqueue", str(data))
    assert enqueued.returncode == 0, enqueued.stderr
    job = enqueued.stdout.strip()
    status = run(str(imgpipe), "status", job)
    assert status.returncode == 0 and job in status.stdout, status.stdout + status.stderr
    # A command of the worker extra says which extra to install, in one line.
    classify = run(str(imgpipe), "classify", str(data))
    assert classify.returncode == 1, classify.stderr
    assert "pip install 'imgpipe[worker]'" in classify.stderr and "Traceback" not in classify.stderr
