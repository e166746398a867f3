"""Producer-side configuration, read from ``INFERQ_*`` variables."""

from __future__ import annotations

from pydantic import Field

from schemas.codec import ContentType
from schemas.settings import InferqSettings, KafkaSettings, RedisSettings


class ProducerSettings(InferqSettings):
    """How producers reach Kafka and Redis and how they encode requests."""

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    content_type: ContentType = Field(
        default=ContentType.MSGPACK, description="Encoding of published requests."
    )
    # Also the most bytes of records larger than a batch that the client has in flight at once,
    # so a produce request holds at most this much of them plus a 1 MiB batch per partition:
    # keep it well below the broker's `socket.request.max.bytes` (100 MiB by default), or the
    # broker drops the request and aiokafka retries it forever.
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Largest request record sent, bytes; stay below the broker's "
        "socket.request.max.bytes.",
    )
    linger_ms: int = Field(default=5, ge=0, description="Producer batching delay, ms.")
    result_poll_interval_ms: int = Field(
        default=5, ge=1, description="How often a waiting client polls Redis for its result."
    )
    reply_topic: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]{0,249}$",
        description="The topic infer() reads its results from (created if missing); empty: "
        "{prefix}.replies.{host}-{pid}-{random}, one per client.",
    )
    reply_topic_partitions: int = Field(
        default=4, ge=1, description="Partitions of a reply topic the client creates."
    )
    reply_sweep_s: float = Field(
        default=1.0,
        gt=0,
        description="How long an infer() call waits on the reply topic before Redis is "
        "checked for its result too (one MGET for all such calls), seconds.",
    )
    result_topic_fallback_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a submitted request's result may be missing from Redis before "
        "the client also looks for it on its result topic, seconds.",
    )
