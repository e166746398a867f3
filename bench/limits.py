"""The two ceilings inferq's end-to-end throughput is measured against, in the same run.

    python bench/limits.py model --model-file MODEL.pt --shape 784 --batch-size 32 --threads 1 2
    python bench/limits.py transport --bootstrap 127.0.0.1:9092 --count 50000 [--with-redis URL]

`model_limit`: the model alone, a batched forward on pre-built random FP32 tensors (rows/s).
`transport_limit`: aiokafka alone, consume a request and produce a result of the size of an
encoded result with the worker's producer settings, commit per poll batch; optionally with the
Redis write too (records/s). No model, no decoding. `prepublish` fills a request topic fast.

The transport CLI pre-publishes `--count` records to a fresh 8-partition topic, measures the
plain transport limit and, with `--with-redis`, the Redis variant next to it on the same topic
(a second consumer group), then deletes its topics. Each command prints a table and writes
`bench/results/limits-{command}-{date}.json` (or `--json PATH`).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import platform
import statistics
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import redis.asyncio as aioredis
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2
from rich.console import Console
from rich.table import Table

from workers.repository import open_version
from workers.results import SET_FIRST_WINS

RESULTS = Path(__file__).parent / "results"
REQUEST_BYTES = 3_300
"""A request the size of an encoded 1x784 FP32 msgpack request, about 3.3 KB."""
RESULT_BYTES = 256
"""About an encoded 1x10 FP32 result with timing; the harness passes the real size."""
POLL_MAX_RECORDS = 1024
TOPIC_SETTLE_S = 1.0
RESULT_TTL_S = 600
REDIS_KEY_PREFIX = "bench:transport:"
PREPUBLISH_CHUNK = 8192
"""Records packed per step of `prepublish`; two steps are in flight at most."""

Unit = Literal["samples/s", "records/s"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LimitResult:
    """One measured ceiling.

    name: what was measured. rate_per_s: the headline rate in `unit`. count: samples or
    records processed while timed. seconds: the timed span. extra: secondary figures, named
    with their unit.
    """

    name: str
    rate_per_s: float
    unit: Unit
    count: int
    seconds: float
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


# --- the model alone ---------------------------------------------------------------------


def model_limit(
    *,
    model_file: Path,
    input_shape: tuple[int, ...],
    batch_size: int,
    threads: int,
    seconds: float = 5.0,
    warmup_batches: int = 20,
) -> LimitResult:
    """Rows/s of the model alone at `batch_size` on `threads` intra-op threads.

    model_file: a version directory (or the model file in one). input_shape: one row's
    shape, without the batch dimension. seconds: how long to time forwards after
    `warmup_batches` untimed ones. Runs in the calling thread and restores its torch thread
    count afterwards.
    """
    if batch_size < 1 or threads < 1 or seconds <= 0 or warmup_batches < 0:
        raise ValueError("batch_size and threads must be >= 1, seconds > 0, warmup_batches >= 0")
    version_dir = model_file if model_file.is_dir() else model_file.parent
    module = open_version(version_dir).module
    model_name = version_dir.parent.name
    generator = torch.Generator().manual_seed(0)
    # A few distinct batches so the timing does not ride on one tensor staying in cache.
    inputs = [
        torch.randn((batch_size, *input_shape), generator=generator, dtype=torch.float32)
        for _ in range(4)
    ]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for index in range(warmup_batches):
                module(inputs[index % len(inputs)])
            latencies_s: list[float] = []
            start = time.perf_counter()
            deadline = start + seconds
            now = start
            while now < deadline:
                module(inputs[len(latencies_s) % len(inputs)])
                finished = time.perf_counter()
                latencies_s.append(finished - now)
                now = finished
            elapsed = now - start
    finally:
        torch.set_num_threads(previous_threads)
    batches = len(latencies_s)
    ordered = sorted(latencies_s)
    return LimitResult(
        name=f"{model_name} batch {batch_size}, {threads} threads",
        rate_per_s=batches * batch_size / elapsed,
        unit="samples/s",
        count=batches * batch_size,
        seconds=elapsed,
        extra={
            "batches_per_s": batches / elapsed,
            "mean_batch_ms": statistics.fmean(latencies_s) * 1e3,
            "p50_batch_ms": ordered[batches // 2] * 1e3,
            "p99_batch_ms": ordered[min(batches - 1, int(batches * 0.99))] * 1e3,
            "batch_size": float(batch_size),
            "threads": float(threads),
        },
    )


# --- Kafka (and Redis) alone ---------------------------------------------------------------


async def transport_limit(
    *,
    bootstrap: str,
    request_topic: str,
    result_topic: str,
    group_id: str,
    expected: int,
    result_bytes: int,
    timeout_s: float,
    with_redis: str | None = None,
) -> LimitResult:
    """Records/s of aiokafka alone doing a worker's Kafka work for `expected` requests.

    The best this machine does with aiokafka, using the worker's own techniques so that it
    is a ceiling for it: consumes `request_topic` from the earliest offset in group
    `group_id` (manual commits, `getmany` of up to 1024, 1 MiB partition fetches), produces
    one `result_bytes`-byte record per request to `result_topic` under the request's key in
    per-partition batches (acks all, idempotent, linger 2 ms), with one poll's records in
    flight while the next is read; commits each poll's offsets once acknowledged.
    with_redis: a Redis URL; when given, each poll's results are first written to Redis in
    one first-result-wins script call (EX 600), as the worker does.
    Timed from consumer start to the last ack; TimeoutError after `timeout_s`.
    """
    if expected < 1 or result_bytes < 0 or timeout_s <= 0:
        raise ValueError("expected must be >= 1, result_bytes >= 0, timeout_s > 0")
    payload = b"r" * result_bytes
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        max_batch_size=512 * 1024,  # the worker's producer settings
    )
    consumer = AIOKafkaConsumer(
        request_topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=POLL_MAX_RECORDS,
        fetch_max_bytes=8 * 1_048_576,  # the worker's fetch settings
        max_partition_fetch_bytes=1_048_576,
    )
    redis = aioredis.Redis.from_url(with_redis) if with_redis is not None else None
    set_all = redis.register_script(SET_FIRST_WINS) if redis is not None else None
    in_flight: tuple[list[asyncio.Future[Any]], dict[Any, int]] | None = None
    received = 0
    poll_batches = 0
    first_record_s = 0.0
    start = last_ack = time.perf_counter()
    await producer.start()
    try:
        if redis is not None:
            await redis.ping()
        start = time.perf_counter()
        deadline = start + timeout_s
        await consumer.start()
        while received < expected:
            remaining_s = deadline - time.perf_counter()
            if remaining_s <= 0:
                raise TimeoutError(f"transport limit: {received} of {expected} in {timeout_s}s")
            polled = await consumer.getmany(
                timeout_ms=int(min(remaining_s, 1.0) * 1000), max_records=POLL_MAX_RECORDS
            )
            if not polled:
                continue
            if poll_batches == 0:
                first_record_s = time.perf_counter() - start
            poll_batches += 1
            keys = [record.key for records in polled.values() for record in records]
            if set_all is not None:
                # The same single-command write of a whole group that inferq's worker uses.
                await set_all(
                    keys=[REDIS_KEY_PREFIX + _text(key) for key in keys],
                    args=[RESULT_TTL_S, *([payload] * len(keys))],
                )
            acks = await _send_batched(producer, result_topic, [(k, payload) for k in keys])
            offsets = {tp: records[-1].offset + 1 for tp, records in polled.items()}
            # One poll's records in flight while the next is read, as the worker overlaps them.
            if in_flight is not None:
                await asyncio.gather(*in_flight[0])
                await consumer.commit(in_flight[1])
            in_flight = (acks, offsets)
            received += len(keys)
        if in_flight is not None:
            await asyncio.gather(*in_flight[0])
            await consumer.commit(in_flight[1])
        last_ack = time.perf_counter()
    finally:
        await consumer.stop()
        await producer.stop()
        if redis is not None:
            await redis.aclose()
    elapsed = last_ack - start
    return LimitResult(
        name="transport kafka + redis" if redis is not None else "transport kafka",
        rate_per_s=received / elapsed,
        unit="records/s",
        count=received,
        seconds=elapsed,
        extra={
            "first_record_s": first_record_s,
            "rate_after_first_record_per_s": received / max(elapsed - first_record_s, 1e-9),
            "poll_batches": float(poll_batches),
            "mean_records_per_poll": received / max(poll_batches, 1),
            "result_bytes": float(result_bytes),
        },
    )


async def _send_batched(
    producer: AIOKafkaProducer,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
    headers: list[tuple[str, bytes]] | None = None,
) -> list[asyncio.Future[Any]]:
    """Send (key, value) records in per-partition batches; the futures of their acks.

    Each record goes to the partition the default partitioner picks for its key (murmur2),
    so it lands where `send` would put it, but it is packed into a batch here and handed over
    with `send_batch`: up to twice the rate of one `send` per record, which costs a future
    and a coroutine each.
    """
    partitions = sorted(await producer.partitions_for(topic))
    builders: dict[int, Any] = {}
    acks: list[asyncio.Future[Any]] = []
    for key, value in records:
        partition = partitions[(murmur2(key or b"") & 0x7FFFFFFF) % len(partitions)]
        builder = builders.get(partition)
        if builder is None:
            builder = builders[partition] = producer.create_batch()
        if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
            acks.append(await producer.send_batch(builder, topic, partition=partition))
            builder = builders[partition] = producer.create_batch()
            builder.append(key=key, value=value, timestamp=None, headers=headers)
    for partition, builder in builders.items():
        acks.append(await producer.send_batch(builder, topic, partition=partition))
    return acks


def _text(key: bytes | None) -> str:
    return "" if key is None else key.decode("utf-8", "replace")


async def prepublish(
    *,
    bootstrap: str,
    topic: str,
    values: Sequence[bytes],
    keys: Sequence[bytes],
    headers: list[tuple[str, bytes]] | None,
) -> float:
    """Publish pre-encoded records (value i under key i, the same headers on each); records/s.

    One idempotent producer (acks all, 20 ms linger, 1 MiB batches), records packed into
    per-partition batches by `_send_batched`, `PREPUBLISH_CHUNK` records at a time.
    """
    if len(values) != len(keys):
        raise ValueError(f"{len(values)} values but {len(keys)} keys")
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,  # retries after a leader change must not duplicate records
        linger_ms=20,
        max_batch_size=1_048_576,
        max_request_size=2_097_152,
    )
    await producer.start()
    try:
        start = time.perf_counter()
        # Two chunks in flight at most: the next is packed while the last is acknowledged,
        # and memory stays bounded however many records there are.
        in_flight: list[asyncio.Future[Any]] = []
        for begin in range(0, len(values), PREPUBLISH_CHUNK):
            end = begin + PREPUBLISH_CHUNK
            acks = await _send_batched(
                producer, topic, zip(keys[begin:end], values[begin:end], strict=True), headers
            )
            await asyncio.gather(*in_flight)
            in_flight = acks
        await asyncio.gather(*in_flight)
        elapsed = time.perf_counter() - start
    finally:
        await producer.stop()
    return len(values) / elapsed if values else 0.0


# --- the CLI -----------------------------------------------------------------------------


async def _create_topics(bootstrap: str, names: Sequence[str], *, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=name, num_partitions=partitions, replication_factor=1) for name in names]
        )
        for _ in range(100):
            described = await admin.describe_topics(list(names))
            if all(
                partition["error_code"] == 0 and partition["leader"] >= 0
                for topic in described
                for partition in topic["partitions"]
            ):
                break
            await asyncio.sleep(0.1)
        # The controller names leaders before the broker acts on it: a produce at once meets
        # NotLeaderForPartition and a 100 ms retry inside the timed prepublish.
        await asyncio.sleep(TOPIC_SETTLE_S)
    finally:
        await admin.close()


async def _delete_topics(bootstrap: str, names: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(names))
    finally:
        await admin.close()


async def _transport(arguments: argparse.Namespace) -> tuple[list[LimitResult], dict[str, Any]]:
    bootstrap: str = arguments.bootstrap
    count: int = arguments.count
    run = uuid.uuid4().hex[:8]
    request_topic = f"bench.limits.{run}.requests"
    result_topics = [f"bench.limits.{run}.results", f"bench.limits.{run}.results-redis"]
    topics = [request_topic, *result_topics]
    await _create_topics(bootstrap, topics, partitions=arguments.partitions)
    try:
        keys = [f"req-{run}-{index:08d}".encode() for index in range(count)]
        body = bytes(range(256)) * (arguments.request_bytes // 256 + 1)
        values = [body[: arguments.request_bytes]] * count
        publish_rate = await prepublish(
            bootstrap=bootstrap,
            topic=request_topic,
            values=values,
            keys=keys,
            headers=[("content-type", b"application/msgpack")],
        )
        # Alternate the variants so neither alone pays for a cold broker or client.
        variants: list[str | None] = (
            [None, arguments.with_redis] if arguments.with_redis else [None]
        )
        results = []
        for repeat in range(arguments.repeats):
            for index, redis_url in enumerate(variants):
                measured = await transport_limit(
                    bootstrap=bootstrap,
                    request_topic=request_topic,
                    result_topic=result_topics[index],
                    group_id=f"bench-limits-{run}-{index}-{repeat}",
                    expected=count,
                    result_bytes=arguments.result_bytes,
                    timeout_s=arguments.timeout,
                    with_redis=redis_url,
                )
                if arguments.repeats > 1:
                    measured = dataclasses.replace(measured, name=f"{measured.name} #{repeat + 1}")
                results.append(measured)
    finally:
        await _delete_topics(bootstrap, topics)
    settings = {
        "count": count,
        "partitions": arguments.partitions,
        "request_bytes": arguments.request_bytes,
        "result_bytes": arguments.result_bytes,
        "repeats": arguments.repeats,
        "prepublish_records_per_s": publish_rate,
    }
    return results, settings


def _model(arguments: argparse.Namespace) -> tuple[list[LimitResult], dict[str, Any]]:
    results = [
        model_limit(
            model_file=arguments.model_file,
            input_shape=tuple(arguments.shape),
            batch_size=batch_size,
            threads=threads,
            seconds=arguments.seconds,
        )
        for batch_size in arguments.batch_size
        for threads in arguments.threads
    ]
    settings = {
        "model_file": str(arguments.model_file),
        "shape": arguments.shape,
        "seconds": arguments.seconds,
        "torch": torch.__version__,
    }
    return results, settings


def _print(results: Sequence[LimitResult], title: str, columns: dict[str, str]) -> None:
    """A table of `results`; `columns` maps an `extra` key to its column header."""
    table = Table(title=title)
    for header in ("limit", results[0].unit, "vs first", *columns.values()):
        table.add_column(header, justify="left" if header == "limit" else "right")
    reference = results[0].rate_per_s
    for result in results:
        table.add_row(
            result.name,
            f"{result.rate_per_s:,.0f}",
            f"{result.rate_per_s / reference:.2f}",
            *(_figure(result.extra.get(key, float("nan"))) for key in columns),
        )
    Console().print(table)


def _figure(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="where to write the JSON report")
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="the model alone, batched forwards")
    model.add_argument("--model-file", type=Path, required=True, help="model version directory")
    model.add_argument("--shape", type=int, nargs="+", required=True, help="one row's shape")
    model.add_argument("--batch-size", type=int, nargs="+", default=[32], help="rows per batch")
    model.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads")
    model.add_argument("--seconds", type=float, default=5.0, help="timed span per row, s")
    transport = commands.add_parser("transport", help="aiokafka alone, consume and produce")
    transport.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    transport.add_argument("--count", type=int, default=50_000, help="requests to pre-publish")
    transport.add_argument("--partitions", type=int, default=8, help="request topic partitions")
    transport.add_argument("--request-bytes", type=int, default=REQUEST_BYTES)
    transport.add_argument("--result-bytes", type=int, default=RESULT_BYTES)
    transport.add_argument("--timeout", type=float, default=300.0, help="per measurement, s")
    transport.add_argument("--with-redis", metavar="URL", help="also measure with Redis writes")
    transport.add_argument("--repeats", type=int, default=1, help="measurements of each variant")
    arguments = parser.parse_args()

    if arguments.command == "model":
        results, settings = _model(arguments)
        _print(
            results,
            "the model alone: batched forwards",
            {"batches_per_s": "batches/s", "mean_batch_ms": "mean ms", "p99_batch_ms": "p99 ms"},
        )
    else:
        results, settings = asyncio.run(_transport(arguments))
        Console().print(
            f"prepublish: {settings['prepublish_records_per_s']:,.0f} records/s "
            f"of {arguments.request_bytes:,} bytes"
        )
        _print(
            results,
            "aiokafka alone: consume, produce, commit",
            {
                "rate_after_first_record_per_s": "after 1st record/s",
                "first_record_s": "1st record s",
                "mean_records_per_poll": "records/poll",
            },
        )

    now = dt.datetime.now(dt.UTC)
    target: Path = arguments.json or RESULTS / f"limits-{arguments.command}-{now:%Y-%m-%d}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": f"limits-{arguments.command}",
        "when": now.isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "settings": settings,
        "results": [result.as_dict() for result in results],
    }
    target.write_text(json.dumps(report, indent=2) + "\n")
    Console().print(f"wrote {target}")


if __name__ == "__main__":
    main()
