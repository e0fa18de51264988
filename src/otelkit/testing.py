"""Test helpers: instrument an app into in-memory exporters and read what it made.

Example (pytest)::

    from fastapi.testclient import TestClient
    from otelkit.testing import capture

    def test_model_creation_is_counted():
        with capture(app) as telemetry:
            TestClient(app).post("/api/v1/modeling", json={...})
        assert telemetry.spans()[0].name == "POST /api/v1/modeling"
        assert telemetry.metric_value("models_created", model_type="cadquery") == 1
        assert telemetry.logs(event="model_created")

Inside :func:`capture`, an undeclared metric label raises instead of being
dropped, so tests catch it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otelkit import _instrument, logs
from otelkit import metrics as otelkit_metrics
from otelkit.prometheus import with_produced
from otelkit.tracing import use_provider

__all__ = ["CapturedTelemetry", "capture"]


@dataclass
class CapturedTelemetry:
    """What an app instrumented by :func:`capture` produced."""

    span_exporter: InMemorySpanExporter
    tracer_provider: TracerProvider
    metric_reader: InMemoryMetricReader
    meter_provider: MeterProvider
    log_stream: io.StringIO

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans, oldest first, optionally only those called ``name``."""
        spans = list(self.span_exporter.get_finished_spans())
        return [s for s in spans if name is None or s.name == name]

    def log_lines(self) -> list[str]:
        """Every rendered log line, as written."""
        return self.log_stream.getvalue().splitlines()

    def logs(self, **match: Any) -> list[dict[str, Any]]:
        """JSON log lines (parsed) whose fields equal ``match``."""
        result = []
        for line in self.log_lines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if all(record.get(key) == value for key, value in match.items()):
                result.append(record)
        return result

    def metric_points(self, name: str) -> list[Any]:
        """Data points of the OpenTelemetry instrument called ``name``."""
        data = with_produced(
            self.metric_reader.get_metrics_data(),
            [lambda: _instrument.produced_metrics(self.meter_provider)],
        )
        points: list[Any] = []
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        points.extend(metric.data.data_points)
        return points

    def metric_value(self, name: str, **labels: Any) -> float | None:
        """The value (count, for histograms) of the series with exactly ``labels``."""
        for point in self.metric_points(name):
            if dict(point.attributes or {}) == labels:
                if isinstance(point, HistogramDataPoint):
                    return float(point.count)
                if isinstance(point, NumberDataPoint):
                    return float(point.value)
        return None


@contextmanager
def capture(app: Any, **overrides: Any) -> Iterator[CapturedTelemetry]:
    """Instrument ``app`` into in-memory exporters for the duration of the block.

    Args:
        app: The FastAPI/Starlette app under test (not yet instrumented).
        **overrides: Settings for :func:`otelkit.instrument`.
    """
    exporter = InMemorySpanExporter()
    resource = Resource.create({"service.name": "test"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], resource=resource)
    stream = io.StringIO()
    overrides.setdefault("environment", "test")
    _instrument.instrument(
        app,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        log_stream=stream,
        _trusted_readers=(reader,),  # metric_points() adds otelkit's own metrics
        **overrides,
    )
    try:
        yield CapturedTelemetry(exporter, tracer_provider, reader, meter_provider, stream)
    finally:
        _instrument.uninstrument(app)
        otelkit_metrics.bind_declared(None)
        use_provider(None)
        otelkit_metrics.set_strict(False)
        logs.reset_logging()
        tracer_provider.shutdown()
        meter_provider.shutdown()
