"""Backfills: a dataset replayed through the request topics, answered into a file in order.

Each row becomes a request with the id `{run}:{row}`, so a backfill started again with the same
run id knows its rows: it reads what its checkpoint (`{output}.{run}.progress`) already holds,
asks Redis for rows answered after the checkpoint's last write (one MGET per 10,000), and
publishes only the rest. Results come back on the run's own reply topic
(`{prefix}.replies.backfill-{run}`, reused by a restart). The output is written once every row
is answered, in input order, error results included with their code; then the checkpoint goes.

The checkpoint is a stream of msgpack pairs `[row, encoded result]`, appended and flushed as
results arrive; a pair torn by a kill is dropped when it is read back.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import msgpack

from producers.client import InferenceClient
from producers.datasets import Dataset, output_suffix, write_results
from producers.settings import ProducerSettings
from schemas.codec import ContentType, decode_result, encode_result
from schemas.errors import SchemaError
from schemas.messages import (
    InferenceRequest,
    InferenceResult,
    now_ms,
)
from schemas.names import check_model_name, check_model_version
from schemas.topics import TopicNames

REDIS_LOOKUP_CHUNK: Final = 10_000
PROGRESS_EVERY_S: Final = 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class BackfillPlan:
    """What to replay, where to, and how fast."""

    model: str
    dataset: Dataset
    output: Path
    run_id: str
    version: int | None = None
    rate: float | None = None
    """Rows published per second at most; None: as fast as the cluster takes them."""
    max_in_flight: int = 5_000
    """Rows published and not yet answered, at most."""
    timeout_s: float = 300.0
    """Longest one row may wait for its answer (then the run fails, and can be resumed)."""

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if self.version is not None:
            check_model_version(self.version)

    def request_id(self, row: int) -> str:
        return f"{self.run_id}:{row}"

    @property
    def checkpoint(self) -> Path:
        return self.output.with_name(f"{self.output.name}.{self.run_id}.progress")


@dataclass(slots=True)
class Progress:
    """Counts of a run, as the display and the summary show them."""

    rows: int
    resumed: int = 0
    """Rows answered by an earlier attempt (checkpoint or Redis): not published again."""
    published: int = 0
    answered: int = 0
    """Rows answered in this attempt."""
    errors: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.resumed + self.answered

    @property
    def rate(self) -> float:
        return self.answered / max(time.monotonic() - self.started, 1e-9)

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return (self.rows - self.done) / rate if rate > 0 else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "rows": self.rows, "resumed": self.resumed, "published": self.published,
            "answered": self.answered, "errors": self.errors, "done": self.done,
            "rows_per_s": round(self.rate, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
        }  # fmt: skip


class Checkpoint:
    """The results answered so far, appended as they come; read back on a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def read(self) -> dict[int, InferenceResult]:
        """Every complete `[row, result]` pair written so far (a torn last one is dropped)."""
        found: dict[int, InferenceResult] = {}
        if not self.path.exists():
            return found
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(self.path.read_bytes())
        good_bytes = 0
        try:
            for row, value in unpacker:
                found[int(row)] = decode_result(value, ContentType.MSGPACK)
                good_bytes = unpacker.tell()
        except (ValueError, TypeError, SchemaError, msgpack.UnpackException):
            pass  # a pair torn by a kill: its row is asked for again
        # Cut what follows the last whole pair, or new pairs would be read as its remains.
        if good_bytes < self.path.stat().st_size:
            with self.path.open("r+b") as file:
                file.truncate(good_bytes)
        return found

    def append(self, row: int, result: InferenceResult) -> None:
        if self._file is None:
            self._file = self.path.open("ab")
        self._file.write(msgpack.packb([row, encode_result(result, ContentType.MSGPACK)]))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


Reporter = Callable[[Progress], None]


async def run_backfill(
    plan: BackfillPlan, settings: ProducerSettings, report: Reporter | None = None
) -> tuple[Progress, list[InferenceResult]]:
    """Answer every row of ``plan`` (resuming an earlier attempt); write the output file."""
    rows = plan.dataset.rows
    checkpoint = Checkpoint(plan.checkpoint)
    done = {row: r for row, r in checkpoint.read().items() if 0 <= row < rows}
    reply_topic = TopicNames(prefix=settings.kafka.topic_prefix).replies(f"backfill-{plan.run_id}")
    settings = settings.model_copy(update={"reply_topic": reply_topic})
    progress = Progress(rows=rows)
    try:
        async with InferenceClient(settings=settings) as client:
            missing = [row for row in range(rows) if row not in done]
            for start in range(0, len(missing), REDIS_LOOKUP_CHUNK):
                chunk = missing[start : start + REDIS_LOOKUP_CHUNK]
                cached = await client.cached_results([plan.request_id(row) for row in chunk])
                for row in chunk:
                    result = cached.get(plan.request_id(row))
                    if result is not None:
                        done[row] = result
                        checkpoint.append(row, result)
            progress.resumed = len(done)
            progress.errors = sum(1 for r in done.values() if not r.ok)
            await _publish_the_rest(plan, client, done, checkpoint, progress, report)
    finally:
        checkpoint.close()
    results = [done[row] for row in range(rows)]
    write_results(plan.output, results)
    plan.checkpoint.unlink(missing_ok=True)
    if report is not None:
        report(progress)
    return progress, results


async def _publish_the_rest(
    plan: BackfillPlan,
    client: InferenceClient,
    done: dict[int, InferenceResult],
    checkpoint: Checkpoint,
    progress: Progress,
    report: Reporter | None,
) -> None:
    slots = asyncio.Semaphore(plan.max_in_flight)
    interval_s = 1.0 / plan.rate if plan.rate else 0.0
    next_send = time.monotonic()
    last_report = 0.0

    async def answer(row: int, request: InferenceRequest) -> None:
        try:
            result = await client.infer_request(request, timeout_s=plan.timeout_s)
        finally:
            slots.release()
        done[row] = result
        checkpoint.append(row, result)
        progress.answered += 1
        progress.errors += 0 if result.ok else 1

    try:
        async with asyncio.TaskGroup() as tasks:
            for row in range(plan.dataset.rows):
                if row in done:
                    continue
                await slots.acquire()
                if interval_s:
                    next_send = max(next_send + interval_s, time.monotonic())
                    await asyncio.sleep(max(0.0, next_send - time.monotonic()))
                request = client.request(plan.model, plan.dataset.row(row), version=plan.version,
                                         request_id=plan.request_id(row))  # fmt: skip
                tasks.create_task(answer(row, request.model_copy(update={"created_ms": now_ms()})))
                progress.published += 1
                if report is not None and time.monotonic() - last_report >= PROGRESS_EVERY_S:
                    last_report = time.monotonic()
                    report(progress)
            while report is not None and progress.done < progress.rows:
                report(progress)
                await asyncio.sleep(PROGRESS_EVERY_S)
    except BaseExceptionGroup as group:  # one row's failure stops the run: say which
        raise group.exceptions[0] from None


def json_reporter(stream: IO[str] = sys.stdout) -> Reporter:
    """Progress as one JSON object per line (for logs and scripts)."""

    def report(progress: Progress) -> None:
        stream.write(json.dumps({"event": "backfill_progress", **progress.as_dict()}) + "\n")
        stream.flush()

    return report


def default_output(input_path: Path) -> Path:
    """`data.npy` → `data.results.npz`; `events.jsonl` → `events.results.jsonl`."""
    return input_path.with_name(f"{input_path.stem}.results{output_suffix(input_path)}")
