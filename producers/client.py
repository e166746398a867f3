"""An inference client: publish requests to Kafka, get their results back.

`infer` waits on this client's own reply topic (`producers.replies`): one consumer for every
waiting call. `results` polls Redis for many ids at once (falling back to the result topics),
for callers that submitted in bulk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from producers.inputs import Inputs, Prediction, as_tensors
from producers.replies import ReplyListener
from producers.result_topic import ResultTopicScan, Submission
from producers.settings import ProducerSettings
from schemas.codec import ContentType, decode_result, encode_request
from schemas.errors import SchemaError
from schemas.kafka import KafkaAccessError, check_access, client_options
from schemas.messages import (
    InferenceRequest,
    InferenceResult,
    now_ms,
)
from schemas.names import check_model_name, check_model_version
from schemas.redis import connect as connect_redis
from schemas.redis import is_unavailable, mget
from schemas.topics import HEADER_CONTENT_TYPE, TopicNames

log = logging.getLogger(__name__)

BATCH_BYTES: Final = 1024 * 1024
"""The producer's batch size; a larger record travels in a batch of its own."""
REMEMBERED_SUBMISSIONS: Final = 100_000
"""Most requests whose result topic and submit time a client keeps for the topic fallback."""
SCAN_POLL_MS: Final = 200
"""Longest a result-topic read waits for records before the client checks on its waits."""
TOPIC_WAIT_S: Final = 5.0
"""How long a request topic missing from the cluster is waited for before
ModelTopicMissingError."""
SCAN_RETRY_S: Final = 1.0
"""Pause before a result-topic scan that failed (broker down, topic missing) is tried again."""


class InferenceClientError(Exception):
    """Base of the client's errors."""


class BrokerUnavailableError(InferenceClientError, ConnectionError):
    """Kafka did not answer (at start, or while publishing)."""


class BrokerRefusedError(InferenceClientError, PermissionError):
    """Kafka answered but refused the client: wrong SASL credentials, or a broker certificate
    the client does not trust (`reason`: `authentication` or `tls`); retrying cannot help."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RequestTooLargeError(InferenceClientError, ValueError):
    """The encoded request is larger than the client or its topic accepts."""


class ModelTopicMissingError(InferenceClientError, LookupError):
    """The model's request topic does not exist: no worker serves it, and none created it."""


class InferenceFailedError(InferenceClientError):
    """The request was answered with an error (or expired); `result` says why."""

    def __init__(self, result: InferenceResult) -> None:
        error = result.error
        detail = f"{error.code}: {error.message}" if error is not None else str(result.status)
        super().__init__(f"request {result.id} ({result.model}) failed: {detail}")
        self.result = result


class ResultTimeoutError(TimeoutError):
    """No result arrived, in Redis or on its result topic, within the caller's timeout."""

    def __init__(self, request_ids: Sequence[str], timeout_s: float) -> None:
        shown = ", ".join(request_ids[:5]) + (" ..." if len(request_ids) > 5 else "")
        super().__init__(f"{len(request_ids)} result(s) missing after {timeout_s:.1f}s: {shown}")
        self.request_ids = list(request_ids)


class InFlightBytes:
    """Caps the bytes of large records sent and not yet acknowledged; first come, first served.

    aiokafka puts one batch per partition of a broker into one produce request, with no cap on
    the total: several 60 MiB records for different partitions made one request larger than the
    broker's `socket.request.max.bytes`, which the broker drops and aiokafka retries forever.
    A record may go when the others in flight leave room for it, or when none is in flight.
    """

    def __init__(self, *, budget_bytes: int) -> None:
        """budget_bytes: most bytes in flight at once (one record may exceed it alone)."""
        if budget_bytes < 1:
            raise ValueError("budget_bytes must be positive")
        self._budget_bytes = budget_bytes
        self._in_flight_bytes = 0
        self._turn = asyncio.Lock()  # FIFO: a large record is not overtaken by smaller ones
        self._released = asyncio.Event()

    @property
    def in_flight_bytes(self) -> int:
        """Bytes acquired and not yet released."""
        return self._in_flight_bytes

    async def acquire(self, size_bytes: int) -> None:
        """Wait until ``size_bytes`` more fit in the budget (or nothing is in flight)."""
        async with self._turn:
            while self._in_flight_bytes and self._in_flight_bytes + size_bytes > self._budget_bytes:
                self._released.clear()
                await self._released.wait()
            self._in_flight_bytes += size_bytes

    def release(self, size_bytes: int) -> None:
        """Give back what a delivered (or failed) record acquired."""
        self._in_flight_bytes -= size_bytes
        self._released.set()


class InferenceClient:
    """Publishes `InferenceRequest`s and waits for their `InferenceResult`s.

    Use as ``async with InferenceClient(settings=ProducerSettings()) as client``.
    """

    def __init__(self, *, settings: ProducerSettings) -> None:
        self._settings = settings
        self._topics = TopicNames(prefix=settings.kafka.topic_prefix)
        self._producer = AIOKafkaProducer(
            **client_options(settings.kafka),
            client_id=settings.kafka.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=settings.linger_ms,
            # aiokafka's 16 KiB default holds only a handful of tensor requests per batch.
            max_batch_size=BATCH_BYTES,
            max_request_size=settings.max_request_bytes,
        )
        self._redis = connect_redis(settings.redis)
        self._content_type_header = settings.content_type.value.encode()
        self._large_records = InFlightBytes(budget_bytes=settings.max_request_bytes)
        self._submissions: OrderedDict[str, Submission] = OrderedDict()
        self._known_topics: set[str] = set()
        self._reply_topic = settings.reply_topic or self._topics.replies(
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self._replies: ReplyListener | None = None
        self._replies_starting = asyncio.Lock()

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
        """Connect to Kafka; BrokerUnavailableError when it does not answer, BrokerRefusedError
        when it refuses the credentials or the TLS handshake."""
        try:
            await self._producer.start()
        except KafkaError as error:
            try:
                await check_access(self._settings.kafka)
            except KafkaAccessError as refused:
                raise BrokerRefusedError(str(refused), reason=refused.reason) from error
            raise BrokerUnavailableError(
                f"Kafka at {self._settings.kafka.bootstrap_servers} does not answer: {error!r}"
            ) from error

    async def close(self) -> None:
        """Flush pending requests and disconnect; calls still waiting in `infer` are cancelled."""
        try:
            if self._replies is not None:
                await self._replies.close()
            await self._producer.stop()
        finally:
            await self._redis.aclose()

    @property
    def reply_topic(self) -> str:
        """Where `infer` asks for its results: `INFERQ_REPLY_TOPIC`, or one of this process."""
        return self._reply_topic

    def request(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        deadline: float | None = None,
        reply_to: str | None = None,
        parameters: Mapping[str, bool | int | float | str] | None = None,
        priority: int = 0,
        request_id: str | None = None,
    ) -> InferenceRequest:
        """Build a request (validated as the wire contract says).

        inputs: input name → numpy array, torch tensor or `schemas.Tensor` (or named Tensors).
        deadline: seconds from now after which the worker answers `expired` without running it.
        request_id: the id (default: a random one); a retry with the same id is answered once.
        """
        check_model_name(model)  # InvalidModelNameError, before anything is built
        if version is not None:
            check_model_version(version)
        now = now_ms()
        return InferenceRequest(
            id=request_id or uuid.uuid4().hex,
            model=model,
            version=version,
            inputs=as_tensors(inputs),
            parameters=dict(parameters or {}),
            reply_to=reply_to,
            deadline_ms=None if deadline is None else now + int(deadline * 1000),
            created_ms=now,
            priority=priority,
        )

    async def submit(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        key: bytes | None = None,
        deadline: float | None = None,
        reply_to: str | None = None,
        parameters: Mapping[str, bool | int | float | str] | None = None,
        priority: int = 0,
        request_id: str | None = None,
    ) -> str:
        """Publish one request and wait for Kafka's ack; return its id (see `request`).

        key: the record key (default: the id); requests of one key keep their order.
        """
        request = self.request(
            model, inputs, version=version, deadline=deadline, reply_to=reply_to,
            parameters=parameters, priority=priority, request_id=request_id,
        )  # fmt: skip
        await self.submit_request(request, key=key)
        return request.id

    async def submit_many(self, requests: Iterable[InferenceRequest]) -> list[str]:
        """Publish many requests, batched by the producer; return their ids once all are acked."""
        requests = list(requests)
        deliveries = [await self.enqueue(request) for request in requests]
        await self._acked(asyncio.gather(*deliveries))
        return [request.id for request in requests]

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        timeout_s: float = 30.0,
        raise_on_error: bool = True,
        deadline: float | None = None,
        parameters: Mapping[str, bool | int | float | str] | None = None,
        priority: int = 0,
        request_id: str | None = None,
    ) -> Prediction:
        """Run one request and wait for its result, as numpy arrays by output name.

        An error result raises InferenceFailedError, or with ``raise_on_error=False`` comes
        back as a `Prediction` whose `error` says why. No result within ``timeout_s``:
        ResultTimeoutError.
        """
        check_model_name(model)  # before the reply topic is set up for it
        request = self.request(
            model, inputs, version=version, deadline=deadline, reply_to=await self._reply_to(),
            parameters=parameters, priority=priority, request_id=request_id,
        )  # fmt: skip
        result = await self.infer_request(request, timeout_s=timeout_s)
        if not result.ok and raise_on_error:
            raise InferenceFailedError(result)
        return Prediction.of(result)

    async def infer_request(
        self, request: InferenceRequest, *, timeout_s: float = 30.0
    ) -> InferenceResult:
        """Publish ``request`` and wait for its result on the reply topic (`reply_to` is set
        to this client's reply topic unless it names another one, which is then polled)."""
        reply_to = await self._reply_to()
        if request.reply_to not in (None, reply_to):
            await self.submit_request(request)
            return (await self.results([request.id], timeout_s=timeout_s))[request.id]
        if request.reply_to is None:
            request = request.model_copy(update={"reply_to": reply_to})
        assert self._replies is not None
        waiting = self._replies.expect(request.id)
        try:
            await self.submit_request(request)
            return await asyncio.wait_for(asyncio.shield(waiting), timeout_s)
        except TimeoutError:
            late: dict[str, InferenceResult] = {}
            try:
                late = await self.cached_results([request.id])  # one last look
            except Exception as error:
                if not is_unavailable(error):
                    raise
            if request.id in late:
                return late[request.id]
            raise ResultTimeoutError([request.id], timeout_s) from None
        finally:
            self._replies.forget(request.id)

    async def _reply_to(self) -> str:
        """This client's reply topic, its listener started on first use."""
        if self._replies is None:
            async with self._replies_starting:
                if self._replies is None:
                    listener = ReplyListener(
                        kafka=self._settings.kafka,
                        topic=self._reply_topic,
                        partitions=self._settings.reply_topic_partitions,
                        sweep=self.cached_results,
                        sweep_after_s=self._settings.reply_sweep_s,
                        max_message_bytes=self._settings.max_request_bytes,
                    )
                    try:
                        await listener.start()
                    except KafkaError as error:
                        raise BrokerUnavailableError(
                            f"cannot read reply topic {self._reply_topic}: {error!r}"
                        ) from error
                    self._replies = listener
        return self._reply_topic

    async def cached_results(self, request_ids: Sequence[str]) -> dict[str, InferenceResult]:
        """The results Redis holds now for ``request_ids`` (one MGET per 10,000 ids; on a
        Redis Cluster, one per hash slot of each 10,000)."""
        found: dict[str, InferenceResult] = {}
        await self._results_from_redis(dict.fromkeys(request_ids), found)
        return found

    async def _acked(self, deliveries: Awaitable[object]) -> None:
        try:
            await deliveries
        except KafkaError as error:
            raise BrokerUnavailableError(f"Kafka did not acknowledge: {error!r}") from error

    async def _send(
        self, topic: str, value: bytes, *, key: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[object]:
        try:
            future: asyncio.Future[object] = await self._producer.send(
                topic, value, key=key, headers=headers
            )
        except MessageSizeTooLargeError as error:
            raise RequestTooLargeError(
                f"request of {len(value):,} bytes is larger than INFERQ_MAX_REQUEST_BYTES "
                f"({self._settings.max_request_bytes:,}) or the topic allows"
            ) from error
        except KafkaError as error:
            raise BrokerUnavailableError(f"Kafka did not take the request: {error!r}") from error
        return future

    async def _check_topic(self, topic: str, model: str) -> None:
        """ModelTopicMissingError for a request topic the cluster does not have (once)."""
        if topic in self._known_topics:
            return
        known = self._producer.client.cluster.topics()
        deadline = time.monotonic() + TOPIC_WAIT_S
        while topic not in known:
            # The producer's metadata covers only the topics it was asked about: ask for all,
            # for a little while (a worker may be creating the topic right now).
            try:
                known = (await self._producer.client.fetch_all_metadata()).topics()
            except KafkaError as error:
                raise BrokerUnavailableError(f"Kafka did not answer: {error!r}") from error
            if topic in known or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.2)
        if topic not in known:
            raise ModelTopicMissingError(
                f"request topic {topic} of model {model!r} does not exist: is a worker serving "
                f"{model!r} (workers create their model's topics), or create it yourself"
            )
        self._known_topics.add(topic)

    async def submit_request(self, request: InferenceRequest, *, key: bytes | None = None) -> None:
        """Publish ``request`` and wait until Kafka acknowledges it.

        The record key is the request id unless ``key`` chooses another (for ordering).
        """
        delivery = await self.enqueue(request, key=key)
        await self._acked(delivery)

    async def enqueue(
        self, request: InferenceRequest, *, key: bytes | None = None
    ) -> asyncio.Future[object]:
        """Publish without waiting for the ack; returns the future that resolves on it.

        A record larger than a batch waits until the large records before it are acknowledged,
        as far as they would not fit in one request with it (`max_request_bytes`).
        """
        topic = self._topics.requests(check_model_name(request.model))
        await self._check_topic(topic, request.model)
        value = encode_request(request, self._settings.content_type)
        record_key = key if key is not None else request.id.encode()
        size_bytes = len(value) + len(record_key)
        large = size_bytes > BATCH_BYTES
        if large:
            await self._large_records.acquire(size_bytes)
        submission = Submission(
            result_topic=request.reply_to or self._topics.results(request.model),
            submitted_ms=int(time.time() * 1000),
            submitted_monotonic_s=time.monotonic(),
        )
        try:
            future: asyncio.Future[object] = await self._send(
                topic,
                value,
                key=record_key,
                headers=[(HEADER_CONTENT_TYPE, self._content_type_header)],
            )
        except BaseException:
            if large:
                self._large_records.release(size_bytes)
            raise
        if large:
            future.add_done_callback(lambda _: self._large_records.release(size_bytes))
        self._remember(request.id, submission)
        return future

    async def results(
        self, request_ids: Sequence[str], *, timeout_s: float
    ) -> dict[str, InferenceResult]:
        """Wait for the results of ``request_ids``; raise ResultTimeoutError if late.

        Results are read from Redis. For a request this client submitted whose result has been
        missing from Redis for `result_topic_fallback_s`, it is also looked for on its result
        topic, from the request's submit time on (Redis loses results on a restart without
        persistence, and when their TTL ends). An unreachable Redis is polled again until the
        timeout, since the topic may still answer.
        """
        waiting: dict[str, None] = dict.fromkeys(request_ids)
        found: dict[str, InferenceResult] = {}
        deadline = time.monotonic() + timeout_s
        interval_s = self._settings.result_poll_interval_ms / 1000
        fallback: asyncio.Task[None] | None = None
        redis_error: Exception | None = None
        try:
            while True:
                try:
                    await self._results_from_redis(waiting, found)
                    redis_error = None
                except Exception as error:
                    if not is_unavailable(error):
                        raise
                    redis_error = error
                if not waiting:
                    break
                if fallback is None:
                    submissions = {
                        i: s for i in waiting if (s := self._submissions.get(i)) is not None
                    }
                    fallback = asyncio.create_task(
                        self._results_from_topics(waiting, found, submissions)
                    )
                elif fallback.done():
                    fallback.result()  # raises what broke the fallback, if anything
                if time.monotonic() >= deadline:
                    raise ResultTimeoutError(list(waiting), timeout_s) from redis_error
                await asyncio.sleep(interval_s)
        finally:
            if fallback is not None:
                fallback.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fallback
        for request_id in found:
            self._submissions.pop(request_id, None)
        return found

    def _remember(self, request_id: str, submission: Submission) -> None:
        """Keep where and when ``request_id`` was submitted, forgetting the oldest past the cap."""
        self._submissions[request_id] = submission
        self._submissions.move_to_end(request_id)
        while len(self._submissions) > REMEMBERED_SUBMISSIONS:
            self._submissions.popitem(last=False)

    async def _results_from_redis(
        self, waiting: dict[str, None], found: dict[str, InferenceResult]
    ) -> None:
        """Move every id of ``waiting`` whose result Redis holds into ``found``."""
        chunk = 10_000
        ids = list(waiting)
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            values = await mget(self._redis, [self._topics.result_key(i) for i in part])
            for request_id, raw in zip(part, values, strict=True):
                if raw is not None and request_id in waiting:
                    try:
                        found[request_id] = decode_result(raw, _sniff(raw))
                    except SchemaError as error:  # one bad value must not hide the others
                        log.warning("undecodable cached result of %s: %s", request_id, error)
                        continue
                    del waiting[request_id]

    async def _results_from_topics(
        self,
        waiting: dict[str, None],
        found: dict[str, InferenceResult],
        submissions: dict[str, Submission],
    ) -> None:
        """Move ids of ``waiting`` into ``found`` from their result topics once overdue.

        ``submissions``: where and when the ids of ``waiting`` that this client sent went.
        A result read from a topic is held until its request has been waiting for
        `result_topic_fallback_s`: until then Redis, written first, has the final word (the
        topic may carry a small stand-in for a result too large for Kafka).
        """
        if not submissions:
            return
        fallback_s = self._settings.result_topic_fallback_s
        first_due = min(s.submitted_monotonic_s for s in submissions.values()) + fallback_s
        await asyncio.sleep(max(0.0, first_due - time.monotonic()))
        held: dict[str, InferenceResult] = {}
        while pending := {i: s for i, s in submissions.items() if i in waiting}:
            try:
                async with ResultTopicScan(
                    kafka=self._settings.kafka,
                    submissions=pending,
                    partitions_for=self._producer.partitions_for,
                ) as scan:
                    while pending:
                        for request_id, result in (
                            await scan.read(pending, timeout_ms=SCAN_POLL_MS)
                        ).items():
                            held.setdefault(request_id, result)
                        now = time.monotonic()
                        for request_id in list(held):
                            if request_id not in waiting:
                                del held[request_id]  # Redis answered first
                            elif now - submissions[request_id].submitted_monotonic_s >= fallback_s:
                                found[request_id] = held.pop(request_id)
                                del waiting[request_id]
                        pending = {i: s for i, s in pending.items() if i in waiting}
            except KafkaError as error:
                log.warning("result topic scan failed, retrying: %r", error)
                await asyncio.sleep(SCAN_RETRY_S)


def _sniff(value: bytes) -> ContentType:
    """Results are cached in their request's encoding: a JSON object starts with ``{``."""
    return ContentType.JSON if value[:1] == b"{" else ContentType.MSGPACK
