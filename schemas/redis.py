"""The Redis client of workers and producers: one server, or a Redis Cluster.

`connect` builds it from `RedisSettings`, the one place either side does. On a cluster a
command's keys must all lie in one hash slot: a result key and its digest key share one
(the digest key's hash tag is the result key, `TopicNames.digest_key`), and reads and
writes of many ids are split by slot (`slot_groups`, `mget`).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.asyncio.connection as redis_connection
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.settings import RedisSettings

RedisClient: TypeAlias = aioredis.Redis | RedisCluster
"""A client of one Redis server or of a Redis Cluster (`RedisSettings.cluster`)."""

REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterError,  # CLUSTERDOWN, MASTERDOWN: a failover under way
    TryAgainError,  # TRYAGAIN: a slot is being migrated
    AskError,  # MOVED or ASK still, once redis-py's own redirections ran out
    RedisClusterException,  # no node reachable, a slot not covered (yet)
)
"""Errors that say Redis cannot answer now, not that it refuses the command: retry them.
Several of them are `ResponseError`s: catch these first, or ask `is_refusal`."""

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, *REDIS_UNAVAILABLE)
"""Everything a Redis command may raise (a cluster's own errors are not all `RedisError`s),
but for a torn connection (`is_unavailable`)."""

_CONNECTION_MODULE = str(Path(redis_connection.__file__).resolve())


ACCESS_REFUSED: tuple[type[Exception], ...] = (
    AuthenticationError,  # WRONGPASS, or a password where none is set
    AuthorizationError,
    NoPermissionError,  # NOPERM: the ACL denies the command or the key
)
"""Errors that say Redis refuses who we are or what we may do (several are connection errors
in redis-py): not unavailable, so never waited out as if it were down."""


def is_unavailable(error: BaseException) -> bool:
    """Whether Redis could not answer now (down, timed out, failing over, moving a slot, a
    connection torn under the command): the same command may succeed later. A refused
    password or permission is not."""
    if isinstance(error, ACCESS_REFUSED):
        return False
    return isinstance(error, REDIS_UNAVAILABLE) or _torn_connection(error)


def is_refusal(error: BaseException) -> bool:
    """Whether Redis refused the command itself (a key of another type, keys in several
    slots), so that sending the same again cannot help; False when it could not answer."""
    return isinstance(error, ResponseError) and not isinstance(error, REDIS_UNAVAILABLE)


def is_redis_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from Redis or its client (a refusal, or unavailable), rather
    than from a bug of ours."""
    return isinstance(error, REDIS_ERRORS) or _torn_connection(error)


def _torn_connection(error: BaseException) -> bool:
    """An AttributeError or TypeError raised under redis-py's asyncio connection I/O: what it
    lets out when a connection is closed under a command in flight, by the peer or by the
    cluster client itself, which closes every connection after CLUSTERDOWN (redis-py issues
    3546 and 4287); the connection is opened again on its next use."""
    if not isinstance(error, AttributeError | TypeError):
        return False
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == _CONNECTION_MODULE:
            return True
        frame = frame.tb_next
    return False


def connect(settings: RedisSettings) -> RedisClient:
    """A client for ``settings.url``: a `RedisCluster` that discovers the other nodes when
    ``settings.cluster``, else a plain `Redis`. Connects on its first command.

    ``username`` and ``password`` are used unless the URL names its own; a ``rediss://`` URL
    connects with TLS, trusting ``ssl_ca_certs`` (and presenting ``ssl_certfile`` if given).
    """
    options = client_options(settings)
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **options)
    return aioredis.Redis.from_url(settings.url, **options)


def client_options(settings: RedisSettings) -> dict[str, Any]:
    """The keyword arguments `connect` gives redis-py besides the URL."""
    timeout_s = settings.socket_timeout_s
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if settings.username is not None:
        options["username"] = settings.username
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if urlsplit(settings.url).scheme == "rediss":
        options |= {
            "ssl_ca_certs": None if settings.ssl_ca_certs is None else str(settings.ssl_ca_certs),
            "ssl_certfile": None if settings.ssl_certfile is None else str(settings.ssl_certfile),
            "ssl_keyfile": None if settings.ssl_keyfile is None else str(settings.ssl_keyfile),
            "ssl_check_hostname": settings.ssl_check_hostname,
        }
    return options


class RedisAccessError(ConnectionError):
    """Redis answers but refuses us: a wrong user or password, a user the ACL does not let
    run a command the worker needs, or a TLS handshake that failed; retrying cannot help."""

    retriable = False


async def check_access(client: RedisClient, *, url: str) -> None:
    """Raise `RedisAccessError` if Redis refuses our credentials or TLS handshake (one PING).

    url: for the message (give `RedisSettings.redacted_url`). A Redis that does not answer
    (down, timed out) is no refusal: then this returns, and readiness reports it.
    """
    try:
        await client.ping()
    except ACCESS_REFUSED as error:
        raise RedisAccessError(f"Redis at {url} refused us: {error}") from error
    except (RedisConnectionError, OSError) as error:
        cause = error.__cause__ or error.__context__
        if isinstance(error, ssl.SSLError) or isinstance(cause, ssl.SSLError):
            raise RedisAccessError(f"Redis at {url}: TLS handshake failed: {error}") from error


async def mget(client: RedisClient, keys: Sequence[str]) -> list[bytes | None]:
    """The values of ``keys`` in their order; one MGET, or one per hash slot on a cluster
    (pipelined: one round trip per node). Not atomic across slots."""
    if not keys:
        return []
    if isinstance(client, RedisCluster):
        values = await client.mget_nonatomic(list(keys))
    else:
        values = await client.mget(keys)
    return [value.encode() if isinstance(value, str) else value for value in values]


def slot_groups(keys: Sequence[str]) -> list[list[int]]:
    """The positions of ``keys`` grouped by Redis Cluster hash slot (hash tags honoured),
    groups in order of their first key, positions ascending within each."""
    groups: dict[int, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode()), []).append(position)
    return list(groups.values())
