"""Security: SASL_SSL Kafka, Redis ACL users over TLS, refusals, and secrets kept out of sight.

A secure stack of its own (`deploy.local.secure_stack`) serves this module: a broker whose
client listener is SASL_SSL with SCRAM-SHA-512 users and a certificate of a test-only CA, and
a redis-server with no `default` user and a TLS port. Each test gets Redis ACL users that may
touch only its own `{prefix}:*` keys.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from aiokafka.errors import KafkaError
from redis.exceptions import NoPermissionError

from deploy.local.processes import free_port, free_ports, running
from deploy.local.secure_stack import SecureStack, SecureStackConfig, make_ca
from producers.client import BrokerRefusedError, InferenceClient
from producers.settings import ProducerSettings
from producers.stream import ResultStream
from schemas.kafka import KafkaAccessError
from schemas.messages import InferenceRequest, InferenceResult
from schemas.redis import RedisAccessError
from schemas.settings import KafkaSettings, RedisSettings
from schemas.tensors import Tensor
from schemas.topics import TopicNames
from tests.integration.kafka_helpers import bounded
from tests.integration.worker_harness import (
    Deployment,
    running_worker,
    spawn_worker_cli,
    stop_process,
    wait_until_ready,
)
from workers.example_models import write_example_models
from workers.settings import WorkerSettings
from workers.topics_cli import run as run_topics_cli

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.timeout(300)]

KAFKA_ADMIN, KAFKA_ADMIN_PASSWORD = "admin", "kafka-admin-Pw-51c0"
KAFKA_USER, KAFKA_PASSWORD = "inferq", "kafka-PLANTED-Pw-9c1e5f"
REDIS_ADMIN_PASSWORD = "redis-admin-Pw-77aa"
REDIS_WORKER_PASSWORD = "redis-PLANTED-worker-Pw-3b8d"
REDIS_CLIENT_PASSWORD = "redis-PLANTED-client-Pw-e402"
PLANTED = (KAFKA_PASSWORD, REDIS_WORKER_PASSWORD, REDIS_CLIENT_PASSWORD)


def worker_acl(prefix: str) -> str:
    """The least a worker needs (docs/security.md): its own keys, the commands it runs."""
    return (
        f"on resetpass >{REDIS_WORKER_PASSWORD} resetkeys ~{prefix}:* resetchannels -@all "
        "+ping +evalsha +script|load +set +get +mget"
    )


def client_acl(prefix: str) -> str:
    """A client only reads results."""
    return (
        f"on resetpass >{REDIS_CLIENT_PASSWORD} resetkeys %R~{prefix}:result:* resetchannels "
        "-@all +ping +mget +get"
    )


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    """The module's secure broker and redis-server, on free ports, stopped whatever happens."""
    kafka, controller, redis, sasl_ssl, tls = free_ports(5)
    config = SecureStackConfig(
        run_dir=tmp_path_factory.mktemp("secure-stack"),
        kafka_port=kafka,
        controller_port=controller,
        redis_port=redis,
        sasl_ssl_port=sasl_ssl,
        tls_port=tls,
        scram_users={KAFKA_ADMIN: KAFKA_ADMIN_PASSWORD, KAFKA_USER: KAFKA_PASSWORD},
        redis_acl=(f"admin on >{REDIS_ADMIN_PASSWORD} ~* &* +@all",),
    )
    with running(SecureStack(config)) as stack:
        yield stack


@dataclass(frozen=True, kw_only=True)
class SecureDeployment:
    """One test's inferq on the secure stack, and the settings each side connects with."""

    stack: SecureStack
    deployment: Deployment

    @property
    def prefix(self) -> str:
        return self.deployment.prefix

    def kafka(self, *, password: str = KAFKA_PASSWORD, cafile: Path | None = None) -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=self.stack.secure.sasl_ssl_bootstrap,
            topic_prefix=self.prefix,
            security_protocol="SASL_SSL",  # type: ignore[arg-type]
            sasl_username=KAFKA_USER,
            sasl_password=password,  # type: ignore[arg-type]
            ssl_cafile=cafile or self.stack.certificates.ca_cert,
            request_timeout_ms=15_000,
        )

    def redis(self, user: str, password: str, *, ca_certs: Path | None = None) -> RedisSettings:
        return RedisSettings(
            url=self.stack.secure.redis_tls_url,
            username=user,
            password=password,  # type: ignore[arg-type]
            ssl_ca_certs=ca_certs or self.stack.certificates.ca_cert,
        )

    @property
    def worker_user(self) -> str:
        return f"worker-{self.prefix}"

    @property
    def client_user(self) -> str:
        return f"client-{self.prefix}"

    def producer_settings(self, **kafka: object) -> ProducerSettings:
        return ProducerSettings(
            kafka=self.kafka(**kafka),  # type: ignore[arg-type]
            redis=self.redis(self.client_user, REDIS_CLIENT_PASSWORD),
            result_poll_interval_ms=20,
        )

    def worker_overrides(self) -> dict[str, object]:
        return {
            "kafka": self.kafka(),
            "redis": self.redis(self.worker_user, REDIS_WORKER_PASSWORD),
        }


@pytest.fixture
async def redis_admin(secure_stack: SecureStack) -> AsyncIterator[aioredis.Redis]:
    """The secure Redis as its admin user (plain port), to set up ACL users and read keys."""
    client = aioredis.Redis(
        host=secure_stack.config.host,
        port=secure_stack.config.redis_port,
        username="admin",
        password=REDIS_ADMIN_PASSWORD,
    )
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def secure(
    secure_stack: SecureStack,
    redis_admin: aioredis.Redis,
    unique_prefix: str,
    models_dir: Path,
) -> AsyncIterator[SecureDeployment]:
    """Example models, and a worker and a client ACL user for this test's prefix."""
    write_example_models(models_dir)
    deployment = Deployment(
        bootstrap=secure_stack.secure.sasl_ssl_bootstrap,
        redis_url=secure_stack.secure.redis_tls_url,
        prefix=unique_prefix,
        models_dir=models_dir,
        group_id=f"{unique_prefix}-workers",
    )
    secure = SecureDeployment(stack=secure_stack, deployment=deployment)
    await redis_admin.execute_command("ACL", "SETUSER", secure.worker_user,
                                      *worker_acl(unique_prefix).split())  # fmt: skip
    await redis_admin.execute_command("ACL", "SETUSER", secure.client_user,
                                      *client_acl(unique_prefix).split())  # fmt: skip
    await redis_admin.execute_command("ACL", "LOG", "RESET")
    try:
        yield secure
    finally:
        await redis_admin.execute_command("ACL", "DELUSER", secure.worker_user, secure.client_user)


def rows(prefix: str, count: int) -> list[InferenceRequest]:
    rng = np.random.default_rng(0)
    return [
        InferenceRequest(
            id=f"{prefix}-r{i}",
            model="mlp",
            inputs=(Tensor.from_numpy("input", rng.standard_normal((1, 784), np.float32)),),
        )
        for i in range(count)
    ]


async def denied_by_acl(redis_admin: aioredis.Redis, *users: str) -> list[str]:
    """What the ACL refused these users since the test began (`ACL LOG`)."""
    entries = await redis_admin.execute_command("ACL", "LOG")
    denied = []
    for entry in entries:
        fields = dict(zip(entry[::2], entry[1::2], strict=True))
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        if fields.get("username") in users:
            denied.append(
                f"{fields.get('username')}: {fields.get('reason')} {fields.get('object')}"
            )
    return denied


async def test_worker_and_client_answer_over_sasl_ssl_with_least_privilege_redis_users(
    secure: SecureDeployment, redis_admin: aioredis.Redis
) -> None:
    requests = rows(secure.prefix, 20)
    async with running_worker(secure.deployment, **secure.worker_overrides()) as running:
        await wait_until_ready(running, timeout_s=120)
        async with InferenceClient(settings=secure.producer_settings()) as client:
            one = await bounded(
                client.infer("mlp", {"input": requests[0].inputs[0].to_numpy()}, timeout_s=60),
                what="infer over SASL_SSL",
                timeout_s=90,
            )
            assert one.outputs["logits"].shape == (1, 10)
            await client.submit_many(requests)
            results = await client.results([r.id for r in requests], timeout_s=90)
            assert all(result.ok for result in results.values())
            # The client's own Redis user reads the cached results (one MGET).
            cached = await client.cached_results([r.id for r in requests])
            assert sorted(cached) == sorted(r.id for r in requests)
    topics = TopicNames(prefix=secure.prefix)
    for request in requests:  # the worker's restricted user wrote every result and digest
        assert await redis_admin.exists(topics.result_key(request.id))
        assert await redis_admin.exists(topics.digest_key(request.id))
    assert await denied_by_acl(redis_admin, secure.worker_user, secure.client_user) == []


async def test_inferq_topics_creates_and_checks_over_sasl_ssl(
    secure: SecureDeployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "alpha" / "1").mkdir(parents=True)
    settings = WorkerSettings(kafka=secure.kafka(), models_dir=tmp_path, topic_partitions=2)
    await bounded(run_topics_cli("create", settings), what="inferq-topics create", timeout_s=90)
    created = TopicNames(prefix=secure.prefix).requests("alpha")
    assert f"created {created}" in capsys.readouterr().out

    for _ in range(120):  # a new topic reaches the brokers' metadata a little later
        if await bounded(run_topics_cli("check", settings), what="check", timeout_s=90) == 0:
            break
        await asyncio.sleep(0.5)
    else:
        raise AssertionError("inferq-topics check never found the topics it created")
    refused = settings.model_copy(update={"kafka": secure.kafka(password="not-the-password")})
    with pytest.raises(KafkaError):
        await bounded(run_topics_cli("check", refused), what="the refusal", timeout_s=90)


async def test_the_redis_acl_keeps_each_user_to_its_own_keys(secure: SecureDeployment) -> None:
    worker = aioredis.Redis.from_url(
        secure.stack.secure.redis_tls_url,
        username=secure.worker_user,
        password=REDIS_WORKER_PASSWORD,
        ssl_ca_certs=str(secure.stack.certificates.ca_cert),
    )
    client = aioredis.Redis.from_url(
        secure.stack.secure.redis_tls_url,
        username=secure.client_user,
        password=REDIS_CLIENT_PASSWORD,
        ssl_ca_certs=str(secure.stack.certificates.ca_cert),
    )
    try:
        assert await worker.ping()
        with pytest.raises(NoPermissionError):
            await worker.get("another-prefix:result:x")
        with pytest.raises(NoPermissionError):
            await worker.delete(f"{secure.prefix}:result:x")  # a command it does not need
        assert await client.get(f"{secure.prefix}:result:x") is None
        with pytest.raises(NoPermissionError):
            await client.get(f"{secure.prefix}:digest:x")
    finally:
        await worker.aclose()
        await client.aclose()


async def test_a_wrong_kafka_password_is_refused_by_client_stream_and_worker(
    secure: SecureDeployment,
) -> None:
    settings = secure.producer_settings(password="not-the-password")
    client = InferenceClient(settings=settings)
    with pytest.raises(BrokerRefusedError) as refused:
        await bounded(client.start(), what="the client's refusal", timeout_s=90)
    assert refused.value.reason == "authentication"
    assert "SCRAM-SHA-512" in str(refused.value)
    assert "not-the-password" not in str(refused.value)
    await client.close()

    stream = ResultStream(settings, models=["mlp"], group_id=f"{secure.prefix}-stream")
    with pytest.raises(KafkaAccessError) as stream_refused:
        await bounded(stream.__aenter__(), what="the stream's refusal", timeout_s=90)
    assert stream_refused.value.reason == "authentication"

    wrong = {**secure.worker_overrides(), "kafka": secure.kafka(password="not-the-password")}
    with pytest.raises(KafkaAccessError) as worker_refused:
        async with running_worker(secure.deployment, **wrong) as running:
            await bounded(asyncio.shield(running.task), what="the worker's refusal", timeout_s=90)
    assert worker_refused.value.reason == "authentication"


async def test_a_broker_certificate_of_another_ca_is_refused(
    secure: SecureDeployment, tmp_path: Path
) -> None:
    other_ca, _ = make_ca(tmp_path, "other-ca")
    client = InferenceClient(settings=secure.producer_settings(cafile=other_ca))
    with pytest.raises(BrokerRefusedError) as refused:
        await bounded(client.start(), what="the client's refusal", timeout_s=90)
    assert refused.value.reason == "tls"
    await client.close()

    untrusting = {
        **secure.worker_overrides(),
        "redis": secure.redis(secure.worker_user, REDIS_WORKER_PASSWORD, ca_certs=other_ca),
    }
    with pytest.raises(RedisAccessError, match="TLS"):
        async with running_worker(secure.deployment, **untrusting) as running:
            await bounded(asyncio.shield(running.task), what="the worker's refusal", timeout_s=90)


async def test_a_wrong_redis_password_stops_the_worker_at_start(secure: SecureDeployment) -> None:
    wrong = {
        **secure.worker_overrides(),
        "redis": secure.redis(secure.worker_user, "not-the-password"),
    }
    with pytest.raises(RedisAccessError) as refused:
        async with running_worker(secure.deployment, **wrong) as running:
            await bounded(asyncio.shield(running.task), what="the worker's refusal", timeout_s=90)
    assert "not-the-password" not in str(refused.value)


async def until_ready(http_port: int, worker: subprocess.Popen[bytes]) -> None:
    """Until the worker's /readyz answers 200 (it has joined its group over SASL_SSL)."""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    while not await asyncio.to_thread(ready):
        assert worker.poll() is None, "the worker exited during start-up"
        await asyncio.sleep(0.2)


async def results_on_topic(secure: SecureDeployment, count: int) -> list[InferenceResult]:
    """The first ``count`` results on `{prefix}.results.mlp`, read over SASL_SSL."""
    found: list[InferenceResult] = []
    settings = secure.producer_settings()
    async with ResultStream(settings, models=["mlp"], group_id=f"{secure.prefix}-scan") as stream:
        async for delivery in stream:
            found.append(delivery.result)
            delivery.ack()
            if len(found) == count:
                break
    return found


async def test_planted_secrets_reach_no_log_metric_or_result(
    secure: SecureDeployment, redis_admin: aioredis.Redis, tmp_path: Path
) -> None:
    http_port = free_port()
    certificates = secure.stack.certificates
    env = {
        "INFERQ_KAFKA__BOOTSTRAP_SERVERS": secure.stack.secure.sasl_ssl_bootstrap,
        "INFERQ_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "INFERQ_KAFKA__SASL_USERNAME": KAFKA_USER,
        "INFERQ_KAFKA__SASL_PASSWORD": KAFKA_PASSWORD,
        "INFERQ_KAFKA__SSL_CAFILE": str(certificates.ca_cert),
        "INFERQ_REDIS__USERNAME": secure.worker_user,
        "INFERQ_REDIS__PASSWORD": REDIS_WORKER_PASSWORD,
        "INFERQ_REDIS__SSL_CA_CERTS": str(certificates.ca_cert),
        "INFERQ_HTTP_PORT": str(http_port),
        "INFERQ_LOG_LEVEL": "debug",
    }
    log_path = tmp_path / "worker.log"
    worker = spawn_worker_cli(secure.deployment, log_path, "--procs", "1", **env)
    good = rows(secure.prefix, 10)
    bad = InferenceRequest(  # answered with an error result: its message must be clean too
        id=f"{secure.prefix}-bad",
        model="mlp",
        inputs=(Tensor.from_numpy("input", np.zeros((1, 3), np.float32)),),
    )
    try:
        await bounded(until_ready(http_port, worker), what="the worker's /readyz", timeout_s=240)
        async with InferenceClient(settings=secure.producer_settings()) as client:
            await client.submit_many([*good, bad])
            results = await client.results([r.id for r in [*good, bad]], timeout_s=90)
        on_topic = await bounded(
            results_on_topic(secure, len(good) + 1), what="the result topic", timeout_s=90
        )
        metrics = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10)
                .read()
                .decode()
            )
        )
    finally:
        assert stop_process(worker) == 0
    assert not results[bad.id].ok
    assert {result.id for result in on_topic} == {r.id for r in [*good, bad]}
    assert "inferq_requests_total" in metrics
    text = log_path.read_text(errors="replace")
    assert "worker_started" in text
    for line in text.splitlines():
        if line.strip():
            json.loads(line)
    topics = TopicNames(prefix=secure.prefix)
    cached = [await redis_admin.get(topics.result_key(r.id)) for r in [*good, bad]]
    shown = [
        text,
        metrics,
        *(repr(result) for result in results.values()),
        *(repr(result) for result in on_topic),
        *(value.decode(errors="replace") for value in cached if value is not None),
        repr(secure.producer_settings()),
        str(secure.producer_settings()),
        repr(secure.deployment.worker_settings(**secure.worker_overrides())),
    ]
    for secret in PLANTED:
        for place, content in enumerate(shown):
            assert secret not in content, f"a planted secret reached shown[{place}]"
