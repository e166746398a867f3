"""The FastStream peer: the same job written idiomatically with FastStream 0.7's KafkaBroker.

    python bench/peers/faststream_peer.py --mode message|batch --bootstrap 127.0.0.1:9092 \\
        --redis redis://127.0.0.1:6379/0 --model mlp --models-dir models --group bench-fs

`--mode message`: `@broker.subscriber(topic, group_id=..., auto_offset_reset="earliest")`
on a handler taking the raw body (`body: bytes`: our requests are msgpack, which FastStream's
default decoder passes through untouched) and the `KafkaMessage` (for the content-type
header). It runs the model on the one request, SETs the result in Redis (redis.asyncio) and
`await broker.publish(value, topic=..., key=id)`, which waits for Kafka's ack.

`--mode batch`: `@broker.subscriber(topic, batch=True, max_records=N, ...)`; the handler
gets up to N bodies from one `getmany`, runs the model once on them all, SETs every result
in one Redis pipeline, then publishes each result with `broker.publish(..., no_confirm=True)`
and awaits all the delivery futures together. Not `broker.publish_batch`: it builds a single
aiokafka batch, capped by the producer's `max_batch_size` (16 KiB), which overflows
(`BatchBufferOverflowException`) at about 55 mlp results, and it sends the whole batch to one
partition rather than hashing each key as inferq does.

In both modes values, keys and the content-type header are inferq's; FastStream adds a
`correlation_id` header of its own.

Commits: FastStream's default `AckPolicy.ACK_FIRST`, which turns on aiokafka's auto-commit
(`enable_auto_commit=True`, every `auto_commit_interval_ms` = 5 s): offsets are committed on
consumption, whether the handler succeeded or not, so a crash loses the requests consumed
but not yet answered. FastStream logs every message received and processed at INFO (its
default); `--quiet` passes `KafkaBroker(logger=None)`, which also silences the handler
exceptions FastStream would log, so check a run without it first. The app runner
(`FastStream(broker).run()`) stops the broker on SIGTERM or SIGINT and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncio
import logging
from collections.abc import Sequence

import redis.asyncio as aioredis
from faststream import FastStream
from faststream.kafka import ConsumerRecord, KafkaBroker, KafkaMessage

from bench.peers.common import (
    PeerModel,
    PeerOptions,
    Received,
    decode,
    encode_answer,
    forward,
    load_model,
    parse_options,
    result_topic,
    worker_id,
)
from schemas.errors import SchemaError
from schemas.topics import HEADER_CONTENT_TYPE

log = logging.getLogger("bench.peers.faststream")


def build_app(options: PeerOptions, model: PeerModel) -> FastStream:
    """The FastStream application: one broker, one subscriber for `options.mode`."""
    topics = options.topics
    worker = worker_id(f"faststream-{options.mode}")
    broker = (
        KafkaBroker(options.bootstrap, logger=None)
        if options.quiet
        else KafkaBroker(options.bootstrap)
    )
    redis = aioredis.Redis.from_url(options.redis)
    requests_topic = topics.requests(options.model)

    if options.mode == "message":

        @broker.subscriber(requests_topic, group_id=options.group, auto_offset_reset="earliest")
        async def answer(body: bytes, message: KafkaMessage) -> None:
            record = message.raw_message
            assert isinstance(record, ConsumerRecord)  # a tuple only for batch subscribers
            received = decode(body, record.headers)
            request = received.request
            (output,) = forward(model, [request])
            value = encode_answer(model, received, output, worker=worker)
            await redis.set(topics.result_key(request.id), value, ex=options.ttl_s)
            await broker.publish(
                value,
                topic=result_topic(topics, request),
                key=request.id.encode(),
                headers={HEADER_CONTENT_TYPE: received.content_type.value},
            )

    else:

        @broker.subscriber(
            requests_topic,
            batch=True,
            max_records=options.max_records,
            group_id=options.group,
            auto_offset_reset="earliest",
        )
        async def answer_batch(bodies: list[bytes], message: KafkaMessage) -> None:
            batch: list[Received] = []
            for body, record in zip(bodies, message.raw_message, strict=True):
                try:
                    batch.append(decode(body, record.headers))
                except SchemaError as error:
                    log.warning("skipping %s/%d: %s", record.topic, record.offset, error)
            if not batch:
                return
            outputs = forward(model, [received.request for received in batch])
            values = [
                encode_answer(model, received, output, worker=worker)
                for received, output in zip(batch, outputs, strict=True)
            ]
            async with redis.pipeline(transaction=False) as pipe:
                for received, value in zip(batch, values, strict=True):
                    pipe.set(topics.result_key(received.request.id), value, ex=options.ttl_s)
                await pipe.execute()
            # no_confirm: publish returns the delivery future at once, so the batch's
            # records are in flight together; then wait for every ack.
            deliveries = [
                await broker.publish(
                    value,
                    topic=result_topic(topics, received.request),
                    key=received.request.id.encode(),
                    headers={HEADER_CONTENT_TYPE: received.content_type.value},
                    no_confirm=True,
                )
                for received, value in zip(batch, values, strict=True)
            ]
            await asyncio.gather(*deliveries)

    async def close_redis() -> None:
        await redis.aclose()

    return FastStream(broker, on_shutdown=[close_redis])


async def main(argv: Sequence[str] | None = None) -> int:
    """Run the app until SIGTERM or SIGINT; 0 on a clean stop."""
    options = parse_options(__doc__.splitlines()[0] if __doc__ else "", argv, with_mode=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = build_app(options, load_model(options))
    await app.run()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
