"""Leaving the group: a static member leaves by instance id, within a bound, without raising.

The consumer here is a stand-in with aiokafka's coordinator and client attributes; the real
broker's side is in tests/integration/test_membership.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from workers.membership import _LeaveGroupRequest, _StaticMember, leave_group

MEMBER = _StaticMember(group_id="workers", group_instance_id="host-1-0", member_id="host-1-0-ab")


@dataclass
class FakeCoordinator:
    _group_instance_id: str | None
    group_id: str = "workers"
    member_id: str = "host-1-0-ab"
    coordinator_id: int | None = 1
    closed: bool = False

    async def close(self) -> None:
        self.closed = True
        self.member_id = ""  # as aiokafka's reset_generation does


@dataclass
class FakeClient:
    answer: Any
    sent: list[tuple[int, Any]] = field(default_factory=list)

    async def send(self, node_id: int, request: Any, *, group: Any) -> Any:
        del group
        self.sent.append((node_id, request.prepare({13: (0, 5)})))
        if isinstance(self.answer, BaseException):
            raise self.answer
        if self.answer == "hang":
            await asyncio.Event().wait()
        return self.answer

    async def coordinator_lookup(self, coordinator_type: Any, key: str) -> int:
        del coordinator_type, key
        return 2


@dataclass
class FakeConsumer:
    _coordinator: FakeCoordinator
    _client: FakeClient
    stop_error: Exception | None = None
    stopped: bool = False

    async def stop(self) -> None:
        self.stopped = True
        if self.stop_error is not None:
            raise self.stop_error


@dataclass
class LeaveAnswer:
    error_code: int = 0
    members: list[tuple[str, str, int]] = field(default_factory=list)


def consumer(instance_id: str | None, answer: Any = None) -> FakeConsumer:
    return FakeConsumer(FakeCoordinator(instance_id), FakeClient(answer or LeaveAnswer()))


def test_the_request_is_leave_group_v3_naming_the_member_and_its_instance_id() -> None:
    request = _LeaveGroupRequest(MEMBER).prepare({13: (0, 5)})
    assert request.API_VERSION == 3
    assert request.to_object() == {
        "group": "workers",
        "members": [{"member_id": "host-1-0-ab", "group_instance_id": "host-1-0"}],
    }
    assert request.encode()  # serialisable as sent


def test_brokers_without_leave_group_v3_are_refused_before_sending() -> None:
    with pytest.raises(NotImplementedError):
        _LeaveGroupRequest(MEMBER).prepare({13: (0, 2)})


async def test_a_static_member_leaves_by_instance_id_with_the_member_id_it_had() -> None:
    member = consumer("host-1-0")
    await leave_group(member)  # type: ignore[arg-type]
    assert member._coordinator.closed  # no heartbeat can rejoin after the leave
    ((node_id, request),) = member._client.sent
    assert node_id == 1
    assert request.to_object()["members"] == [
        {"member_id": "host-1-0-ab", "group_instance_id": "host-1-0"}
    ]
    assert member.stopped


async def test_an_unknown_coordinator_is_looked_up() -> None:
    member = consumer("host-1-0")
    member._coordinator.coordinator_id = None
    await leave_group(member)  # type: ignore[arg-type]
    assert [node_id for node_id, _ in member._client.sent] == [2]


async def test_a_dynamic_member_only_stops() -> None:
    member = consumer(None)
    await leave_group(member)  # type: ignore[arg-type]
    assert member._client.sent == []
    assert not member._coordinator.closed  # consumer.stop() closes it, and leaves itself
    assert member.stopped


@pytest.mark.parametrize(
    "answer",
    [
        KafkaConnectionError("coordinator gone"),
        LeaveAnswer(error_code=16),  # NOT_COORDINATOR
        LeaveAnswer(members=[("host-1-0-ab", "host-1-0", 82)]),  # FENCED_INSTANCE_ID
        "hang",
    ],
)
async def test_a_failed_leave_is_bounded_and_does_not_raise(answer: Any) -> None:
    member = consumer("host-1-0", answer)
    await asyncio.wait_for(leave_group(member, timeout_s=0.2), 5.0)  # type: ignore[arg-type]
    assert member.stopped


async def test_a_failing_stop_does_not_raise() -> None:
    member = consumer("host-1-0")
    member.stop_error = RuntimeError("closing failed")
    await leave_group(member)  # type: ignore[arg-type]
    assert member.stopped
