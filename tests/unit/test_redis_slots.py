"""Redis Cluster without a cluster: hash slots, the keys that must share one, the client choice,
and which errors are retried rather than taken as a refusal."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
import redis.asyncio.connection as redis_connection
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterCrossSlotError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.redis import (
    REDIS_ERRORS,
    connect,
    is_redis_failure,
    is_refusal,
    is_unavailable,
    slot_groups,
)
from schemas.settings import RedisSettings
from schemas.topics import TopicNames


def test_keys_are_grouped_by_slot_in_order_of_first_appearance() -> None:
    keys = ["{a}:1", "{b}:1", "{a}:2", "plain", "{b}:2", "{a}:3"]
    assert slot_groups(keys) == [[0, 2, 5], [1, 4], [3]]


def test_every_key_of_a_group_is_in_its_slot_and_every_position_is_in_one_group() -> None:
    keys = [f"inferq:result:req-{i}" for i in range(2000)]
    groups = slot_groups(keys)
    assert sorted(p for group in groups for p in group) == list(range(len(keys)))
    slots = [{key_slot(keys[p].encode()) for p in group} for group in groups]
    assert all(len(s) == 1 for s in slots), "one slot per group"
    assert len({next(iter(s)) for s in slots}) == len(groups), "one group per slot"
    assert len(groups) > 1500, "distinct ids spread over many slots"


def test_no_keys_no_groups() -> None:
    assert slot_groups([]) == []


def test_slots_follow_redis_own_hashing() -> None:
    # The examples of the Redis Cluster specification.
    assert slot_groups(["foo", "{user1000}.following", "{user1000}.followers"]) == [[0], [1, 2]]
    assert key_slot(b"foo") == 12182


@pytest.mark.parametrize("request_id", ["req-1", "a.b:c-d_e", "x" * 128, "{", "0"])
def test_a_digest_key_shares_its_result_keys_slot(request_id: str) -> None:
    topics = TopicNames(prefix="inferq")
    result_key, digest_key = topics.result_key(request_id), topics.digest_key(request_id)
    assert result_key == f"inferq:result:{request_id}", "the documented result key is unchanged"
    if "{" not in request_id:
        assert key_slot(digest_key.encode()) == key_slot(result_key.encode())
    assert digest_key != result_key


def test_the_digest_key_is_documented() -> None:
    assert TopicNames(prefix="p").digest_key("id-7") == "p:digest:{p:result:id-7}"


def test_a_cluster_has_database_zero_only() -> None:
    assert RedisSettings(url="redis://node:7000", cluster=True).cluster
    assert RedisSettings(url="redis://node:7000/0", cluster=True).cluster
    assert RedisSettings(url="redis://node:6379/3").url.endswith("/3")
    with pytest.raises(ValidationError, match="database 0 only"):
        RedisSettings(url="redis://node:7000/3", cluster=True)


def test_a_single_server_is_the_default() -> None:
    assert RedisSettings().cluster is False


async def test_the_cluster_setting_chooses_the_client() -> None:
    single = connect(RedisSettings(url="redis://127.0.0.1:1/0", socket_timeout_s=2.5))
    cluster = connect(RedisSettings(url="redis://127.0.0.1:1/0", cluster=True))
    try:
        assert isinstance(single, aioredis.Redis)
        assert single.connection_pool.connection_kwargs["socket_timeout"] == 2.5
        assert isinstance(cluster, RedisCluster), "a cluster client, connected on first use"
    finally:
        await single.aclose()
        await cluster.aclose()


@pytest.mark.parametrize(
    "error",
    [
        ClusterDownError("CLUSTERDOWN The cluster is down"),
        MasterDownError("MASTERDOWN Link with MASTER is down"),
        TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
        MovedError("3999 127.0.0.1:6381"),
        AskError("3999 127.0.0.1:6381"),
        SlotNotCoveredError("Slot 12 is not covered by the cluster."),
        RedisClusterException("Redis Cluster cannot be connected."),
        RedisConnectionError("Connection refused"),
        RedisTimeoutError("Timeout reading from socket"),
        OSError("Network is unreachable"),
    ],
    ids=type,
)
def test_a_cluster_that_cannot_answer_now_is_retried_not_refused(error: Exception) -> None:
    assert isinstance(error, REDIS_ERRORS)
    assert is_redis_failure(error), "caught by the write path"
    assert is_unavailable(error)
    assert not is_refusal(error)


@pytest.mark.parametrize(
    "error",
    [
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        ClusterCrossSlotError("CROSSSLOT Keys in request don't hash to the same slot"),
        NoScriptError("NOSCRIPT No matching script."),
    ],
    ids=type,
)
def test_a_command_redis_refuses_is_a_refusal(error: Exception) -> None:
    assert is_redis_failure(error)
    assert is_refusal(error)
    assert not is_unavailable(error)


def raised_in(filename: str, error_type: type[Exception]) -> Exception:
    """An ``error_type`` whose traceback runs through code compiled as ``filename``."""
    namespace: dict[str, object] = {}
    source = f"def fail():\n    raise {error_type.__name__}('x')\n"
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102
    try:
        namespace["fail"]()  # type: ignore[operator]
    except error_type as error:
        return error
    raise AssertionError("fail() did not raise")


@pytest.mark.parametrize("error_type", [AttributeError, TypeError])
def test_a_connection_torn_under_a_command_is_retried(error_type: type[Exception]) -> None:
    # redis-py lets `'NoneType' object has no attribute 'writelines'` out of its connection
    # when the cluster client closes the connections of a command in flight.
    torn = raised_in(redis_connection.__file__, error_type)
    assert is_unavailable(torn)
    assert is_redis_failure(torn)
    assert not is_refusal(torn)


@pytest.mark.parametrize("error_type", [AttributeError, TypeError, KeyError])
def test_our_own_bugs_are_not_taken_for_redis(error_type: type[Exception]) -> None:
    ours = raised_in(__file__, error_type)
    assert not is_unavailable(ours)
    assert not is_redis_failure(ours)
