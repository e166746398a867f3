"""The worker: Kafka intake, dynamic batching, execution and answers, wired together.

`Worker.serve` runs the loop against a `RecordConsumer` and an `AnswerWriter` (see
`workers.ports`), as tasks of one `asyncio.TaskGroup`:

- intake: polls, admits each poll's records (decode and validate), answers bad ones at once,
  answers redeliveries from the cache, queues the rest in the batcher; pauses the partitions
  while too many requests are in flight. It never waits on inference.
- dispatch: takes the most urgent due batch whenever the runner has room, runs it off the
  event loop, turns outcomes into answers.
- writer: writes answers (Redis, then Kafka), then completes their offsets.
- committer: commits, per partition, the offsets below which everything is answered.

`Worker.run` builds the real clients (aiokafka, Redis) and serves with them; a test serves
with in-memory ones and ``burst=True``, which stops once a poll comes back empty and
everything taken is answered, as arq's burst mode does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, KafkaError

from schemas.codec import CodecLimits
from schemas.errors import ErrorCode
from schemas.kafka import check_access as check_kafka_access
from schemas.kafka import client_options
from schemas.messages import Timing, now_ms
from schemas.redis import check_access as check_redis_access
from schemas.redis import connect as connect_redis
from schemas.topics import TopicNames
from workers.admission import Admission
from workers.answers import Answers
from workers.batcher import Batch, Batcher, BatchPolicy
from workers.catalog import TopicCatalog
from workers.errors import MissingTopicsError
from workers.membership import group_instance_id, leave_group
from workers.metrics import WorkerMetrics
from workers.offsets import OffsetTracker
from workers.ports import AnswerWriter, ConsumedRecord, RecordConsumer
from workers.readiness import Condition, Probe, Readiness, probe_forever
from workers.records import Answer, BatchKey, PendingRequest, RecordSource
from workers.reload import ModelReloader
from workers.repository import Change, ModelRepository
from workers.results import ResultWriter
from workers.runner import ModelRunner, RequestSucceeded
from workers.settings import WorkerSettings
from workers.topics import TopicSpec, create_missing, deployment_topics
from workers.transactions import TransactionalResultWriter

log = structlog.get_logger(__name__)

POLL_TIMEOUT_MS = 100
BATCHES_AHEAD = 2
"""Batches handed to the runner at once: one running and one queued behind it, so the model
does not wait on the event loop between batches."""
CLOSE_RESERVE_S = 5.0
"""Part of the shutdown bound kept for committing and leaving the group."""
CLOSE_MIN_S = 1.0
"""Least time given to each client's close, even past the bound."""
WRITE_GROUP_BYTES = 16 * 1024 * 1024
"""Coalesce queued answers into one write up to this many bytes of results."""
ADMIT_SLICE = 128
"""Records admitted between two yields to the event loop."""
RESUME_FRACTION = 0.75
"""Paused intake resumes once in-flight requests and bytes fall to this fraction of their bounds."""
FETCH_MAX_BYTES = 8 * 1024 * 1024
PARTITION_FETCH_MAX_BYTES = 1024 * 1024


class Worker:
    """One worker process's serving loop: consume, batch, infer, answer, commit."""

    def __init__(
        self,
        *,
        settings: WorkerSettings,
        repository: ModelRepository,
        runner: ModelRunner,
        metrics: WorkerMetrics,
        reloader: ModelReloader | None = None,
    ) -> None:
        """reloader: keeps the served versions in step with the repository while serving."""
        self._settings = settings
        self._repository = repository
        self._generation = repository.generation
        self._reloader = reloader
        if reloader is not None:
            reloader.follow(self.models_changed)
        self._runner = runner
        self._metrics = metrics
        self._topics = TopicNames(prefix=settings.kafka.topic_prefix)
        self._answer_builder = Answers(topics=self._topics, worker_id=settings.worker_id)
        self._admission = Admission(
            repository=repository,
            answers=self._answer_builder,
            limits=CodecLimits(max_message_bytes=settings.max_message_bytes),
            reply_topic_prefixes=settings.reply_topic_prefix_list,
        )
        self._readiness = Readiness()
        self._batcher: Batcher[BatchKey, PendingRequest] = Batcher(policy_for=self._policy_for)
        self._tracker: OffsetTracker[Any] = OffsetTracker()
        self._answers: asyncio.Queue[list[Answer]] = asyncio.Queue(
            maxsize=settings.max_in_flight + settings.fetch_max_records
        )
        self._exactly_once = settings.exactly_once
        self._write_lock = asyncio.Lock()
        """Held by an exactly-once write for its whole transaction (see `_write_transaction`)."""
        self._batch_ready = asyncio.Event()
        self._progress = asyncio.Event()
        self._flush_requests = 0
        """While positive, every queued request is due now (shutdown, revocation)."""
        self._paused = False
        self._intake_open = True
        self._closing = False
        self._consumer: RecordConsumer | None = None
        self._writer: AnswerWriter | None = None
        self._subscribed: list[str] = []
        self._lag_consumer: AIOKafkaConsumer | None = None
        """The real consumer, whose partitions' end offsets the lag sampler reads."""
        self._resubscribe: Callable[[], Awaitable[None]] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        """Batches handed to the runner and not yet answered."""
        self._deadline: float | None = None
        """Monotonic time by which shutdown must be over; set when stopping begins."""
        self._log = log.bind(worker=settings.worker_id)

    @property
    def ready(self) -> bool:
        """True while the worker serves: in its group, with Kafka and Redis answering."""
        return self._readiness.ready

    @property
    def readiness(self) -> Readiness:
        """What the worker waits for before it is ready."""
        return self._readiness

    @property
    def assignment(self) -> frozenset[Any]:
        """The partitions this worker consumes right now."""
        if self._consumer is None or self._closing:
            return frozenset()
        return frozenset(self._consumer.assignment())

    @property
    def in_flight(self) -> int:
        """Requests consumed and not yet answered."""
        return self._tracker.in_flight

    @property
    def in_flight_bytes(self) -> int:
        """Record bytes of the requests consumed and not yet answered."""
        return self._tracker.in_flight_bytes

    def request_topics(self) -> list[str]:
        """The request topics of every served model."""
        return [self._topics.requests(name) for name in self._repository.names()]

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve from Kafka until ``stop`` is set, then finish in-flight work, commit and leave."""
        s = self._settings
        # Built once: with TLS, each build reads the CA, certificate and key files again.
        kafka_options = client_options(s.kafka)
        transactional_id = s.transactional_id if s.exactly_once else None

        def new_producer() -> AIOKafkaProducer:
            return AIOKafkaProducer(
                **kafka_options,
                client_id=f"{s.kafka.client_id}-{s.worker_id}",
                acks="all",
                enable_idempotence=True,
                transactional_id=transactional_id,
                transaction_timeout_ms=s.transaction_timeout_ms,
                # The writer builds whole batches itself; lingering only delays their send
                # (a group's Kafka write took 12.8 ms at the median with 2 ms, 4.8 with 0).
                linger_ms=0,
                max_batch_size=512 * 1024,
                max_request_size=s.max_message_bytes,
            )

        admin = AIOKafkaAdminClient(
            **kafka_options, client_id=f"{s.kafka.client_id}-{s.worker_id}-admin"
        )
        consumer = AIOKafkaConsumer(
            **kafka_options,
            client_id=f"{s.kafka.client_id}-{s.worker_id}",
            group_id=s.group_id,
            group_instance_id=group_instance_id(s),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Requests a producer wrote in a transaction count only once it committed; for
            # requests written without one this reads the same as read_uncommitted.
            isolation_level="read_committed",
            max_poll_records=s.fetch_max_records,
            session_timeout_ms=s.session_timeout_ms,
            # Revocation finishes in-flight work (up to the shutdown bound) before it returns;
            # the group must wait for that rather than drop this member from the rebalance.
            rebalance_timeout_ms=int(s.shutdown_timeout_s * 1000) + 10_000,
            heartbeat_interval_ms=max(s.session_timeout_ms // 4, 100),
            # Small fetches: the broker still returns a larger first batch whole (KIP-74), and
            # huge responses cost more in fresh-buffer page faults than they save in trips.
            # No more than the byte bound either: a poll is admitted whole before intake pauses.
            fetch_max_bytes=min(FETCH_MAX_BYTES, s.max_in_flight_bytes),
            max_partition_fetch_bytes=min(PARTITION_FETCH_MAX_BYTES, s.max_in_flight_bytes),
            # The broker answers a fetch as soon as it has data; with none it holds the
            # request this long, and a record arriving meanwhile waits for the next round.
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            # Notice new partitions (and topics created after start) within a minute.
            metadata_max_age_ms=60_000,
        )
        redis = connect_redis(s.redis)
        writer_class = (
            partial(TransactionalResultWriter, group_id=s.group_id)
            if s.exactly_once
            else ResultWriter
        )
        writer = writer_class(
            producer_factory=new_producer,
            redis=redis,
            catalog=TopicCatalog(admin=admin),
            answers=self._answer_builder,
            result_ttl_s=s.redis.result_ttl_s,
            metrics=self._metrics,
            max_backoff_s=s.write_retry_max_backoff_s,
            max_record_bytes=s.max_message_bytes,
        )
        self._consumer = consumer
        try:
            try:
                await admin.start()
            except KafkaError:
                await check_kafka_access(s.kafka)  # a refusal says so, not "cannot bootstrap"
                raise
            await check_redis_access(redis, url=s.redis.redacted_url)
            if s.create_topics:
                await create_missing(admin, self._topic_specs(self._repository.names()))
            else:
                await self._require_request_topics(admin)
            await writer.start()
            await consumer.start()
            self._subscribed = self.request_topics()
            consumer.subscribe(topics=self._subscribed, listener=_Revocation(self))
            self._resubscribe = partial(self._follow_models, consumer, admin)
            self._log.info(
                "worker_started", topics=self._subscribed, group=s.group_id,
                exactly_once=s.exactly_once, transactional_id=transactional_id,
            )  # fmt: skip
            self._lag_consumer = consumer
            await self.serve(
                consumer=consumer,
                writer=writer,
                stop=stop,
                probes={
                    # Metadata of one topic that exists: cheap however large the cluster,
                    # and it can create nothing.
                    Condition.KAFKA: partial(admin.describe_topics, self.request_topics()[:1]),
                    Condition.REDIS: redis.ping,
                },
            )
        finally:
            self._closing = True
            # Leaving the group (consumer.stop) hands our partitions to the others at once.
            for closing in (leave_group(consumer), writer.close(), admin.close(), redis.aclose()):
                left_s = (
                    CLOSE_RESERVE_S
                    if self._deadline is None
                    else (self._deadline - time.monotonic())
                )
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(closing, max(left_s, CLOSE_MIN_S))
            self._log.info("worker_stopped")

    async def serve(
        self,
        *,
        consumer: RecordConsumer,
        writer: AnswerWriter,
        stop: asyncio.Event,
        probes: Mapping[Condition, Probe] | None = None,
        burst: bool = False,
    ) -> None:
        """Serve ``consumer``'s records until ``stop`` is set (or, with ``burst``, until a poll
        comes back empty), then answer everything taken and commit.

        probes: readiness checks run in the background; without them Kafka and Redis count
            as answering. A task that fails fails the worker, with its own exception.
        """
        self._consumer = consumer
        self._writer = writer
        if not probes:
            self._readiness.set(Condition.KAFKA, True)
            self._readiness.set(Condition.REDIS, True)
        if burst:  # no rebalance listener will say so
            self._readiness.set(Condition.ASSIGNED, True)
        self._readiness.set(Condition.SERVING, True)
        try:
            async with asyncio.TaskGroup() as tasks:
                intake = tasks.create_task(self._intake_loop(consumer, burst), name="inferq-intake")
                loops = [
                    tasks.create_task(self._dispatch_loop(tasks), name="inferq-dispatch"),
                    tasks.create_task(self._writer_loop(writer), name="inferq-writer"),
                ]
                if not self._exactly_once:  # else offsets commit in the writer's transactions
                    loops.append(tasks.create_task(self._commit_loop(), name="inferq-committer"))
                if self._reloader is not None:
                    loops.append(tasks.create_task(self._reloader.run(), name="inferq-reloader"))
                if self._lag_consumer is not None:
                    loops.append(
                        tasks.create_task(self._lag_loop(self._lag_consumer), name="inferq-lag")
                    )
                if probes:
                    loops.append(tasks.create_task(
                        probe_forever(self._readiness, dict(probes),
                                      interval_s=self._settings.readiness_interval_s),
                        name="inferq-readiness",
                    ))  # fmt: skip
                await _first_of(stop.wait(), intake)
                await self._stop_intake(intake)
                await self._finish_in_flight(
                    timeout_s=max(self._deadline_left() - CLOSE_RESERVE_S, 1.0)
                )
                for task in [*loops, *self._batches]:
                    task.cancel()
        except BaseExceptionGroup as group:
            # One task's failure cancels the rest; report it as itself, not as a group.
            raise group.exceptions[0] from None
        finally:
            self._readiness.set(Condition.SERVING, False)
            self._closing = True

    async def _stop_intake(self, intake: asyncio.Task[None]) -> None:
        self._log.info("worker_stopping", in_flight=self._tracker.in_flight)
        # One deadline for the whole shutdown, leaving time to leave the group cleanly.
        self._deadline = time.monotonic() + self._settings.shutdown_timeout_s
        # Let intake finish the poll it is in, so nothing it took is left half-admitted.
        self._intake_open = False
        # On time-out wait_for cancels it; what it had tracked is simply not committed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(intake), self._settings.shutdown_timeout_s / 4)
        if not intake.done():
            intake.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await intake

    def _forget_stale_models(self) -> None:
        """Drop what admission caches per model version once the repository has changed."""
        if self._repository.generation != self._generation:
            self._generation = self._repository.generation
            self._admission.forget_models()

    async def models_changed(self, change: Change) -> None:
        """Follow the repository: drop what is cached per version (so a retired one can go
        even while no record arrives), consume the request topics of exactly the served
        models."""
        self._forget_stale_models()
        if change.names_changed and self._resubscribe is not None and not self._closing:
            await self._resubscribe()

    def _topic_specs(self, models: Sequence[str]) -> list[TopicSpec]:
        """The request and result topics of ``models`` and the dead-letter topic, as the
        settings want them created."""
        s = self._settings
        return deployment_topics(
            self._topics, models, partitions=s.topic_partitions,
            replication_factor=s.topic_replication_factor, retention_ms=s.topic_retention_ms,
        )  # fmt: skip

    async def _follow_models(self, consumer: AIOKafkaConsumer, admin: AIOKafkaAdminClient) -> None:
        s = self._settings
        names = self._repository.names()
        wanted = [self._topics.requests(name) for name in names]
        if s.create_topics:
            await create_missing(admin, self._topic_specs(names))
        else:
            existing = set(await admin.list_topics())
            missing = [topic for topic in wanted if topic not in existing]
            if missing:
                self._log.error("request_topics_missing", topics=missing)
                wanted = [topic for topic in wanted if topic not in missing]
        if wanted == self._subscribed:
            return
        # A new subscription rebalances the group: partitions of a model's topic go only to
        # the workers that serve it; our revocation listener answers what it holds.
        if wanted:
            consumer.subscribe(topics=wanted, listener=_Revocation(self))
        else:  # nothing served: leave every topic to workers that have its model
            await self.on_partitions_revoked(set(consumer.assignment()))  # unsubscribe won't
            consumer.unsubscribe()
        self._subscribed = wanted
        self._log.info("subscription_changed", topics=wanted)

    def _deadline_left(self) -> float:
        return math.inf if self._deadline is None else self._deadline - time.monotonic()

    async def _require_request_topics(self, admin: AIOKafkaAdminClient) -> None:
        """Refuse to start without the request topics: subscribing to a missing topic would
        have a broker with `auto.create.topics.enable` create it with default settings."""
        existing = set(await admin.list_topics())
        missing = [topic for topic in self.request_topics() if topic not in existing]
        if missing:
            raise MissingTopicsError(
                f"request topics {missing} do not exist: create them (partitions, replication "
                "and retention as you need) or set INFERQ_CREATE_TOPICS=true"
            )

    async def _finish_in_flight(
        self, *, timeout_s: float, partitions: Iterable[Any] | None = None
    ) -> bool:
        """Run and answer everything consumed (of ``partitions``, or all), then commit."""
        wanted = None if partitions is None else list(partitions)

        def pending() -> int:
            if wanted is None:
                return self._tracker.in_flight
            return sum(self._tracker.pending(tp) for tp in wanted)

        deadline = time.monotonic() + timeout_s
        self._flush_requests += 1
        self._batch_ready.set()
        try:
            while pending() and time.monotonic() < deadline:
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), 0.1)
        finally:
            self._flush_requests -= 1
        with contextlib.suppress(TimeoutError):  # a commit that cannot finish is left undone
            await asyncio.wait_for(self._commit(), max(deadline - time.monotonic(), 2.0))
        left = pending()
        if left:
            self._log.warning("unfinished_at_deadline", requests=left, timeout_s=timeout_s)
        return left == 0

    # --- intake ---------------------------------------------------------------------------

    async def _intake_loop(self, consumer: RecordConsumer, burst: bool) -> None:
        while self._intake_open:
            if self._apply_backpressure(consumer):
                # Paused: a poll would only wait out its timeout, so wait for answers instead.
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), POLL_TIMEOUT_MS / 1000)
                continue
            polled = await consumer.getmany(
                timeout_ms=POLL_TIMEOUT_MS, max_records=self._settings.fetch_max_records
            )
            if polled:
                await self._admit(polled)
            elif burst and not self._paused:
                return

    def _apply_backpressure(self, consumer: RecordConsumer) -> bool:
        """Pause intake at `max_in_flight` requests or `max_in_flight_bytes` record bytes,
        resume once both are below a fraction of their bound; True while paused."""
        bound = self._settings.max_in_flight
        bytes_bound = self._settings.max_in_flight_bytes
        in_flight = self._tracker.in_flight
        in_flight_bytes = self._tracker.in_flight_bytes
        self._metrics.in_flight.set(in_flight)
        if not self._paused and (in_flight >= bound or in_flight_bytes >= bytes_bound):
            consumer.pause(*consumer.assignment())
            self._paused = True
            self._metrics.pauses.inc()
            self._metrics.paused.set(1)
            self._log.debug("intake_paused", in_flight=in_flight, in_flight_bytes=in_flight_bytes)
        elif (
            self._paused
            and in_flight <= bound * RESUME_FRACTION
            and in_flight_bytes <= bytes_bound * RESUME_FRACTION
        ):
            consumer.resume(*consumer.paused())
            self._paused = False
            self._metrics.paused.set(0)
            self._log.debug("intake_resumed", in_flight=in_flight, in_flight_bytes=in_flight_bytes)
        elif self._paused:
            # Partitions assigned while paused must stay paused too.
            consumer.pause(*consumer.assignment())
        return self._paused

    async def _admit(self, polled: Mapping[Any, Sequence[ConsumedRecord]]) -> None:
        """Admit one whole poll: track its offsets per partition, then each record."""
        received_at = time.monotonic()
        received_ms = int(time.time() * 1000)
        self._forget_stale_models()
        admit = self._admission.admit
        answers: list[Answer] = []
        admitted: list[PendingRequest] = []
        since_yield = 0
        for partition, records in polled.items():
            lease = self._tracker.track_many(
                partition,
                [record.offset for record in records],
                first_timestamp_ms=records[0].timestamp if records else -1,
                sizes=[len(record.value or b"") for record in records],
            )
            for record in records:
                since_yield += 1
                if since_yield == ADMIT_SLICE:
                    # A large poll takes tens of ms to admit: let dispatch and the writer
                    # run meanwhile, or every batch in flight waits for the whole poll.
                    since_yield = 0
                    await asyncio.sleep(0)
                outcome = admit(
                    source=RecordSource(partition, record.offset, lease),
                    key=record.key,
                    value=record.value,
                    headers=record.headers,
                    received_at=received_at,
                    received_ms=received_ms,
                )
                if type(outcome) is PendingRequest:
                    admitted.append(outcome)
                else:
                    answers.append(outcome)  # type: ignore[arg-type]  # the other half of the union
        if admitted:
            answers.extend(await self._answer_redeliveries(admitted))
        if answers:
            await self._answers.put(answers)

    async def _answer_redeliveries(self, admitted: list[PendingRequest]) -> list[Answer]:
        """Queue the admitted requests, except those whose id is settled already (a cached
        result is sent again; an id held by other inputs is answered DUPLICATE_ID)."""
        assert self._writer is not None
        settled = await self._writer.settled([pending.to for pending in admitted])
        answers = []
        add = self._batcher.add
        for pending, answer in zip(admitted, settled, strict=True):
            if answer is None:
                add(pending.key, pending, rows=pending.rows, received_at=pending.received_at,
                    priority=pending.priority)  # fmt: skip
            else:
                answers.append(answer)
        if len(answers) < len(admitted):
            self._batch_ready.set()
        return answers

    # --- dispatch -------------------------------------------------------------------------

    def _policy_for(self, key: BatchKey) -> BatchPolicy:
        config = key.served.config
        return BatchPolicy(
            max_batch_size=config.max_batch_size, max_batch_delay_ms=config.max_batch_delay_ms
        )

    async def _dispatch_loop(self, tasks: asyncio.TaskGroup) -> None:
        slots = asyncio.Semaphore(BATCHES_AHEAD)
        while True:
            await slots.acquire()
            batch = await self._next_due_batch()
            task = tasks.create_task(self._run_and_queue(batch, slots), name="inferq-batch")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _next_due_batch(self) -> Batch[BatchKey, PendingRequest]:
        while True:
            now = math.inf if self._flush_requests else time.monotonic()
            batch = self._batcher.pop_due(now)
            if batch is not None:
                return batch
            self._batch_ready.clear()
            due_at = self._batcher.next_due_at()
            wait_s = None if due_at is None else max(due_at - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_ready.wait(), wait_s)

    async def _run_and_queue(
        self, batch: Batch[BatchKey, PendingRequest], slots: asyncio.Semaphore
    ) -> None:
        try:
            try:
                answers = await self._run(batch)
            except Exception as error:
                # A fault of ours, not of the requests: answer them INTERNAL rather than
                # leave their offsets uncommitted forever behind a dead task.
                self._log.exception(
                    "batch_failed", model=batch.key.model, requests=len(batch.items)
                )
                message = f"inferq failed while running this request: {type(error).__name__}"
                answers = [
                    self._answer_builder.failed(
                        p.to, ErrorCode.INTERNAL, message, version=p.model.version
                    )
                    for p in batch.items
                ]
            if answers:
                await self._answers.put(answers)
        finally:
            slots.release()

    async def _run(self, batch: Batch[BatchKey, PendingRequest]) -> list[Answer]:
        started_ms = time.time() * 1000
        live: list[PendingRequest] = []
        answers: list[Answer] = []
        for pending in batch.items:
            lease = pending.source.lease
            if lease is not None and lease.revoked:
                continue  # its partition's new owner answers it
            deadline = pending.deadline_ms
            if deadline is not None and deadline <= started_ms:
                answers.append(
                    self._answer_builder.expired(
                        pending.to, deadline_ms=deadline, version=pending.model.version
                    )
                )
            else:
                live.append(pending)
        if not live:
            return answers
        model = live[0].model
        outcome = await self._runner.run_batch(
            model, [pending.inputs for pending in live], batch.key.parameters
        )
        labels = (model.name, str(model.version))
        batch_size = len(live)
        self._metrics.batch_size.labels(*labels).observe(batch_size)
        self._metrics.inference_seconds.labels(*labels).observe(outcome.infer_ms / 1000)
        succeeded, failed = self._answer_builder.succeeded, self._answer_builder.failed
        infer_ms = outcome.infer_ms
        created_ms = now_ms()
        queued_ms: list[float] = []
        for pending, result in zip(live, outcome.outcomes, strict=True):
            # As the contract says: from the producer's created_ms when it has one.
            queue_ms = max(started_ms - (pending.created_ms or pending.received_ms), 0.0)
            queued_ms.append(queue_ms)
            if isinstance(result, RequestSucceeded):
                answers.append(
                    succeeded(pending, result.outputs, queue_ms=queue_ms, infer_ms=infer_ms,
                              batch_size=batch_size, created_ms=created_ms)
                )  # fmt: skip
            else:
                timing = Timing(queue_ms=queue_ms, infer_ms=infer_ms, batch_size=batch_size)
                answers.append(
                    failed(pending.to, result.error.code, result.error.message,
                           version=model.version, timing=timing)
                )  # fmt: skip
        self._metrics.queue_seconds.observe_many(labels, np.asarray(queued_ms) / 1000)
        return answers

    # --- writing and committing -----------------------------------------------------------

    async def _writer_loop(self, writer: AnswerWriter) -> None:
        while True:
            group = await self._answers.get()
            # Coalesce what else is waiting into one Redis pipeline and one round of acks.
            size = sum(len(answer.value) for answer in group)
            while not self._answers.empty() and len(group) < 4096 and size < WRITE_GROUP_BYTES:
                more = self._answers.get_nowait()
                group.extend(more)
                size += sum(len(answer.value) for answer in more)
            if self._exactly_once:
                written = await self._write_transaction(writer, group)
            else:
                written = await writer.write(group)
                self._complete(written)
            self._metrics.answered_many(
                Counter((a.model, a.version, a.outcome, a.code) for a in written)
            )
            self._observe_end_to_end(written)
            self._progress.set()

    def _complete(self, written: Sequence[Answer]) -> None:
        complete = self._tracker.complete
        for answer in written:
            lease = answer.source.lease
            if lease is not None:
                complete(lease, answer.source.offset)

    async def _write_transaction(self, writer: AnswerWriter, group: list[Answer]) -> list[Answer]:
        """Write ``group`` with the offsets it completes, in one transaction (exactly-once).

        Answers of revoked partitions are dropped, not written: their new owner answers
        them, and its results are the ones a read_committed reader sees. The write holds
        `_write_lock`, which a revocation takes before it gives its partitions up, so no
        transaction commits a partition's records or offsets after it changed hands.
        """
        async with self._write_lock:
            live = [a for a in group if a.source.lease is None or not a.source.lease.revoked]
            if not live:
                return []
            completions = [
                (a.source.lease, a.source.offset) for a in live if a.source.lease is not None
            ]
            sent: dict[Any, int] = {}

            def offsets() -> dict[Any, int]:
                # Called inside the transaction, just before it commits (again if retried).
                sent.clear()
                sent.update(self._tracker.committable_with(completions))
                return sent

            written = await writer.write(live, offsets=offsets)
            self._complete(written)
            self._tracker.mark_committed(sent)
            if sent:
                self._metrics.commits.inc()
            return written

    def _observe_end_to_end(self, written: Sequence[Answer]) -> None:
        by_version: dict[tuple[str, str], list[int]] = {}
        for answer in written:
            requested_ms = answer.requested_ms
            if requested_ms is not None:
                by_version.setdefault((answer.model, answer.version), []).append(requested_ms)
        if not by_version:
            return
        now_ms = time.time() * 1000
        for labels, requested in by_version.items():
            ages = (now_ms - np.asarray(requested, dtype=np.float64)) / 1000
            self._metrics.end_to_end_seconds.observe_many(labels, np.maximum(ages, 0.0))

    async def _lag_loop(self, consumer: AIOKafkaConsumer) -> None:
        """Sample each assigned partition's lag: records not answered yet (see the metric)."""
        gauge = self._metrics.consumer_lag_records
        seconds = self._metrics.consumer_lag_seconds
        shown: set[Any] = set()
        topics_shown: set[str] = set()
        while True:
            await asyncio.sleep(self._settings.lag_interval_s)
            assigned = set(consumer.assignment())
            ends: dict[Any, int] = {}
            if assigned:
                try:
                    ends = await consumer.end_offsets(list(assigned))
                except KafkaError as error:
                    self._log.debug("lag_sample_failed", error=repr(error))
            for partition, end in ends.items():
                floor = self._tracker.first_unanswered(partition)
                if floor is None:
                    with contextlib.suppress(KafkaError):
                        floor = await consumer.committed(partition)
                if floor is None:
                    continue
                gauge.labels(topic=partition.topic, partition=str(partition.partition)).set(
                    max(end - floor, 0)
                )
            for partition in shown - assigned:
                with contextlib.suppress(KeyError):
                    gauge.remove(partition.topic, str(partition.partition))
            shown = assigned
            now_ms = time.time() * 1000
            ages: dict[str, float] = {}
            for partition in assigned:
                oldest = self._tracker.oldest_ms(partition)
                age = 0.0 if oldest is None else max(now_ms - oldest, 0.0) / 1000
                ages[partition.topic] = max(ages.get(partition.topic, 0.0), age)
            for topic, age in ages.items():
                seconds.labels(topic=topic).set(age)
            for topic in topics_shown - set(ages):
                with contextlib.suppress(KeyError):
                    seconds.remove(topic)
            topics_shown = set(ages)

    async def _commit_loop(self) -> None:
        interval_s = self._settings.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            await self._commit()

    async def _commit(self) -> None:
        consumer = self._consumer
        if consumer is None or self._exactly_once:  # committed by each write's transaction
            return
        offsets = self._tracker.committable()
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as error:
            self._log.warning("commit_failed", error=repr(error), partitions=len(offsets))
            return
        self._tracker.mark_committed(offsets)
        self._metrics.commits.inc()

    def on_partitions_assigned(self) -> None:
        """A rebalance gave this worker its partitions: it may be ready now."""
        self._metrics.rebalances.inc()
        self._readiness.set(Condition.ASSIGNED, True)

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        """Finish, answer and commit the revoked partitions' requests, then let them go."""
        if not revoked:
            return
        owned = [tp for tp in revoked if self._tracker.tracks(tp)]
        self._log.info("partitions_revoked", partitions=len(revoked), tracked=len(owned))
        if owned and not self._closing:
            await self._finish_in_flight(
                timeout_s=self._settings.shutdown_timeout_s, partitions=owned
            )
        if self._exactly_once:
            # Let a transaction in flight end first: its offsets must not commit after the
            # partitions changed hands. Bounded, as the group waits for us only so long.
            bound_s = self._settings.shutdown_timeout_s
            try:
                await asyncio.wait_for(self._write_lock.acquire(), bound_s)
            except TimeoutError:
                self._log.error("revoked_during_transaction", partitions=len(revoked))
            else:
                self._write_lock.release()
        dropped = self._tracker.revoke(revoked)
        if dropped:
            self._log.warning("revoked_unanswered", requests=dropped)


async def _first_of(*waits: Awaitable[object]) -> None:
    """Return when the first of ``waits`` is done; the others are cancelled unless they are
    tasks owned elsewhere."""
    pending = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future, wait in zip(pending, waits, strict=True):
            if future is not wait:
                future.cancel()


class _Revocation(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        await self._worker.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        names = sorted(f"{tp.topic}/{tp.partition}" for tp in assigned)
        log.info("partitions_assigned", partitions=names)
        self._worker.on_partitions_assigned()
