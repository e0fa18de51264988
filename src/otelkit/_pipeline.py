"""The export side: batching, bounded shutdown, drop accounting, quiet failures.

A collector that is down, slow, refusing or blackholed must cost the
application nothing but the telemetry it loses:

- :class:`SpanPipeline` batches spans on a bounded queue and exports them
  from one daemon thread. A full queue drops the *new* span and counts it;
  a failed export counts its spans. Neither logs per span or per batch.
- Flush and shutdown honour their deadlines even when an export hangs: the
  SDK's batch processor waits for the exporter however long it takes.
- :class:`CountingMetricExporter` counts the data points of failed metric
  exports.
- :data:`DROPPED` is what ``otelkit_exporter_dropped_total{signal}`` shows.
- :class:`RateLimitFilter` lets one record per logger and message through
  per interval, for the SDK's and exporters' own warnings, which otherwise
  come once per batch, every few seconds, for as long as the collector is down.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.sdk.metrics import Histogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otelkit.prometheus import with_produced

__all__ = ["DROPPED", "CountingMetricExporter", "RateLimitFilter", "SpanPipeline"]

DROPPED: dict[str, int] = {"traces": 0, "metrics": 0, "logs": 0}
_dropped_lock = threading.Lock()


def count_dropped(signal: str, count: int) -> None:
    """Add ``count`` lost items of ``signal`` to the self-metric."""
    with _dropped_lock:
        DROPPED[signal] = DROPPED.get(signal, 0) + count


def _env_number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


class _Warner:
    """One warning per kind of failure per minute, with what was lost since."""

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, key: str, event: str, **fields: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return
        self._last[key] = now
        from otelkit.logs import get_logger

        get_logger("otelkit.export").warning(event, **fields)


class SpanPipeline(SpanProcessor):
    """A batch span processor whose flush and shutdown keep their deadlines.

    Settings come from the standard ``OTEL_BSP_*`` variables, with otelkit's
    defaults where they differ: a queue of 8192 spans (the SDK's 2048 fills
    within a second at a few thousand requests per second while the worker
    waits for the GIL) and an export as soon as a quarter of it is used.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int | None = None,
        max_export_batch_size: int | None = None,
        schedule_delay: float | None = None,
    ) -> None:
        self._exporter = exporter
        self._max_queue = int(max_queue_size or _env_number("OTEL_BSP_MAX_QUEUE_SIZE", 8192))
        self._batch = min(
            int(max_export_batch_size or _env_number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)),
            self._max_queue,
        )
        self._delay = (
            schedule_delay
            if schedule_delay is not None
            else _env_number("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        )
        # Wake the worker early, well before the queue is full: under load it
        # may wait a few switch intervals for the GIL before it can drain.
        self._wake_at = max(1, min(self._batch, self._max_queue // 4))
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._warn = _Warner()
        self._start_worker()
        self_ref = weakref.ref(self)

        def after_fork() -> None:
            pipeline = self_ref()
            if pipeline is not None:
                pipeline._start_worker()

        os.register_at_fork(after_in_child=after_fork)

    def _start_worker(self) -> None:
        self._queue.clear()
        self._wake = threading.Event()
        self._stopping = False
        self._exporting = threading.Lock()
        self._waiting = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otelkit-spans", daemon=True)
        self._thread.start()

    # -- the request path --------------------------------------------------

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        """Nothing happens when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a finished, sampled span; drop and count it if the queue is full."""
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        queue = self._queue
        if len(queue) >= self._max_queue or self._stopping:
            count_dropped("traces", 1)
            self._warn(
                "queue_full",
                "telemetry_queue_full",
                signal="traces",
                queue_size=self._max_queue,
                dropped_total=DROPPED["traces"],
            )
            return
        queue.append(span)
        if len(queue) >= self._wake_at and not self._wake.is_set():
            if self._waiting:
                self._hand_over()
            else:
                self._wake.set()

    def _hand_over(self) -> None:
        """Wake the idle export thread and make sure it gets to run.

        A busy event loop releases and retakes the GIL around every
        ``epoll`` call, and CPython restarts a waiting thread's switch-interval
        timer at every switch: the woken export thread then never wins the
        GIL until the loop holds it for 5 ms straight (a garbage collection,
        every half second or so), by which time the queue has overflowed. This
        is why the SDK's batch processor drops spans under sustained load.
        Blocking here for the instant it takes the thread to start (at most
        1 ms, releasing the GIL) hands it over; it then keeps the GIL for a
        switch interval, which drains hundreds of spans.
        """
        self._started.clear()
        self._wake.set()
        self._started.wait(0.001)

    # -- the export thread -------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._waiting = True
            self._wake.wait(self._delay)
            self._waiting = False
            self._started.set()
            self._wake.clear()
            self._drain()

    def _drain(self, deadline: float | None = None) -> bool:
        """Export until the queue is empty (or the deadline passes)."""
        with self._exporting:
            while self._queue:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
                self._export(batch)
        return True

    def _export(self, batch: Sequence[ReadableSpan]) -> None:
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            result = self._exporter.export(batch)
        except Exception as exc:
            result = SpanExportResult.FAILURE
            self._warn(
                "export_error",
                "telemetry_export_failed",
                signal="traces",
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            detach(token)
        if result is not SpanExportResult.SUCCESS:
            count_dropped("traces", len(batch))
            self._warn(
                "export_failed",
                "telemetry_export_failed",
                signal="traces",
                spans=len(batch),
                dropped_total=DROPPED["traces"],
            )

    # -- flush and shutdown ------------------------------------------------

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued, giving up after ``timeout_millis``."""
        deadline = time.monotonic() + timeout_millis / 1000
        done = threading.Event()

        def flush() -> None:
            self._drain(deadline)
            done.set()

        # In a helper thread, so that a hung export cannot hold the caller
        # past its deadline (the export itself has its own timeout).
        threading.Thread(target=flush, name="otelkit-flush", daemon=True).start()
        return done.wait(max(0.0, deadline - time.monotonic())) and not self._queue

    def shutdown(self, timeout_millis: int = 3000) -> None:
        """Flush within ``timeout_millis``, then stop; what is left is counted as dropped."""
        if self._stopping:
            return
        self.force_flush(timeout_millis)
        self._stopping = True
        self._wake.set()
        left = len(self._queue)
        if left:
            self._queue.clear()
            count_dropped("traces", left)
        try:
            self._exporter.shutdown()
        except Exception as exc:  # pragma: no cover - exporters should not raise here
            self._warn("shutdown", "telemetry_shutdown_failed", error=str(exc))


class CountingMetricExporter(MetricExporter):
    """Wraps a metric exporter: adds otelkit's produced metrics, counts failed exports."""

    def __init__(
        self,
        exporter: MetricExporter,
        producers: Sequence[Callable[[], list[Metric]]] = (),
    ) -> None:
        super().__init__(
            preferred_temporality=exporter._preferred_temporality,
            preferred_aggregation=exporter._preferred_aggregation,
        )
        self._exporter = exporter
        self._producers = producers
        preferred = exporter._preferred_temporality or {}
        self._delta = preferred.get(Histogram) == AggregationTemporality.DELTA
        self._previous: dict[tuple[str, frozenset[tuple[str, Any]]], HistogramDataPoint] = {}
        self._warn = _Warner()

    def _produced(self, metrics_data: MetricsData) -> MetricsData:
        data = with_produced(metrics_data, self._producers)
        if data is None or not self._delta or data is metrics_data:
            return data or metrics_data
        *_, produced = data.resource_metrics[0].scope_metrics
        deltas = [_delta(metric, self._previous) for metric in produced.metrics]
        first = data.resource_metrics[0]
        scopes = [*first.scope_metrics[:-1], ScopeMetrics(produced.scope, deltas, "")]
        return MetricsData(
            [ResourceMetrics(first.resource, scopes, first.schema_url), *data.resource_metrics[1:]]
        )

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Export, and count what a failure loses."""
        metrics_data = self._produced(metrics_data)
        try:
            result = self._exporter.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            result = MetricExportResult.FAILURE
            self._warn(
                "export_error",
                "telemetry_export_failed",
                signal="metrics",
                error=f"{type(exc).__name__}: {exc}",
            )
        if result is not MetricExportResult.SUCCESS:
            points = sum(
                len(metric.data.data_points)
                for resource in metrics_data.resource_metrics
                for scope in resource.scope_metrics
                for metric in scope.metrics
            )
            count_dropped("metrics", points)
            self._warn(
                "export_failed",
                "telemetry_export_failed",
                signal="metrics",
                data_points=points,
                dropped_total=DROPPED["metrics"],
            )
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Delegate to the wrapped exporter."""
        return bool(self._exporter.force_flush(timeout_millis=timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Delegate to the wrapped exporter."""
        self._exporter.shutdown(timeout_millis=timeout_millis, **kwargs)


def _delta(
    metric: Metric, previous: dict[tuple[str, frozenset[tuple[str, Any]]], HistogramDataPoint]
) -> Metric:
    """The change of a cumulative histogram since the last call (delta temporality)."""
    points = []
    data = metric.data
    if not isinstance(data, HistogramData):
        return metric
    for point in data.data_points:
        key = (metric.name, frozenset((point.attributes or {}).items()))
        last = previous.get(key)
        previous[key] = point
        if last is None:
            points.append(point)
            continue
        buckets = [a - b for a, b in zip(point.bucket_counts, last.bucket_counts, strict=True)]
        if not any(buckets):
            continue
        points.append(
            HistogramDataPoint(
                point.attributes,
                last.time_unix_nano,
                point.time_unix_nano,
                point.count - last.count,
                point.sum - last.sum,
                buckets,
                point.explicit_bounds,
                point.min,
                point.max,
                [e for e in point.exemplars if e.time_unix_nano > last.time_unix_nano],
            )
        )
    return Metric(
        metric.name,
        metric.description,
        metric.unit,
        HistogramData(points, AggregationTemporality.DELTA),
    )


class RateLimitFilter(logging.Filter):
    """At most one record per (logger, message) per interval from the given loggers.

    The SDK and the exporters log every failed batch and every retry; with the
    collector down that is a line every few seconds per signal, forever. The
    first one goes through; the next ones within the interval are counted,
    and the count rides on the next record that goes through (``suppressed``).
    """

    def __init__(self, prefixes: Sequence[str] = ("opentelemetry",), interval: float = 60.0):
        super().__init__()
        self._prefixes = tuple(prefixes)
        self._interval = interval
        self._last: dict[tuple[str, object], float] = {}
        self._suppressed: dict[tuple[str, object], int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            if len(self._last) > 1000:
                self._last.clear()
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.suppressed = suppressed
        return True
