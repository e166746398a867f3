"""Prometheus metrics of a worker, on an explicit registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client import Metric

    from workers.repository import VersionStatus

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
END_TO_END_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120
)  # fmt: skip
"""From a producer's `created_ms` to the result written: queueing in Kafka included."""


class Outcome(StrEnum):
    """How a request left the worker: the `outcome` label of `inferq_requests_total`."""

    OK = "ok"
    ERROR = "error"
    EXPIRED = "expired"
    CACHED = "cached"
    """Redelivered after a crash and answered from Redis without running the model."""
    DEAD_LETTER = "dead_letter"


class Sink(StrEnum):
    """Where a write goes: the `sink` label of write retries."""

    KAFKA = "kafka"
    REDIS = "redis"


class WorkerMetrics:
    """Every metric a worker exports; one instance per process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inferq_requests",
            "Requests answered, by model, version, outcome and error code.",
            ["model", "version", "outcome", "code"],
            registry=r,
        )
        self.batch_size = Histogram(
            "inferq_batch_size", "Requests per executed batch.",
            ["model", "version"],
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "inferq_inference_seconds", "Wall time of one batch's forward pass.",
            ["model", "version"],
            buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_seconds = GroupHistogram(
            "inferq_queue_seconds",
            "Time from the request's created_ms (or its receipt) to the start of its batch.",
            labels=("model", "version"), buckets=SECONDS_BUCKETS,
        )  # fmt: skip
        r.register(self.queue_seconds)
        self.in_flight = Gauge(
            "inferq_in_flight", "Requests consumed and not yet answered.", registry=r
        )
        self.paused = Gauge(
            "inferq_consumer_paused", "1 while intake is paused by backpressure.", registry=r
        )
        self.write_retries = Counter(
            "inferq_write_retries", "Failed writes that were retried.", ["sink"], registry=r
        )
        self.commits = Counter("inferq_offset_commits", "Offset commits sent.", registry=r)
        self.end_to_end_seconds = GroupHistogram(
            "inferq_end_to_end_seconds",
            "From the request's created_ms (producer clock) to its ok result written.",
            labels=("model", "version"), buckets=END_TO_END_BUCKETS,
        )  # fmt: skip
        r.register(self.end_to_end_seconds)
        self.result_write_seconds = Histogram(
            "inferq_result_write_seconds",
            "Time one group of answers took to write to a sink, retries included.",
            ["sink"], buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.rebalances = Counter(
            "inferq_rebalances", "Partition assignments received from the group.", registry=r
        )
        self.pauses = Counter(
            "inferq_consumer_pauses",
            "Times intake paused at max_in_flight or max_in_flight_bytes.",
            registry=r,
        )
        self.consumer_lag_records = Gauge(
            "inferq_consumer_lag_records",
            "Records of an assigned partition not yet answered: the partition's end offset "
            "minus its first unanswered (or, before any, committed) offset; sampled.",
            ["topic", "partition"], registry=r,
        )  # fmt: skip
        self.consumer_lag_seconds = Gauge(
            "inferq_consumer_lag_seconds",
            "Age of the oldest request of a topic this worker consumed and has not answered "
            "(from its poll's first record timestamp); 0 when none waits; sampled.",
            ["topic"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "inferq_errors", "Requests answered with an error, by code.", ["code"], registry=r
        )
        self.dead_letters = Counter(
            "inferq_dead_letters", "Records sent to the dead-letter topic.", registry=r
        )
        self.undeliverable = Counter(
            "inferq_undeliverable_records",
            "Records Kafka can never take, given up after Redis has the result: "
            "too_large even as a stand-in, or missing_topic.",
            ["reason"],
            registry=r,
        )

        self.model_load_failures = Counter(
            "inferq_model_load_failures",
            "Model versions refused at load, by reason: checksums, incomplete, config, "
            "unsafe_checkpoint, load or warm_up.",
            ["model", "version", "reason"],
            registry=r,
        )

    def model_load_failed(self, model: str, version: int, reason: str) -> None:
        """Count one refused load of a model version."""
        self.model_load_failures.labels(model=model, version=str(version), reason=reason).inc()

    def watch_models(self, statuses: Callable[[], Iterable[VersionStatus]]) -> None:
        """Export each known version's state, memory and load time, read at every scrape."""
        self.registry.register(_ModelCollector(statuses))

    def answered_many(self, counts: Mapping[tuple[str, str, Outcome, str], int]) -> None:
        """Count requests leaving the worker, by (model, version, outcome, code)."""
        for (model, version, outcome, code), count in counts.items():
            self.requests.labels(model, version, outcome.value, code).inc(count)
            if code:
                self.errors.labels(code=code).inc(count)
            if outcome is Outcome.DEAD_LETTER:
                self.dead_letters.inc(count)


class _ModelCollector(Collector):
    """`inferq_model_ready`, `inferq_model_memory_bytes`, `inferq_model_load_seconds`."""

    def __init__(self, statuses: Callable[[], Iterable[VersionStatus]]) -> None:
        self._statuses = statuses

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        ready = GaugeMetricFamily(
            "inferq_model_ready", "1 while a model version serves; 0 failed or draining.",
            labels=labels,
        )  # fmt: skip
        memory = GaugeMetricFamily(
            "inferq_model_memory_bytes", "Bytes of a serving version's weights.", labels=labels
        )
        seconds = GaugeMetricFamily(
            "inferq_model_load_seconds",
            "Time a serving version took to load, checksums and warm-up included.",
            labels=labels,
        )
        for status in self._statuses():
            values = [status.model, str(status.version)]
            ready.add_metric(values, 1.0 if status.state == "ready" else 0.0)
            if status.memory_bytes is not None:
                memory.add_metric(values, float(status.memory_bytes))
            if status.load_seconds is not None:
                seconds.add_metric(values, status.load_seconds)
        yield ready
        yield memory
        yield seconds


class GroupHistogram(Collector):
    """A histogram fed a whole group of observations at once, per set of label values.

    `prometheus_client`'s `Histogram.observe` costs about 5 µs per request on the loop
    thread here (a tenth of the worker's whole per-request budget); counting a group's
    values into the buckets with numpy costs a few µs per group.
    """

    def __init__(
        self, name: str, documentation: str, *, labels: Sequence[str], buckets: Sequence[float]
    ):
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._counts: dict[tuple[str, ...], NDArray[np.int64]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe_many(self, label_values: tuple[str, ...], values: NDArray[np.float64]) -> None:
        """Count ``values`` (seconds) under ``label_values``, one per label."""
        counts = self._counts.get(label_values)
        if counts is None:
            if len(label_values) != len(self._labels):
                raise ValueError(f"{self._name} takes labels {self._labels}: {label_values}")
            counts = self._counts[label_values] = np.zeros(len(self._bounds) + 1, np.int64)
            self._sums[label_values] = 0.0
        # Bucket i holds values <= bound i (Prometheus's `le`); the last one is +Inf.
        counts += np.bincount(
            np.searchsorted(self._bounds, values, side="left"), minlength=len(counts)
        )
        self._sums[label_values] += float(values.sum())

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        for label_values, counts in self._counts.items():
            cumulative = np.cumsum(counts)
            buckets = [
                (repr(float(bound)), float(count))
                for bound, count in zip(self._bounds, cumulative[:-1], strict=True)
            ]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric(list(label_values), buckets, self._sums[label_values])
        yield family
