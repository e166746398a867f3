"""The hand-written peer: one aiokafka loop that answers each request on its own.

    python bench/peers/naive.py --bootstrap 127.0.0.1:9092 --redis redis://127.0.0.1:6379/0 \\
        --model mlp --models-dir models --group bench-naive

What a developer writes from the aiokafka and redis-py getting-started pages: poll with
`getmany`, and for each record decode it, run the model on that one request, `SET` the
result in Redis (with `EX`), `send_and_wait` it to the results topic (key = request id),
then commit the whole poll. No batching, no pipelining; torch runs on the event loop.
Auto-commit is off, so a crash redelivers at most the poll in progress. Malformed records
are logged and skipped (inferq dead-letters them). Stops on SIGTERM or SIGINT, exit 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncio
import logging
import signal
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from bench.peers.common import (
    PeerModel,
    PeerOptions,
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

log = logging.getLogger("bench.peers.naive")

POLL_TIMEOUT_MS = 100
"""How long one `getmany` waits for records; also how soon a stop request is noticed."""


class NaivePeer:
    """Consumes requests one at a time and answers each in Redis and Kafka."""

    def __init__(self, *, options: PeerOptions, model: PeerModel) -> None:
        self._options = options
        self._model = model
        self._topics = options.topics
        self._worker = worker_id("naive")
        self._consumer = AIOKafkaConsumer(
            self._topics.requests(options.model),
            bootstrap_servers=options.bootstrap,
            group_id=options.group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        self._producer = AIOKafkaProducer(bootstrap_servers=options.bootstrap)
        self._redis = aioredis.Redis.from_url(options.redis)
        self.answered = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Answer requests until `stop` is set, committing after each poll."""
        async with self._consumer, self._producer, self._redis:
            log.info("naive peer ready: topic %s", self._topics.requests(self._options.model))
            while not stop.is_set():
                polled = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
                for records in polled.values():
                    for record in records:
                        await self._answer(record)
                if polled:
                    await self._consumer.commit()

    async def _answer(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            received = decode(record.value, record.headers)
        except SchemaError as error:
            log.warning(
                "skipping %s/%d/%d: %s", record.topic, record.partition, record.offset, error
            )
            return
        request = received.request
        (output,) = forward(self._model, [request])
        value = encode_answer(self._model, received, output, worker=self._worker)
        await self._redis.set(self._topics.result_key(request.id), value, ex=self._options.ttl_s)
        await self._producer.send_and_wait(
            result_topic(self._topics, request),
            value,
            key=request.id.encode(),
            headers=[(HEADER_CONTENT_TYPE, received.content_type.value.encode())],
        )
        self.answered += 1


async def main(argv: Sequence[str] | None = None) -> int:
    """Run the peer until SIGTERM or SIGINT; 0 on a clean stop."""
    options = parse_options(__doc__.splitlines()[0] if __doc__ else "", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    peer = NaivePeer(options=options, model=load_model(options))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    started = time.perf_counter()
    await peer.run(stop)
    log.info(
        "naive peer stopped: %d answered in %.1fs", peer.answered, time.perf_counter() - started
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
