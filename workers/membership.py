"""Consumer-group membership: static member ids, and leaving the group on a clean stop."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer

from workers.settings import WorkerSettings


def group_instance_id(settings: WorkerSettings) -> str | None:
    """The static member id this worker joins with, or None for dynamic membership."""
    return settings.group_instance_id if settings.static_membership else None


async def leave_group(consumer: AIOKafkaConsumer) -> None:
    """Stop ``consumer`` and leave its group, so its partitions move at once."""
    await consumer.stop()
