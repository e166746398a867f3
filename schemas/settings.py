"""Connection settings shared by workers and producers.

They are plain pydantic models nested inside each side's `BaseSettings` class,
so `INFERQ_KAFKA__BOOTSTRAP_SERVERS` sets `settings.kafka.bootstrap_servers`.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from schemas.topics import DEFAULT_PREFIX

SECRETS_DIR = Path("/run/secrets")
"""Where settings look for secret files (a Kubernetes Secret or Compose secret mounted as
files), one per variable: `/run/secrets/INFERQ_KAFKA__SASL_PASSWORD` holds that setting."""


class InferqSettings(BaseSettings):
    """Base of each side's settings: ``INFERQ_*`` variables, then secret files.

    A file in `SECRETS_DIR` named like a variable (``INFERQ_REDIS__PASSWORD``, any case) sets
    it when the variable itself is unset; tests and tools pass ``_secrets_dir=`` for another.
    """

    model_config = SettingsConfigDict(
        env_prefix="INFERQ_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
        secrets_dir=SECRETS_DIR,
        secrets_dir_missing="ok",
        hide_input_in_errors=True,  # a refused setting's error must not quote a secret
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The plain secrets source reads top-level fields only; the nested one reads
        # `INFERQ_KAFKA__SASL_PASSWORD` into `kafka.sasl_password` as the env source does.
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            NestedSecretsSettingsSource(file_secret_settings),
        )


class SecurityProtocol(StrEnum):
    """How a client talks to the brokers: plain or TLS, with or without SASL."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"

    @property
    def uses_sasl(self) -> bool:
        return self in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL)

    @property
    def uses_tls(self) -> bool:
        return self in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)


class SaslMechanism(StrEnum):
    """The SASL mechanisms inferq supports (username and password)."""

    SCRAM_SHA_512 = "SCRAM-SHA-512"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    PLAIN = "PLAIN"


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

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
    security_protocol: SecurityProtocol = Field(
        default=SecurityProtocol.PLAINTEXT,
        description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
    )
    sasl_mechanism: SaslMechanism = Field(
        default=SaslMechanism.SCRAM_SHA_512,
        description="SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN (with a SASL_* protocol).",
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password.")
    ssl_cafile: Path | None = Field(
        default=None,
        description="PEM file of the CAs trusted to sign the brokers' certificates; "
        "None: the system's trust store.",
    )
    ssl_certfile: Path | None = Field(
        default=None, description="PEM client certificate, for brokers that require mTLS."
    )
    ssl_keyfile: Path | None = Field(default=None, description="PEM key of ssl_certfile.")
    ssl_keyfile_password: SecretStr | None = Field(
        default=None, description="Password of an encrypted ssl_keyfile."
    )
    ssl_check_hostname: bool = Field(
        default=True, description="Check that a broker's certificate names its host."
    )

    @model_validator(mode="after")
    def _sasl_has_credentials(self) -> KafkaSettings:
        if self.security_protocol.uses_sasl and (
            not self.sasl_username or self.sasl_password is None
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol.value} needs sasl_username "
                "and sasl_password"
            )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile: give ssl_certfile too")
        return self


class RedisSettings(BaseModel):
    """How to reach Redis, where results are cached."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

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
    username: str | None = Field(
        default=None, description="ACL user name; None: the one in the URL, else `default`."
    )
    password: SecretStr | None = Field(
        default=None, description="Password (of `username`); None: the one in the URL, if any."
    )
    ssl_ca_certs: Path | None = Field(
        default=None,
        description="PEM file of the CAs trusted to sign the server's certificate (rediss://); "
        "None: the system's trust store.",
    )
    ssl_certfile: Path | None = Field(
        default=None, description="PEM client certificate, for a server that requires mTLS."
    )
    ssl_keyfile: Path | None = Field(default=None, description="PEM key of ssl_certfile.")
    ssl_check_hostname: bool = Field(
        default=True, description="Check that the server's certificate names its host."
    )

    @model_validator(mode="after")
    def _cluster_uses_database_zero(self) -> RedisSettings:
        database = urlsplit(self.url).path.strip("/")
        if self.cluster and database not in ("", "0"):
            raise ValueError(f"url: a Redis Cluster has database 0 only, not {database!r}")
        return self

    @property
    def redacted_url(self) -> str:
        """`url` with any password in it replaced by `***`: the form to log or show."""
        return redact_url(self.url)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "url" else value


def redact_url(url: str) -> str:
    """``url`` with the password of its user-info part replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
