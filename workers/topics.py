"""The topics of a deployment: creating those missing, and finding how others drift."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from schemas.kafka import client_options
from schemas.settings import KafkaSettings
from schemas.topics import TopicNames, raise_topic_errors

log = structlog.get_logger(__name__)


async def ensure_topics(
    kafka: KafkaSettings,
    names: Sequence[str],
    *,
    partitions: int,
    replication_factor: int,
    retention_ms: int | None = None,
) -> None:
    """Create each missing topic with ``partitions`` partitions; existing ones are untouched."""
    admin = AIOKafkaAdminClient(**client_options(kafka), client_id=kafka.client_id)
    await admin.start()
    try:
        specs = [TopicSpec(name, partitions, replication_factor, retention_ms)
                 for name in dict.fromkeys(names)]  # fmt: skip
        await create_missing(admin, specs)
    finally:
        await admin.close()


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic as the deployment wants it."""

    name: str
    partitions: int
    replication_factor: int
    retention_ms: int | None = None
    """`retention.ms`; None leaves the broker's default."""


@dataclass(frozen=True, slots=True)
class TopicDrift:
    """One way an existing topic differs from its spec."""

    topic: str
    what: str
    wanted: str
    actual: str


def deployment_topics(
    topics: TopicNames,
    models: Sequence[str],
    *,
    partitions: int,
    replication_factor: int,
    retention_ms: int | None = None,
) -> list[TopicSpec]:
    """The request and result topics of ``models``, and the dead-letter topic."""
    names = [name for model in models for name in (topics.requests(model), topics.results(model))]
    return [
        TopicSpec(name, partitions, replication_factor, retention_ms)
        for name in [*names, topics.dead_letters]
    ]


async def inspect_topics(
    admin: AIOKafkaAdminClient, specs: Sequence[TopicSpec]
) -> tuple[list[TopicSpec], list[TopicDrift]]:
    """The specs whose topic is missing, and how the existing ones differ from theirs."""
    existing = set(await admin.list_topics())
    missing = [spec for spec in specs if spec.name not in existing]
    present = [spec for spec in specs if spec.name in existing]
    if not present:
        return missing, []
    described = {t["topic"]: t for t in await admin.describe_topics([s.name for s in present])}
    retention = await _retention_of(admin, [s.name for s in present if s.retention_ms is not None])
    drift: list[TopicDrift] = []
    for spec in present:
        partitions = described[spec.name]["partitions"]
        if len(partitions) != spec.partitions:
            drift.append(TopicDrift(spec.name, "partitions", str(spec.partitions),
                                    str(len(partitions))))  # fmt: skip
        replicas = {len(p["replicas"]) for p in partitions}
        if replicas != {spec.replication_factor}:
            drift.append(TopicDrift(spec.name, "replication factor", str(spec.replication_factor),
                                    ",".join(map(str, sorted(replicas)))))  # fmt: skip
        if spec.retention_ms is not None and retention.get(spec.name) != str(spec.retention_ms):
            drift.append(TopicDrift(spec.name, "retention.ms", str(spec.retention_ms),
                                    str(retention.get(spec.name))))  # fmt: skip
    return missing, drift


async def create_missing(admin: AIOKafkaAdminClient, specs: Sequence[TopicSpec]) -> list[str]:
    """Create the topics of ``specs`` that do not exist; returns those created."""
    existing = set(await admin.list_topics())
    created = []
    for spec in specs:
        if spec.name in existing:
            continue
        configs = {} if spec.retention_ms is None else {"retention.ms": str(spec.retention_ms)}
        try:
            response = await admin.create_topics([NewTopic(
                name=spec.name, num_partitions=spec.partitions,
                replication_factor=spec.replication_factor, topic_configs=configs,
            )])  # fmt: skip
            if not raise_topic_errors(response):
                continue
        except TopicAlreadyExistsError:
            continue
        created.append(spec.name)
        log.info("topic_created", topic=spec.name, partitions=spec.partitions)
    return created


async def _retention_of(admin: AIOKafkaAdminClient, names: Sequence[str]) -> dict[str, str]:
    if not names:
        return {}
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, configs={"retention.ms": None})
        for name in names
    ]
    values: dict[str, str] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.resources:
            name, entries = resource[3], resource[4]
            for entry in entries:
                if entry[0] == "retention.ms" and entry[1] is not None:
                    values[name] = str(entry[1])
    return values
