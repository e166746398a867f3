"""The fault suite's harness: worker processes, a workload, RSS sampling and one invariant.

A fault test starts real ``python -m workers`` processes (`WorkerFleet`), publishes a
workload (`publish_workload`), watches the results topic as results arrive
(`ResultWatcher`), injects its fault, and then checks one invariant (`check_invariant`):
every id has exactly one result in Redis, the results topic holds a result for every id
(duplicates counted), no id has two different answers, outputs match the model run directly,
and the surviving workers are healthy. Each test reports one `FaultRow`, printed and appended
to ``{INFERQ_CACHE_DIR}/faults/results.jsonl`` for the note's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from deploy.local.demo import model_outputs
from deploy.local.processes import free_port
from deploy.local.stack import default_cache_dir
from producers.client import InferenceClient
from producers.load import random_requests
from schemas.codec import decode_result
from schemas.messages import InferenceRequest, InferenceResult, ResultStatus, now_ms
from schemas.topics import TopicNames
from tests.integration.test_worker_process import children_of
from tests.integration.worker_harness import Deployment, spawn_worker_cli, stop_process

WORKLOAD = 20_000
"""Requests of every fault test's workload (the issue's floor)."""
MIB = 1024 * 1024


def report_path() -> Path:
    """Where each fault test appends its row (JSON lines)."""
    return default_cache_dir() / "faults" / "results.jsonl"


async def poll_until(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout_s: float, interval_s: float = 0.05
) -> None:
    """Check ``condition`` every ``interval_s`` until it holds; TimeoutError after
    ``timeout_s`` (for states no event announces: processes, another system's data)."""
    async with asyncio.timeout(timeout_s):
        while True:
            held = condition()
            if not isinstance(held, bool):
                held = await held
            if held:
                return
            await asyncio.sleep(interval_s)


# --- worker processes ---------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        path = Path(f"/proc/{parent}/task/{parent}/children")
        try:
            children = [int(p) for p in path.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.extend(children)
        stack.extend(children)
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


@dataclass
class WorkerProcess:
    """One ``python -m workers --procs 1``: its supervisor and its HTTP port."""

    name: str
    supervisor: subprocess.Popen[bytes]
    http_port: int
    log: Path

    def child(self) -> int | None:
        """The serving child's pid, while it runs."""
        children = children_of(self.supervisor.pid)
        return children[0] if children else None

    def pids(self) -> list[int]:
        """The supervisor and every process below it."""
        return [self.supervisor.pid, *descendants(self.supervisor.pid)]


class WorkerFleet:
    """Worker processes of one deployment, each named, with its own log and HTTP port."""

    def __init__(self, deployment: Deployment, log_dir: Path, **env: str) -> None:
        """env: INFERQ_* settings every worker of the fleet gets."""
        self._deployment = deployment
        self._log_dir = log_dir
        self._env = env
        self.workers: dict[str, WorkerProcess] = {}

    def start(self, name: str) -> WorkerProcess:
        """Start worker ``name`` (its static member id is its name, so a restart rejoins)."""
        port = free_port()
        log = self._log_dir / f"{name}.log"
        supervisor = spawn_worker_cli(
            self._deployment, log, "--procs", "1",
            **{**self._env, "INFERQ_WORKER_ID": name, "INFERQ_HTTP_PORT": str(port)},
        )  # fmt: skip
        worker = WorkerProcess(name=name, supervisor=supervisor, http_port=port, log=log)
        self.workers[name] = worker
        return worker

    def stop(self, name: str) -> int:
        """SIGTERM worker ``name`` and wait for its exit code."""
        worker = self.workers.pop(name)
        return stop_process(worker.supervisor)

    def pids(self) -> list[int]:
        """Every process of every running worker."""
        # A snapshot: workers are started and stopped from threads (to_thread) meanwhile.
        return [pid for worker in list(self.workers.values()) for pid in worker.pids()]

    async def kill_child(self, name: str, *, timeout_s: float = 60) -> None:
        """SIGKILL worker ``name``'s serving child, then wait until the supervisor restarted
        it and the new child is ready again."""
        worker = self.workers[name]
        child = await self._wait_for_child(worker, timeout_s)
        os.kill(child, signal.SIGKILL)
        await poll_until(lambda: worker.child() not in (None, child), timeout_s=timeout_s)
        await self.wait_ready(name, timeout_s=timeout_s)

    async def _wait_for_child(self, worker: WorkerProcess, timeout_s: float) -> int:
        await poll_until(lambda: worker.child() is not None, timeout_s=timeout_s)
        child = worker.child()
        assert child is not None
        return child

    async def wait_ready(self, name: str, *, timeout_s: float = 90) -> None:
        """Until worker ``name`` answers /readyz with 200."""
        worker = self.workers[name]
        async with asyncio.timeout(timeout_s):
            while await http_status(worker.http_port, "/readyz") != 200:
                if worker.supervisor.poll() is not None:
                    raise AssertionError(f"{name} exited:\n{worker.log.read_text()[-3000:]}")
                await asyncio.sleep(0.2)

    async def unhealthy(self, *, timeout_s: float = 60) -> list[str]:
        """The running workers not answering /healthz and /readyz with 200 within
        ``timeout_s`` (readiness may take a probe interval to come back after a fault)."""
        failing = []
        for name, worker in self.workers.items():
            deadline = time.monotonic() + timeout_s
            while True:
                health = await http_status(worker.http_port, "/healthz")
                ready = await http_status(worker.http_port, "/readyz")
                if health == ready == 200:
                    break
                if time.monotonic() > deadline:
                    failing.append(f"{name}: /healthz {health}, /readyz {ready}")
                    break
                await asyncio.sleep(0.5)
        return failing

    def close(self) -> dict[str, int]:
        """Stop every worker still running; their exit codes."""
        return {name: self.stop(name) for name in list(self.workers)}


async def http_status(port: int, path: str) -> int | None:
    """The HTTP status of GET ``path`` on loopback ``port``; None when nothing answers."""

    def get() -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except OSError:
            return None

    return await asyncio.to_thread(get)


@contextlib.asynccontextmanager
async def worker_fleet(
    deployment: Deployment, log_dir: Path, **env: str
) -> AsyncIterator[WorkerFleet]:
    """A `WorkerFleet` whose workers are all stopped on exit."""
    fleet = WorkerFleet(deployment, log_dir, **env)
    try:
        yield fleet
    finally:
        await asyncio.to_thread(fleet.close)


class RssSampler:
    """Samples the summed RSS of a fleet's processes every ``interval_s``; keeps the peak."""

    def __init__(self, fleet: WorkerFleet, *, interval_s: float = 0.2) -> None:
        self._fleet = fleet
        self._interval_s = interval_s
        self.peak_bytes = 0
        self.peak_process_bytes = 0
        """The largest RSS of any one process."""
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> int:
        """One sample now: the fleet's summed RSS."""
        sizes = [rss_bytes(pid) for pid in self._fleet.pids()]
        total = sum(sizes)
        self.peak_bytes = max(self.peak_bytes, total)
        self.peak_process_bytes = max(self.peak_process_bytes, *sizes, 0)
        return total

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._interval_s)

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run(), name="fault-rss")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# --- the workload -------------------------------------------------------------------------


def mlp_workload(count: int = WORKLOAD, *, seed: int = 0) -> list[InferenceRequest]:
    """``count`` requests of the example MLP with seeded inputs."""
    return random_requests(model="mlp", count=count, input_name="input", row_shape=[784], seed=seed)


async def publish_workload(
    client: InferenceClient,
    requests: Sequence[InferenceRequest],
    *,
    per_second: float | None,
    until: asyncio.Event | None = None,
    progress: list[int] | None = None,
) -> None:
    """Publish every request and wait for every ack, so that no request is lost before the
    workers saw it.

    per_second: the pace (None: as fast as Kafka takes them); with ``until``, the pace only
        until that event is set, then as fast as possible: a slow trickle keeps requests
        coming for as long as a fault lasts, however fast the machine.
    progress: its one element is kept at the number of requests published so far.
    """
    deliveries = []
    started = time.monotonic()
    for index, request in enumerate(requests):
        if progress is not None:
            progress[0] = index
        fast = until is not None and until.is_set()
        if per_second is not None and not fast and index % 50 == 0:
            ahead_s = started + index / per_second - time.monotonic()
            if ahead_s > 0:
                if until is None:
                    await asyncio.sleep(ahead_s)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(until.wait(), ahead_s)
        stamped = request.model_copy(update={"created_ms": now_ms()})
        deliveries.append(await client.enqueue(stamped))
    await asyncio.gather(*deliveries)
    if progress is not None:
        progress[0] = len(requests)


# --- watching the results -----------------------------------------------------------------


@dataclass
class ResultWatcher:
    """Reads the results topic (read_committed) while the run goes: every record, per id,
    with its arrival time, so that recovery after a fault can be measured."""

    bootstrap: str
    topic: str
    also: Sequence[str] = ()
    """More topics to read (another model's results, the dead letters), keyed the same way."""
    records: dict[str, list[bytes]] = field(default_factory=dict)
    on_topic: int = 0
    """Records read from ``topic`` itself (duplicates included, ``also`` not)."""
    arrivals: list[float] = field(default_factory=list)
    """Monotonic arrival time of each record, in order."""
    _consumer: AIOKafkaConsumer | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def answered(self) -> int:
        """Distinct ids with at least one result."""
        return len(self.records)

    async def __aenter__(self) -> ResultWatcher:
        self._consumer = AIOKafkaConsumer(
            self.topic,
            *self.also,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="fault-results")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        assert self._consumer is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        try:
            await self._consumer.stop()
        except asyncio.CancelledError:
            # aiokafka's fetcher lets out the cancellation of its own retry sleep (after a
            # request timed out during a fault); only a cancellation of ours goes on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            polled = await self._consumer.getmany(timeout_ms=200)
            for batch in polled.values():
                self._take(batch)

    def _take(self, batch: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        arrived = time.monotonic()
        for record in batch:
            key = (record.key or b"").decode()
            self.records.setdefault(key, []).append(record.value or b"")
            self.on_topic += record.topic == self.topic
            self.arrivals.append(arrived)

    async def wait_answered(self, count: int, *, timeout_s: float) -> None:
        """Until ``count`` distinct ids have a result."""
        async with asyncio.timeout(timeout_s):
            while self.answered < count:
                self._raise_if_failed()
                await asyncio.sleep(0.05)

    async def wait_for_ids(self, ids: Sequence[str], *, timeout_s: float) -> bool:
        """Until every one of ``ids`` has a result; False if some still have none then."""
        missing = set(ids)
        deadline = time.monotonic() + timeout_s
        while missing and time.monotonic() < deadline:
            self._raise_if_failed()
            missing = {i for i in missing if i not in self.records}
            await asyncio.sleep(0.1)
        return not missing

    def _raise_if_failed(self) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()

    async def drain(self, *, timeout_s: float = 60) -> int:
        """Until every record now on the topic has been read (duplicates included); the sum
        of ``topic``'s last stable offsets, which count transaction markers too."""
        assert self._consumer is not None
        partitions = [
            TopicPartition(topic, p)
            for topic in (self.topic, *self.also)
            for p in self._consumer.partitions_for_topic(topic) or ()
        ]
        ends = await self._consumer.end_offsets(partitions)

        async def caught_up() -> bool:
            return not [tp for tp, end in ends.items() if await self._behind(tp, end)]

        await poll_until(caught_up, timeout_s=timeout_s)
        return sum(end for tp, end in ends.items() if tp.topic == self.topic)

    async def _behind(self, partition: TopicPartition, end: int) -> bool:
        assert self._consumer is not None
        try:
            position: int = await self._consumer.position(partition)
        except Exception:  # not assigned yet
            return True
        return position < end

    def recovery_s(self, fault_ended: float) -> float:
        """Seconds from ``fault_ended`` to the first result read after it (results flowing
        again); NaN when none came."""
        after = [t for t in self.arrivals if t >= fault_ended]
        return (after[0] - fault_ended) if after else float("nan")

    def drained_s(self, fault_ended: float) -> float:
        """Seconds from ``fault_ended`` to the last result read (the backlog drained)."""
        return max(self.arrivals[-1] - fault_ended, 0.0) if self.arrivals else float("nan")


# --- the invariant ------------------------------------------------------------------------


@dataclass(kw_only=True)
class FaultRow:
    """One row of the fault table."""

    fault: str
    mode: str
    sent: int
    answered: int
    lost: int
    conflicting: int
    duplicates: int
    wrong_outputs: int
    redis_missing: int
    redis_disagreeing: int
    recovery_s: float
    drained_s: float
    peak_rss_mib: float
    unhealthy: list[str]
    result_offsets: int
    """Offsets taken on the results topic: its records plus any transaction markers."""
    result_records: int
    """Records read from the results topic, duplicates included."""
    extra: dict[str, object] = field(default_factory=dict)

    def line(self) -> str:
        """The row as the note's table shows it."""
        return (
            f"| {self.fault} | {self.mode} | {self.sent} | {self.answered} | {self.lost} | "
            f"{self.conflicting} | {self.duplicates} | {self.recovery_s:.1f} | "
            f"{self.drained_s:.1f} | {self.peak_rss_mib:.0f} |"
        )

    @staticmethod
    def path() -> Path:
        """Where rows are appended."""
        return report_path()

    def report(self) -> None:
        """Print the row and append it to `report_path`."""
        _SESSION_ROWS.append(self)
        print(f"\nFAULT ROW {self.line()} {json.dumps(self.extra)}")
        path = report_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            out.write(json.dumps({"at_ms": now_ms(), **asdict(self)}) + "\n")

    def assert_holds(self, *, exactly_once: bool = False) -> None:
        """The invariant: nothing lost or contradictory, Redis complete, outputs right,
        workers healthy; no duplicates on the topic in exactly-once mode."""
        assert self.lost == 0, self
        assert self.conflicting == 0, self
        assert self.wrong_outputs == 0, self
        assert self.redis_missing == 0, self
        assert self.redis_disagreeing == 0, self
        assert not self.unhealthy, self
        if exactly_once:
            assert self.duplicates == 0, self
            # Each committed transaction leaves a marker, which takes an offset of its own.
            assert self.result_offsets > self.result_records, "no transaction markers"


_SESSION_ROWS: list[FaultRow] = []


def session_rows() -> list[FaultRow]:
    """The rows reported in this test session, in order."""
    return list(_SESSION_ROWS)


def _outcome(result: InferenceResult) -> tuple[str, str | None]:
    return result.status.value, None if result.error is None else result.error.code.value


def _same_answer(a: InferenceResult, b: InferenceResult) -> bool:
    if _outcome(a) != _outcome(b) or len(a.outputs) != len(b.outputs):
        return False
    return all(
        x.name == y.name
        and np.allclose(x.to_numpy(), y.to_numpy(), rtol=1e-4, atol=1e-5)
        for x, y in zip(a.outputs, b.outputs, strict=True)
    )  # fmt: skip


async def check_invariant(
    *,
    fault: str,
    mode: str,
    deployment: Deployment,
    requests: Sequence[InferenceRequest],
    watcher: ResultWatcher,
    fleet: WorkerFleet,
    rss: RssSampler,
    fault_ended: float,
    answer_timeout_s: float = 180,
    expect_ok: bool = True,
) -> FaultRow:
    """Wait for every request's result, then measure the invariant as one `FaultRow`.

    expect_ok: every request of ``requests`` must succeed with the model's own outputs.
    """
    sent_ids = [request.id for request in requests]
    await watcher.wait_for_ids(sent_ids, timeout_s=answer_timeout_s)
    result_offsets = await watcher.drain()
    unhealthy = await fleet.unhealthy()
    rss.sample()

    lost = [i for i in sent_ids if i not in watcher.records]
    duplicates = sum(len(watcher.records[i]) - 1 for i in sent_ids if i in watcher.records)
    first: dict[str, InferenceResult] = {}
    conflicting = 0
    for request_id in sent_ids:
        values = watcher.records.get(request_id, [])
        if not values:
            continue
        results = [decode_result(value) for value in values]
        first[request_id] = results[0]
        if any(not _same_answer(results[0], other) for other in results[1:]):
            conflicting += 1

    topics = TopicNames(prefix=deployment.prefix)
    redis = aioredis.Redis.from_url(deployment.redis_url, socket_timeout=10)
    cached: dict[str, InferenceResult] = {}
    try:
        for start in range(0, len(sent_ids), 1000):
            chunk = sent_ids[start : start + 1000]
            stored: list[bytes | None] = await redis.mget([topics.result_key(i) for i in chunk])
            for request_id, value in zip(chunk, stored, strict=True):
                if value is not None:
                    cached[request_id] = decode_result(value)
    finally:
        await redis.aclose()
    redis_missing = len(sent_ids) - len(cached)
    redis_disagreeing = sum(
        1 for i, result in cached.items() if i in first and not _same_answer(result, first[i])
    )

    wrong = 0
    if expect_ok:
        # Against the version that answered (a request naming none gets the latest).
        by_version: dict[int | None, list[InferenceRequest]] = {}
        for request in requests:
            result = cached.get(request.id)
            if result is None:
                continue
            if result.status is not ResultStatus.OK:
                wrong += 1
            else:
                by_version.setdefault(result.version, []).append(request)
        for version, ran in by_version.items():
            expected = model_outputs(deployment.models_dir / "mlp" / str(version), ran)
            for row, request in enumerate(ran):
                got = cached[request.id].outputs[0].to_numpy()
                if not np.allclose(got, expected[row : row + 1], rtol=1e-4, atol=1e-5):
                    wrong += 1

    return FaultRow(
        fault=fault,
        mode=mode,
        sent=len(sent_ids),
        answered=len(sent_ids) - len(lost),
        lost=len(lost),
        conflicting=conflicting,
        duplicates=duplicates,
        wrong_outputs=wrong,
        redis_missing=redis_missing,
        redis_disagreeing=redis_disagreeing,
        recovery_s=watcher.recovery_s(fault_ended),
        drained_s=watcher.drained_s(fault_ended),
        peak_rss_mib=rss.peak_bytes / MIB,
        unhealthy=unhealthy,
        result_offsets=result_offsets,
        result_records=watcher.on_topic,
    )


# --- one run ------------------------------------------------------------------------------


@dataclass
class FaultRun:
    """A workload under way against a fleet: what a test injects its fault into."""

    deployment: Deployment
    requests: Sequence[InferenceRequest]
    fleet: WorkerFleet
    watcher: ResultWatcher
    rss: RssSampler
    sending: asyncio.Task[None]
    fault_over: asyncio.Event
    published: list[int]
    fault_ended: float = float("nan")
    extra: dict[str, object] = field(default_factory=dict)

    def end_fault(self) -> None:
        """The fault is over: note when and how far the run was, publish the rest at once."""
        self.fault_ended = time.monotonic()
        self.extra.update(
            published_at_fault_end=self.published[0], answered_at_fault_end=self.watcher.answered
        )
        self.fault_over.set()

    async def finish(
        self, *, fault: str, mode: str = "at-least-once", answer_timeout_s: float = 180,
        expect_ok: bool = True,
    ) -> FaultRow:  # fmt: skip
        """Wait for the workload's acks and results; the invariant as measured."""
        if not self.fault_over.is_set():
            self.end_fault()
        await self.sending
        row = await check_invariant(
            fault=fault, mode=mode, deployment=self.deployment, requests=self.requests,
            watcher=self.watcher, fleet=self.fleet, rss=self.rss, fault_ended=self.fault_ended,
            answer_timeout_s=answer_timeout_s, expect_ok=expect_ok,
        )  # fmt: skip
        row.extra.update(self.extra)
        return row


@contextlib.asynccontextmanager
async def fault_run(
    deployment: Deployment,
    log_dir: Path,
    requests: Sequence[InferenceRequest],
    *,
    workers: Sequence[str] = ("w1",),
    per_second: float | None = 500.0,
    publish_first: bool = False,
    also_watch: Sequence[str] = (),
    **env: str,
) -> AsyncIterator[FaultRun]:
    """Start ``workers``, wait until they are ready, then publish ``requests`` at
    ``per_second`` until the test calls `FaultRun.end_fault` (the rest as fast as possible).

    publish_first: publish (and have acknowledged) every request before the workers start,
        for faults of the broker, which would fail the publisher's own sends otherwise.
    """
    topic = TopicNames(prefix=deployment.prefix).results("mlp")
    async with (
        worker_fleet(deployment, log_dir, **env) as fleet,
        ResultWatcher(bootstrap=deployment.bootstrap, topic=topic, also=also_watch) as watcher,
        RssSampler(fleet) as rss,
        deployment.client() as client,
    ):
        fault_over = asyncio.Event()
        published = [0]
        publishing = publish_workload(
            client, requests, per_second=per_second, until=fault_over, progress=published
        )
        if publish_first:
            await publishing
        for name in workers:
            fleet.start(name)
        for name in workers:
            await fleet.wait_ready(name)
        sending = asyncio.create_task(
            asyncio.sleep(0) if publish_first else publishing, name="fault-publish"
        )
        try:
            yield FaultRun(
                deployment=deployment, requests=requests, fleet=fleet, watcher=watcher,
                rss=rss, sending=sending, fault_over=fault_over, published=published,
            )  # fmt: skip
        finally:
            if not sending.done():
                sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
