"""Connection settings shared by workers and producers.

They are plain pydantic models nested inside each side's `BaseSettings` class,
so `INFERQ_KAFKA__BOOTSTRAP_SERVERS` sets `settings.kafka.bootstrap_servers`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.topics import DEFAULT_PREFIX


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated host:port list of brokers."
    )
    client_id: str = Field(default="inferq", description="Client id reported to the brokers.")
    topic_prefix: str = Field(
        default=DEFAULT_PREFIX,
        pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description="Prefix of every inferq topic and Redis key.",
    )
    request_timeout_ms: int = Field(
        default=30_000, gt=0, description="Timeout of one Kafka request, in milliseconds."
    )


class RedisSettings(BaseModel):
    """How to reach Redis, where results are cached."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        pattern=r"^rediss?://",
        description="Redis DSN (redis:// or rediss://).",
    )
    result_ttl_s: int = Field(
        default=3600, gt=0, description="Lifetime of a cached result, in seconds."
    )
    socket_timeout_s: float = Field(
        default=5.0, gt=0, description="Timeout of one Redis command, in seconds."
    )
