"""The local stack's pure parts: ports, properties, memory limits, probes of nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.local.broker_limits import MIB, java_size_bytes
from deploy.local.stack import BrokerLimits, LocalStack, StackConfig, free_port, redis_answers
from producers.client import BATCH_BYTES
from producers.settings import ProducerSettings
from workers.settings import WorkerSettings


def test_server_properties_use_the_configured_ports(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(run_dir=tmp_path, kafka_port=1111, controller_port=2222))
    properties = stack._server_properties()
    assert "listeners=PLAINTEXT://127.0.0.1:1111,CONTROLLER://127.0.0.1:2222\n" in properties
    assert f"log.dirs={tmp_path / 'kafka-data'}\n" in properties
    assert "process.roles=broker,controller\n" in properties


def test_redis_probe_says_no_when_nothing_listens() -> None:
    assert not redis_answers("127.0.0.1", free_port(), timeout_s=0.5)


def test_status_of_a_stack_that_never_ran(tmp_path: Path) -> None:
    status = LocalStack(StackConfig(run_dir=tmp_path, kafka_port=free_port())).status()
    assert status["kafka"].startswith("down")
    assert status["redis"].startswith("down")


# --- broker memory and limits -------------------------------------------------------------


def properties_of(stack: LocalStack) -> dict[str, str]:
    lines = stack._server_properties().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_the_broker_takes_a_64_mib_record_in_a_request_it_reads(tmp_path: Path) -> None:
    properties = properties_of(LocalStack(StackConfig(run_dir=tmp_path)))
    message_max = int(properties["message.max.bytes"])
    request_max = int(properties["socket.request.max.bytes"])
    assert request_max == 100 * MIB
    assert WorkerSettings().max_message_bytes < message_max < request_max
    assert int(properties["queued.max.request.bytes"]) >= request_max
    assert int(properties["num.network.threads"]) >= 1
    assert int(properties["num.io.threads"]) >= 1


def test_producer_requests_stay_below_what_the_broker_reads() -> None:
    """A request holds the large records in flight (at most `max_request_bytes`) and a batch
    per partition: the 8 partitions of a request topic must fit beside them."""
    limits = BrokerLimits()
    largest_request = ProducerSettings().max_request_bytes + 8 * BATCH_BYTES
    assert largest_request < limits.socket_request_max_bytes


def jvm_option_bytes(options: list[str], prefix: str) -> int:
    (option,) = [o for o in options if o.startswith(prefix)]
    return java_size_bytes(option.removeprefix(prefix))


def test_jvm_memory_holds_the_requests_the_limits_allow(tmp_path: Path) -> None:
    limits = BrokerLimits()
    options = StackConfig(run_dir=tmp_path).kafka_jvm_options
    heap = jvm_option_bytes(options, "-Xmx")
    direct = jvm_option_bytes(options, "-XX:MaxDirectMemorySize=")
    cached = jvm_option_bytes(options, "-Djdk.nio.maxCachedBufferSize=")
    # Queued requests, plus the one Kafka lets in beyond the queue bound, plus the broker.
    assert heap >= limits.queued_request_bytes + limits.socket_request_max_bytes + 256 * MIB
    # Each network and I/O thread keeps a temporary buffer up to the largest cached one.
    assert cached <= limits.socket_request_max_bytes
    assert direct > (limits.network_threads + limits.io_threads) * cached


def test_limits_derive_memory_from_threads_and_request_size() -> None:
    small = BrokerLimits(network_threads=1, io_threads=1)
    large = BrokerLimits(network_threads=3, io_threads=8)
    assert large.direct_memory_bytes - small.direct_memory_bytes == 9 * 100 * MIB
    bigger = BrokerLimits(socket_request_max_bytes=200 * MIB, queued_request_bytes=200 * MIB)
    assert bigger.heap_bytes - BrokerLimits().heap_bytes == 200 * MIB


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("message_max_bytes", 100 * MIB),  # a record in no request the broker reads
        ("queued_request_bytes", 10 * MIB),  # below one request
        ("io_threads", 0),
    ],
)
def test_limits_that_disagree_are_refused(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        BrokerLimits(**{field: value})


def test_a_heap_below_what_the_limits_need_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kafka_heap"):
        StackConfig(run_dir=tmp_path, kafka_heap="256m")
    assert "-Xmx2g" in StackConfig(run_dir=tmp_path, kafka_heap="2g").kafka_jvm_options


@pytest.mark.parametrize(("size", "expected"), [("512m", 512 * MIB), ("1g", 1024 * MIB)])
def test_java_sizes(size: str, expected: int) -> None:
    assert java_size_bytes(size) == expected


# --- redis persistence --------------------------------------------------------------------


def test_redis_keeps_an_append_only_file_in_the_run_dir(tmp_path: Path) -> None:
    stack = LocalStack(StackConfig(run_dir=tmp_path, redis_port=1234))
    command = stack.redis.command("redis-server")
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--dir"] == str(tmp_path)
    assert options["--port"] == "1234"
    assert stack.redis.url == stack.config.redis_url
