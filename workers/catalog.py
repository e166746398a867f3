"""What the cluster says about the topics answers go to: whether each exists, and the
largest record batch it accepts (`max.message.bytes`).

Read with DescribeConfigs, which never creates a topic; a producer's metadata request for
an unknown topic would, on a broker with `auto.create.topics.enable`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError, for_code

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = "max.message.bytes"
KNOWN_FOR_S = 60.0
"""How long a topic's limit is trusted before it is read again."""
MISSING_FOR_S = 2.0
"""How long a missing topic is taken as missing before it is looked up again."""


class ConfigReader(Protocol):
    """The part of `AIOKafkaAdminClient` the catalog uses."""

    async def describe_configs(self, config_resources: list[ConfigResource]) -> list[Any]: ...


@dataclass(frozen=True, slots=True)
class TopicLimit:
    """A topic as the cluster reported it: its record batch limit, or that it is missing."""

    max_message_bytes: int | None
    """None when the topic does not exist."""
    read_at: float

    @property
    def exists(self) -> bool:
        return self.max_message_bytes is not None


class TopicCatalog:
    """Caches, per topic, whether it exists and its `max.message.bytes`."""

    def __init__(self, *, admin: ConfigReader, clock: Callable[[], float] = time.monotonic) -> None:
        self._admin = admin
        self._clock = clock
        self._topics: dict[str, TopicLimit] = {}

    async def max_message_bytes(self, topic: str) -> int | None:
        """The largest record batch ``topic`` accepts, in bytes; None if it does not exist.

        Raises `KafkaError` when the cluster cannot be asked (the caller retries).
        """
        known = self._topics.get(topic)
        now = self._clock()
        if known is not None and now - known.read_at < (
            KNOWN_FOR_S if known.exists else MISSING_FOR_S
        ):
            return known.max_message_bytes
        limit = await self._read(topic)
        self._topics[topic] = TopicLimit(limit, now)
        return limit

    def forget(self, topic: str) -> None:
        """Read ``topic`` again on next use (after the broker refused a record as too large,
        or said the topic is unknown)."""
        self._topics.pop(topic, None)

    async def _read(self, topic: str) -> int | None:
        resource = ConfigResource(
            ConfigResourceType.TOPIC, topic, configs={MAX_MESSAGE_BYTES: None}
        )
        responses = await self._admin.describe_configs([resource])
        for response in responses:
            for error_code, message, _type, name, entries in _resources(response):
                if name != topic:
                    continue
                error = for_code(error_code)
                if error is UnknownTopicOrPartitionError:
                    return None
                if error_code:
                    raise error(f"describe configs of {topic}: {message}")
                for entry in entries:
                    if entry[0] == MAX_MESSAGE_BYTES and entry[1] is not None:
                        return int(entry[1])
        raise KafkaError(f"describe configs of {topic}: no {MAX_MESSAGE_BYTES} in the answer")


def _resources(response: Any) -> list[tuple[int, str, int, str, list[tuple[Any, ...]]]]:
    """(error code, message, type, name, entries) of each resource of a DescribeConfigs answer."""
    return [tuple(resource[:5]) for resource in response.resources]
