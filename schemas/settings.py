"""Connection settings shared by workers and producers.

They are plain pydantic models nested inside each side's `BaseSettings` class,
so `INFERQ_KAFKA__BOOTSTRAP_SERVERS` sets `settings.kafka.bootstrap_servers`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
        description="Redis DSN (redis:// or rediss://); with `cluster`, of any cluster node.",
    )
    cluster: bool = Field(
        default=False,
        description="`url` names a node of a Redis Cluster: the other nodes are discovered from "
        "it, and each write or read of many ids goes one command per hash slot.",
    )
    result_ttl_s: int = Field(
        default=3600, gt=0, description="Lifetime of a cached result, in seconds."
    )
    socket_timeout_s: float = Field(
        default=5.0, gt=0, description="Timeout of one Redis command, in seconds."
    )

    @model_validator(mode="after")
    def _cluster_uses_database_zero(self) -> RedisSettings:
        database = urlsplit(self.url).path.strip("/")
        if self.cluster and database not in ("", "0"):
            raise ValueError(f"url: a Redis Cluster has database 0 only, not {database!r}")
        return self
