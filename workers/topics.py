"""Creating the topics a worker uses, when the cluster does not have them yet."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas.settings import KafkaSettings

log = structlog.get_logger(__name__)


async def ensure_topics(
    kafka: KafkaSettings, names: Sequence[str], *, partitions: int, replication_factor: int
) -> None:
    """Create each missing topic with ``partitions`` partitions; existing ones are untouched."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id=kafka.client_id,
        request_timeout_ms=kafka.request_timeout_ms,
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in dict.fromkeys(names) if name not in existing]
        for name in missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name=name,
                            num_partitions=partitions,
                            replication_factor=replication_factor,
                        )
                    ]
                )
                log.info("topic_created", topic=name, partitions=partitions)
            except TopicAlreadyExistsError:
                pass  # created by another worker meanwhile
    finally:
        await admin.close()
