"""How workers and producers connect to Kafka: the one place their clients' options are built.

`client_options` turns `KafkaSettings` into the keyword arguments every `AIOKafkaConsumer`,
`AIOKafkaProducer` and `AIOKafkaAdminClient` of inferq is built with (brokers, timeout, TLS,
SASL). aiokafka only logs why it could not bootstrap; `check_access` opens one connection
itself so that a refused password or an untrusted certificate becomes `KafkaAccessError`.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from schemas.settings import KafkaSettings

_REFUSALS: tuple[type[BaseException], ...] = (
    SaslAuthenticationFailed,
    AuthenticationFailedError,
    IllegalSaslStateError,
    UnsupportedSaslMechanismError,
    ssl.SSLError,  # SSLCertVerificationError among them: a certificate we do not trust
)


class KafkaAccessError(ConnectionError):
    """The brokers answer but refuse us: wrong SASL credentials or mechanism, or a TLS
    handshake that failed (an untrusted certificate); retrying the same cannot help."""

    retriable = False

    def __init__(self, message: str, *, reason: str) -> None:
        """reason: `authentication` or `tls`."""
        super().__init__(message)
        self.reason = reason


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of an SSL or SASL_SSL connection; None for a plain one."""
    if not settings.security_protocol.uses_tls:
        return None
    password = settings.ssl_keyfile_password
    context: ssl.SSLContext = create_ssl_context(
        cafile=settings.ssl_cafile,
        certfile=settings.ssl_certfile,
        keyfile=settings.ssl_keyfile,
        password=None if password is None else password.get_secret_value(),
    )
    context.check_hostname = settings.ssl_check_hostname
    return context


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client: brokers, request timeout, TLS and SASL.

    The caller adds its own (`client_id`, group, batching); none of these overlap them.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "request_timeout_ms": settings.request_timeout_ms,
        "security_protocol": settings.security_protocol.value,
        "ssl_context": ssl_context(settings),
    }
    if settings.security_protocol.uses_sasl:
        assert settings.sasl_password is not None  # KafkaSettings refuses SASL without one
        options |= {
            "sasl_mechanism": settings.sasl_mechanism.value,
            "sasl_plain_username": settings.sasl_username,
            "sasl_plain_password": settings.sasl_password.get_secret_value(),
        }
    return options


async def check_access(settings: KafkaSettings) -> None:
    """Raise `KafkaAccessError` when a broker refuses our credentials or TLS handshake.

    Opens one connection (handshake and SASL included) to each bootstrap server in turn until
    one is accepted; a server that does not answer at all is no refusal, and is left to the
    caller's own error. Call it when a client failed to start, to say why.
    """
    options = client_options(settings)
    timeout_s = settings.request_timeout_ms / 1000
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            connection = await asyncio.wait_for(
                create_conn(
                    host.strip("[]"),
                    int(port),
                    request_timeout_ms=settings.request_timeout_ms,
                    ssl_context=options["ssl_context"],
                    security_protocol=options["security_protocol"],
                    sasl_mechanism=options.get("sasl_mechanism"),
                    sasl_plain_username=options.get("sasl_plain_username"),
                    sasl_plain_password=options.get("sasl_plain_password"),
                ),
                timeout_s,
            )
        except _REFUSALS as error:
            reason = "tls" if isinstance(error, ssl.SSLError) else "authentication"
            what = (
                "TLS handshake failed (is the broker's CA in ssl_cafile?)"
                if reason == "tls"
                else f"SASL {settings.sasl_mechanism.value} authentication of user "
                f"{settings.sasl_username!r} failed"
            )
            raise KafkaAccessError(
                f"Kafka at {server.strip()} refused the connection: {what}: {error}",
                reason=reason,
            ) from error
        except (OSError, TimeoutError, KafkaError):
            continue  # not answering (or an error that is no refusal): the caller's error
        connection.close()
        return
