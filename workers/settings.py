"""Worker configuration: one pydantic-settings class, read from ``INFERQ_*`` variables."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, field_validator

from schemas.names import is_model_name
from schemas.settings import InferqSettings, KafkaSettings, RedisSettings
from schemas.topics import TopicNames


def default_worker_id() -> str:
    """``{hostname}-{pid}``: unique per process, readable in results and logs."""
    return f"{socket.gethostname()}-{os.getpid()}"


def comma_list(value: str) -> list[str]:
    """The non-empty items of a comma-separated setting, stripped."""
    return [item.strip() for item in value.split(",") if item.strip()]


class WorkerSettings(InferqSettings):
    """Everything a worker process needs; nested fields use ``__`` (``INFERQ_KAFKA__...``)."""

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)

    group_id: str = Field(default="inferq-workers", description="Kafka consumer group.")
    models_dir: Path = Field(default=Path("models"), description="Model repository root.")
    served_models: str = Field(
        default="", description="Comma-separated model names to serve; empty: all in models_dir."
    )
    model_poll_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="How often the model repository is scanned for new, changed or removed "
        "versions; 0: only on SIGHUP.",
    )
    create_topics: bool = Field(
        default=True, description="Create missing request, result and dead-letter topics."
    )
    topic_partitions: int = Field(
        default=8, ge=1, description="Partitions of the topics the worker creates."
    )
    topic_replication_factor: int = Field(
        default=1, ge=1, description="Replicas of each topic the worker creates."
    )
    topic_retention_ms: int | None = Field(
        default=None, ge=1, description="retention.ms of the topics created; None: the broker's."
    )
    device: str = Field(default="auto", description="cpu, cuda, cuda:N or auto.")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch.set_num_threads for the runner thread."
    )
    max_in_flight: int = Field(
        default=4096, ge=1, description="Requests consumed but not yet answered; then pause."
    )
    max_in_flight_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="Record bytes consumed but not yet answered; then pause.",
    )
    fetch_max_records: int = Field(
        default=1024, ge=1, description="Most records taken from Kafka in one poll."
    )
    fetch_max_wait_ms: int = Field(
        default=10,
        ge=0,
        le=60_000,
        description="Longest the broker holds a fetch with no data for us (latency when idle).",
    )
    commit_interval_ms: int = Field(
        default=200, ge=1, description="How often completed offsets are committed."
    )
    exactly_once: bool = Field(
        default=False,
        description="Kafka transactions: each write group's result records and the offsets "
        "they complete commit atomically (see docs/architecture.md).",
    )
    transaction_timeout_ms: int = Field(
        default=60_000,
        ge=1000,
        description="With exactly_once: how long the broker lets a transaction stay open "
        "before aborting it (a worker that died without a successor of the same id).",
    )
    session_timeout_ms: int = Field(
        default=10_000, ge=1000, description="Consumer group session timeout."
    )
    static_membership: bool = Field(
        default=True,
        description="Supervised children join the group as static members (KIP-345).",
    )
    group_instance_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]{1,200}$",
        description="Static member id; None: dynamic membership (the CLI sets one per child).",
    )
    reply_topic_prefixes: str = Field(
        default="",
        description="Comma-separated prefixes a reply_to topic must start with; "
        "empty: {prefix}.replies.",
    )
    lag_interval_s: float = Field(
        default=5.0, gt=0, description="How often each partition's lag is sampled for metrics."
    )
    readiness_interval_s: float = Field(
        default=2.0, gt=0, description="How often Kafka and Redis are probed for /readyz."
    )
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest request record accepted."
    )
    shutdown_timeout_s: float = Field(
        default=30.0, gt=0, description="Bound on finishing in-flight work at SIGTERM."
    )
    write_retry_max_backoff_s: float = Field(
        default=5.0, gt=0, description="Longest pause between retries of a failed write."
    )
    http_port: int = Field(
        default=9400, ge=0, le=65535, description="Metrics and health port; 0 disables it."
    )
    worker_id: str = Field(default_factory=default_worker_id, description="Id in results and logs.")
    log_level: str = Field(default="info", description="debug, info, warning or error.")
    log_json: bool | None = Field(
        default=None, description="JSON logs; default: JSON unless stderr is a terminal."
    )

    @field_validator("served_models")
    @classmethod
    def _served_models_are_model_names(cls, value: str) -> str:
        for name in comma_list(value):
            if not is_model_name(name):
                raise ValueError(f"{name!r} is not a model name: it cannot name a path")
        return value

    @property
    def reply_topic_prefix_list(self) -> list[str]:
        """The prefixes a request's ``reply_to`` may start with."""
        return comma_list(self.reply_topic_prefixes) or [
            TopicNames(prefix=self.kafka.topic_prefix).reply_prefix
        ]

    @property
    def transactional_id(self) -> str:
        """The Kafka transactional id of this worker's producer (with `exactly_once`).

        Stable across restarts of the same static member (`group_instance_id`), so a
        restarted worker fences its predecessor and aborts its open transaction at once;
        a dynamic member has only its `worker_id`, new for every process.
        """
        member = self.group_instance_id if self.static_membership else None
        return f"{self.group_id}.{member or self.worker_id}"

    @property
    def served_model_names(self) -> list[str] | None:
        """The configured model names, or None for every model in the repository."""
        return comma_list(self.served_models) or None
