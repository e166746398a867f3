"""compose.yaml and the Dockerfile agree with the settings classes and the worker's endpoints.

Docker does not run here: these tests read the files as data (tests/unit/test_k8s_manifests.py
does the same for deploy/k8s/, and `make lint` validates both against their schemas).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from deploy.local.broker_limits import BrokerLimits
from schemas.settings import KafkaSettings, RedisSettings
from workers.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
SUPERVISOR_EXTRA_S = 10.0
"""The supervisor waits `shutdown_timeout_s` + this before killing children (workers/cli.py)."""

DEFAULT_KAFKA_PORT = int(KafkaSettings().bootstrap_servers.rsplit(":", 1)[1])
DEFAULT_REDIS_PORT = urlsplit(RedisSettings().url).port
DEFAULT_HTTP_PORT = WorkerSettings.model_fields["http_port"].default


def env_names(model: type[BaseModel], prefix: str = "INFERQ_") -> Iterator[str]:
    """`INFERQ_X__Y` for every leaf field of `model`, nested models joined with `__`."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from env_names(annotation, f"{prefix}{name.upper()}__")
        else:
            yield f"{prefix}{name.upper()}"


WORKER_ENV_NAMES = frozenset(env_names(WorkerSettings))


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    """WorkerSettings as a worker given exactly `env` (and no other INFERQ_*) would read them."""
    for name in WORKER_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return WorkerSettings()


def duration_s(text: str) -> float:
    """A compose duration such as `1m30s` or `90s`, in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(number + unit for number, unit in parts) == text, f"bad duration {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """Container port → (first) host port of a service's short-syntax `ports`."""
    mapping: dict[int, int] = {}
    for entry in service.get("ports", []):
        parts = str(entry).split("/")[0].split(":")  # [ip:]host[-last]:container[/protocol]
        container = int(parts[-1])
        mapping[container] = int(parts[-2].split("-")[0]) if len(parts) >= 2 else container
    return mapping


# --- compose.yaml -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


@pytest.fixture(scope="module")
def worker_env(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    env = services["worker"]["environment"]
    assert isinstance(env, dict), "write the worker's environment as a mapping"
    return {name: str(value) for name, value in env.items()}


def test_compose_has_kafka_redis_topics_models_and_worker(services: dict[str, Any]) -> None:
    assert {"kafka", "redis", "topics", "models", "worker"} <= set(services)


@pytest.mark.parametrize("name", ["kafka", "redis", "worker"])
def test_long_running_services_have_healthchecks(services: dict[str, Any], name: str) -> None:
    test = services[name]["healthcheck"]["test"]
    assert test[0] in {"CMD", "CMD-SHELL"}
    assert len(test) > 1


def test_kafka_is_a_single_kraft_node_reachable_as_kafka_9092(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    env = {name: str(value) for name, value in kafka["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert f"PLAINTEXT://kafka:{DEFAULT_KAFKA_PORT}" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert f"PLAINTEXT://:{DEFAULT_KAFKA_PORT}" in env["KAFKA_LISTENERS"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16, "not a base64 UUID"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= WorkerSettings().max_message_bytes
    assert f"localhost:{DEFAULT_KAFKA_PORT}" in " ".join(kafka["healthcheck"]["test"])


def kafka_env(services: dict[str, Any]) -> dict[str, str]:
    return {name: str(value) for name, value in services["kafka"]["environment"].items()}


def test_kafka_limits_and_memory_are_the_local_stacks(services: dict[str, Any]) -> None:
    """The broker's memory holds what its limits let in (deploy/local/broker_limits.py)."""
    env = kafka_env(services)
    limits = BrokerLimits()
    for name, value in limits.server_properties().items():
        assert env[f"KAFKA_{name.upper().replace('.', '_')}"] == value, name
    jvm_options = env["KAFKA_HEAP_OPTS"].split() + env["KAFKA_OPTS"].split()
    for option in limits.jvm_options():
        assert option in jvm_options


def test_redis_keeps_an_append_only_file_in_a_volume(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    redis = services["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert "--dir" not in options, "the append-only file goes to the image's /data"
    (volume,) = [v for v in redis["volumes"] if v.split(":")[1] == "/data"]
    assert volume.split(":")[0] in compose["volumes"], "a named volume outlives the container"


def test_host_ports_are_the_settings_defaults(services: dict[str, Any]) -> None:
    assert DEFAULT_KAFKA_PORT in published_ports(services["kafka"]).values()
    assert published_ports(services["redis"]) == {DEFAULT_REDIS_PORT: DEFAULT_REDIS_PORT}
    assert published_ports(services["worker"]) == {DEFAULT_HTTP_PORT: DEFAULT_HTTP_PORT}


def test_worker_env_names_are_worker_settings(worker_env: dict[str, str]) -> None:
    unknown = sorted(set(worker_env) - WORKER_ENV_NAMES)
    assert not unknown, f"not WorkerSettings fields: {unknown}"


def test_worker_env_points_at_the_compose_services(
    worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(worker_env, monkeypatch)
    assert settings.kafka.bootstrap_servers == f"kafka:{DEFAULT_KAFKA_PORT}"
    assert settings.redis.url == f"redis://redis:{DEFAULT_REDIS_PORT}/0"
    assert settings.models_dir == Path("/models")
    assert settings.http_port == DEFAULT_HTTP_PORT


def test_worker_waits_for_healthy_dependencies_and_the_models(services: dict[str, Any]) -> None:
    depends_on = services["worker"]["depends_on"]
    assert depends_on["kafka"]["condition"] == "service_healthy"
    assert depends_on["redis"]["condition"] == "service_healthy"
    assert depends_on["topics"]["condition"] == "service_completed_successfully"
    assert depends_on["models"]["condition"] == "service_completed_successfully"


def test_topics_service_creates_the_topics_of_the_models_in_the_volume(
    services: dict[str, Any], worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = services["topics"]
    assert topics["entrypoint"] == ["python", "-m", "workers.topics_cli"]
    assert topics["command"] == ["create"]
    env = {name: str(value) for name, value in topics["environment"].items()}
    assert set(env) <= WORKER_ENV_NAMES
    settings = settings_from(env, monkeypatch)
    assert settings.kafka.bootstrap_servers == f"kafka:{DEFAULT_KAFKA_PORT}"
    assert str(settings.models_dir) == worker_env["INFERQ_MODELS_DIR"]
    assert any(v.startswith("models:") for v in topics["volumes"])
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert topics["depends_on"]["models"]["condition"] == "service_completed_successfully"


def test_worker_and_models_share_the_models_volume(
    compose: dict[str, Any], services: dict[str, Any], worker_env: dict[str, str]
) -> None:
    models_dir = worker_env["INFERQ_MODELS_DIR"]
    assert any(v.split(":")[:2] == ["models", models_dir] for v in services["worker"]["volumes"])
    assert any(v.split(":")[:2] == ["models", models_dir] for v in services["models"]["volumes"])
    assert "models" in compose["volumes"]
    command = [*services["models"]["entrypoint"], *services["models"]["command"]]
    assert command == ["python", "-m", "workers.example_models", "--out", models_dir]


def test_worker_healthcheck_asks_healthz_on_the_http_port(
    services: dict[str, Any], worker_env: dict[str, str]
) -> None:
    test = " ".join(services["worker"]["healthcheck"]["test"])
    assert f":{worker_env['INFERQ_HTTP_PORT']}/healthz" in test


def test_worker_is_built_from_the_dockerfile(services: dict[str, Any]) -> None:
    build = services["worker"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert services["models"]["image"] == services["worker"]["image"]


def test_stop_grace_period_outlasts_the_shutdown(
    services: dict[str, Any], worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shutdown_timeout_s = settings_from(worker_env, monkeypatch).shutdown_timeout_s
    grace_s = duration_s(services["worker"]["stop_grace_period"])
    assert grace_s > shutdown_timeout_s + SUPERVISOR_EXTRA_S


def test_dockerfile_installs_the_project_and_runs_the_worker() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert "pip install ." in text
    assert 'ENTRYPOINT ["inferq-worker"]' in text


def test_dockerfile_variants_runs_unprivileged_and_checks_healthz() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG VARIANT=cuda$", text, re.MULTILINE)
    for branch in ('case "$VARIANT" in', "cuda)", "cpu)", '--index-url "$TORCH_INDEX_URL"'):
        assert branch in text
    (user,) = re.findall(r"^USER (\d+)(?::\d+)?$", text, re.MULTILINE)
    assert int(user) != 0, "a numeric non-root uid, which runAsNonRoot can check"
    healthcheck = text[text.index("HEALTHCHECK") :].split("\n\n")[0]
    for part in ("/healthz", "INFERQ_HTTP_PORT", "urllib.request"):
        assert part in healthcheck
    assert "curl" not in healthcheck
    assert "COPY models" not in text, "models are a volume at /models, not in the image"


def test_prometheus_scrapes_the_worker_service_with_the_shipped_config_and_rules(
    services: dict[str, Any],
) -> None:
    prometheus = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "inferq-workers"]
    port = int(services["worker"]["environment"]["INFERQ_HTTP_PORT"])
    (discovery,) = job["dns_sd_configs"]  # every replica of the scaled worker service
    assert discovery == {"names": ["worker"], "type": "A", "port": port, "refresh_interval": "15s"}
    (published,) = services["worker"]["ports"]
    low, high = published.split(":")[0].split("-")
    assert published.endswith(f":{port}")
    assert int(high) - int(low) + 1 >= services["worker"]["deploy"]["replicas"]
    for rules in config["rule_files"]:
        assert (ROOT / "deploy" / "prometheus" / rules).is_file()


def test_grafana_provisions_the_dashboard_from_prometheus(services: dict[str, Any]) -> None:
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in services["grafana"]["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    assert (ROOT / "deploy" / "grafana" / "inferq.json").is_file()
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ][0]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "inferq.yml").read_text())[
        "providers"
    ]
    assert mounts["./deploy/grafana"] == provider["options"]["path"]
