"""Consumer-group membership: static member ids, and leaving the group on a clean stop.

A static member (KIP-345, ``group_instance_id``) keeps its partitions across a restart: the
broker hands them back to the next process with the same id at once, without a rebalance.
aiokafka therefore sends no LeaveGroup when a static member stops, so on a *clean* stop the
group would leave that member's partitions idle for a whole session timeout. `leave_group`
removes the member explicitly by its instance id (LeaveGroup v3+, as Kafka's admin
``removeMembersFromConsumerGroup`` does) so that the others take its partitions at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.client import ConnectionGroup, CoordinationType
from aiokafka.errors import for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Int16, Int32, Schema, String

from workers.settings import WorkerSettings

log = structlog.get_logger(__name__)

LEAVE_GROUP_TIMEOUT_S = 5.0
"""Bound on finding the coordinator and sending it the LeaveGroup of a static member."""

_LEAVE_GROUP_API_KEY = 13
_UNKNOWN_MEMBER_ID = ""
_NO_ERROR = 0


def group_instance_id(settings: WorkerSettings) -> str | None:
    """The static member id this worker joins with, or None for dynamic membership."""
    return settings.group_instance_id if settings.static_membership else None


async def leave_group(
    consumer: AIOKafkaConsumer, *, timeout_s: float = LEAVE_GROUP_TIMEOUT_S
) -> None:
    """Stop ``consumer`` and leave its group, so its partitions move to the others at once.

    A dynamic member leaves through ``consumer.stop()``. A static member's coordinator is
    closed first (no heartbeat or rejoin can follow the leave), then the member is removed by
    instance id within ``timeout_s`` seconds, then the consumer stops. Never raises: a leave
    that fails is logged, and the group then frees the partitions after the session timeout.
    """
    member = _static_member(consumer)
    try:
        if member is not None:
            await _leave_as_static_member(consumer, member, timeout_s)
    finally:
        try:
            await consumer.stop()
        except Exception as exc:
            log.warning("consumer_stop_failed", error=repr(exc))


@dataclass(frozen=True, slots=True)
class _StaticMember:
    group_id: str
    group_instance_id: str
    member_id: str


def _static_member(consumer: AIOKafkaConsumer) -> _StaticMember | None:
    """Who ``consumer`` is in its group, read before closing resets it; None unless static."""
    # aiokafka keeps these on its private coordinator; nothing public exposes the member id.
    coordinator: Any = getattr(consumer, "_coordinator", None)
    instance_id = getattr(coordinator, "_group_instance_id", None)
    if coordinator is None or not instance_id:
        return None
    return _StaticMember(
        group_id=str(coordinator.group_id),
        group_instance_id=str(instance_id),
        member_id=str(coordinator.member_id or _UNKNOWN_MEMBER_ID),
    )


async def _leave_as_static_member(
    consumer: AIOKafkaConsumer, member: _StaticMember, timeout_s: float
) -> None:
    coordinator: Any = consumer._coordinator
    client: Any = consumer._client
    try:
        # Stops the heartbeat and coordination tasks; the client stays open for the request.
        await coordinator.close()
        async with asyncio.timeout(timeout_s):
            node_id = coordinator.coordinator_id
            if node_id is None:
                node_id = await client.coordinator_lookup(CoordinationType.GROUP, member.group_id)
            response = await client.send(
                node_id, _LeaveGroupRequest(member), group=ConnectionGroup.COORDINATION
            )
    except Exception as exc:  # includes TimeoutError, and brokers older than LeaveGroup v3
        log.warning(
            "leave_group_failed",
            group=member.group_id,
            group_instance_id=member.group_instance_id,
            error=repr(exc),
        )
        return
    errors = [response.error_code, *(error for _, _, error in response.members)]
    failed = [code for code in errors if code != _NO_ERROR]
    if failed:
        log.warning(
            "leave_group_refused",
            group=member.group_id,
            group_instance_id=member.group_instance_id,
            member_id=member.member_id,
            error=for_code(failed[0]).__name__,
            error_code=failed[0],
        )
    else:
        log.info("left_group", group=member.group_id, group_instance_id=member.group_instance_id)


# LeaveGroup v3 (Kafka 2.4+) names the members to remove with their group instance ids;
# aiokafka's protocol module only has v0 and v1, which take a single member id.
class _LeaveGroupResponseV3(Response):  # type: ignore[misc]
    API_KEY = _LEAVE_GROUP_API_KEY
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        (
            "members",
            Array(
                ("member_id", String("utf-8")),
                ("group_instance_id", String("utf-8")),
                ("error_code", Int16),
            ),
        ),
    )


class _LeaveGroupRequestV3(RequestStruct):  # type: ignore[misc]
    API_KEY = _LEAVE_GROUP_API_KEY
    API_VERSION = 3
    RESPONSE_TYPE = _LeaveGroupResponseV3
    SCHEMA = Schema(
        ("group", String("utf-8")),
        ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")))),
    )


class _LeaveGroupRequest(Request[_LeaveGroupRequestV3]):  # type: ignore[misc]
    """A LeaveGroup removing one static member; the client picks v3 from the broker's range."""

    API_KEY = _LEAVE_GROUP_API_KEY

    def __init__(self, member: _StaticMember) -> None:
        self._member = member

    def build(self, request_struct_class: type[_LeaveGroupRequestV3]) -> _LeaveGroupRequestV3:
        member = self._member
        return request_struct_class(member.group_id, [(member.member_id, member.group_instance_id)])
