"""An inference client: publish requests to Kafka, read results from Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import TracebackType

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from producers.settings import ProducerSettings
from schemas.codec import ContentType, decode_result, encode_request
from schemas.messages import InferenceRequest, InferenceResult
from schemas.topics import HEADER_CONTENT_TYPE, TopicNames


class ResultTimeoutError(TimeoutError):
    """No result arrived in Redis for a request within the caller's timeout."""

    def __init__(self, request_ids: Sequence[str], timeout_s: float) -> None:
        shown = ", ".join(request_ids[:5]) + (" ..." if len(request_ids) > 5 else "")
        super().__init__(f"{len(request_ids)} result(s) missing after {timeout_s:.1f}s: {shown}")
        self.request_ids = list(request_ids)


class InferenceClient:
    """Publishes `InferenceRequest`s and waits for their `InferenceResult`s.

    Use as ``async with InferenceClient(settings=ProducerSettings()) as client``.
    """

    def __init__(self, *, settings: ProducerSettings) -> None:
        self._settings = settings
        self._topics = TopicNames(prefix=settings.kafka.topic_prefix)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            client_id=settings.kafka.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=settings.linger_ms,
            # aiokafka's 16 KiB default holds only a handful of tensor requests per batch.
            max_batch_size=1024 * 1024,
            max_request_size=settings.max_request_bytes,
            request_timeout_ms=settings.kafka.request_timeout_ms,
        )
        self._redis = aioredis.Redis.from_url(
            settings.redis.url, socket_timeout=settings.redis.socket_timeout_s
        )
        self._content_type_header = settings.content_type.value.encode()

    async def __aenter__(self) -> InferenceClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect to Kafka."""
        await self._producer.start()

    async def close(self) -> None:
        """Flush pending requests and disconnect."""
        try:
            await self._producer.stop()
        finally:
            await self._redis.aclose()

    async def submit(self, request: InferenceRequest, *, key: bytes | None = None) -> None:
        """Publish ``request`` and wait until Kafka acknowledges it.

        The record key is the request id unless ``key`` chooses another (for ordering).
        """
        delivery = await self.enqueue(request, key=key)
        await delivery

    async def enqueue(
        self, request: InferenceRequest, *, key: bytes | None = None
    ) -> asyncio.Future[object]:
        """Publish without waiting for the ack; returns the future that resolves on it."""
        value = encode_request(request, self._settings.content_type)
        future: asyncio.Future[object] = await self._producer.send(
            self._topics.requests(request.model),
            value,
            key=key if key is not None else request.id.encode(),
            headers=[(HEADER_CONTENT_TYPE, self._content_type_header)],
        )
        return future

    async def results(
        self, request_ids: Sequence[str], *, timeout_s: float
    ) -> dict[str, InferenceResult]:
        """Wait for the results of ``request_ids`` in Redis; raise ResultTimeoutError if late."""
        waiting = list(dict.fromkeys(request_ids))
        found: dict[str, InferenceResult] = {}
        deadline = time.monotonic() + timeout_s
        interval_s = self._settings.result_poll_interval_ms / 1000
        chunk = 10_000
        while waiting:
            still: list[str] = []
            for start in range(0, len(waiting), chunk):
                ids = waiting[start : start + chunk]
                values = await self._redis.mget([self._topics.result_key(i) for i in ids])
                for request_id, value in zip(ids, values, strict=True):
                    if value is None:
                        still.append(request_id)
                    else:
                        raw = value if isinstance(value, bytes) else value.encode()
                        found[request_id] = decode_result(raw, _sniff(raw))
            waiting = still
            if waiting:
                if time.monotonic() >= deadline:
                    raise ResultTimeoutError(waiting, timeout_s)
                await asyncio.sleep(interval_s)
        return found

    async def infer(self, request: InferenceRequest, *, timeout_s: float = 30.0) -> InferenceResult:
        """Publish one request and wait for its result."""
        await self.submit(request)
        return (await self.results([request.id], timeout_s=timeout_s))[request.id]


def _sniff(value: bytes) -> ContentType:
    """Results are cached in their request's encoding: a JSON object starts with ``{``."""
    return ContentType.JSON if value[:1] == b"{" else ContentType.MSGPACK
