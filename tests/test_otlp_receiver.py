"""Tests of the test-support OTLP receiver, driven only by the real OpenTelemetry SDK.

The rest of the suite trusts ``tests.support.otlp`` to tell what otelkit's exporters
sent, and how they behave when the collector misbehaves. These tests earn that trust
without otelkit: the stock OTLP exporters, over both protocols, must be understood
field by field, and each fault mode must make them fail the way a real collector
fault would, within their timeout.
"""

from __future__ import annotations

import gzip
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (
    OTLPLogExporter as GrpcLogExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http._log_exporter import (
    OTLPLogExporter as HttpLogExporter,
)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableGauge,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from tests.support.otlp import (
    Blackhole,
    ExponentialHistogramValue,
    HistogramValue,
    OtlpReceiver,
    SummaryValue,
    Transport,
    free_port,
)

TRANSPORTS: tuple[Transport, ...] = ("grpc", "http")
RESOURCE = Resource({"service.name": "receiver-under-test", "deployment.environment": "test"})
# Short exporter timeout for fault tests: long enough for one round trip on a busy CI
# machine, short enough that a failing export ends the test in a couple of seconds.
FAULT_TIMEOUT = 2.0
# Slack for thread scheduling on a loaded machine, added to upper bounds on durations.
SLACK = 1.0


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


def span_exporter(transport: Transport, base: str, **kwargs: Any) -> SpanExporter:
    """A stock span exporter aimed at ``base`` (``http://127.0.0.1:PORT``)."""
    if transport == "grpc":
        return GrpcSpanExporter(endpoint=base, insecure=True, **kwargs)
    return HttpSpanExporter(endpoint=f"{base}/v1/traces", **kwargs)


def receiver_base(rx: OtlpReceiver, transport: Transport) -> str:
    return rx.grpc_endpoint if transport == "grpc" else rx.http_endpoint


@contextmanager
def shut_down_after(exporter: SpanExporter) -> Iterator[SpanExporter]:
    """Close the exporter's channel/session even when the test fails."""
    try:
        yield exporter
    finally:
        exporter.shutdown()


@contextmanager
def tracing(exporter: SpanExporter) -> Iterator[Tracer]:
    """A private tracer provider (no global state) exporting each span as it ends."""
    provider = TracerProvider(resource=RESOURCE, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider.get_tracer("receiver-tests", "1.2.3")
    finally:
        provider.shutdown()


def finished_spans() -> tuple[ReadableSpan, ...]:
    """One finished span, for calling ``exporter.export()`` directly and timing it."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("receiver-tests").start_as_current_span("payload"):
        pass
    provider.shutdown()
    return memory.get_finished_spans()


def timed_export(exporter: SpanExporter) -> tuple[SpanExportResult, float]:
    spans = finished_spans()
    started = time.monotonic()
    result = exporter.export(spans)
    return result, time.monotonic() - started


def post(
    rx: OtlpReceiver, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    """A raw OTLP/HTTP request, for what the stock exporters never send."""
    connection = http.client.HTTPConnection("127.0.0.1", rx.http_port, timeout=5)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


# --------------------------------------------------------------------------- traces


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_spans_arrive_with_ids_kinds_attributes_and_resource(
    receiver: OtlpReceiver, transport: Transport
) -> None:
    exporter = span_exporter(
        transport, receiver_base(receiver, transport), headers={"x-tenant": "acme"}
    )
    with tracing(exporter) as tracer:
        with (
            tracer.start_as_current_span(
                "GET /orders",
                kind=SpanKind.SERVER,
                attributes={
                    "http.route": "/orders",
                    "http.response.status_code": 200,
                    "ratio": 0.25,
                    "cached": False,
                    "tags": ["a", "b"],
                },
            ) as parent,
            tracer.start_as_current_span("db query", kind=SpanKind.CLIENT) as child,
        ):
            child.add_event("retry", {"attempt": 2})
            child.set_status(Status(StatusCode.ERROR, "connection reset"))
        parent_context = parent.get_span_context()
        child_context = child.get_span_context()

    received = {span.name: span for span in receiver.wait_for_spans(2)}
    server, client = received["GET /orders"], received["db query"]

    assert server.trace_id == format(parent_context.trace_id, "032x")
    assert server.span_id == format(parent_context.span_id, "016x")
    assert server.parent_span_id is None
    assert server.kind == "SERVER"
    assert server.attributes == {
        "http.route": "/orders",
        "http.response.status_code": 200,
        "ratio": 0.25,
        "cached": False,
        "tags": ["a", "b"],
    }
    assert server.status_code == "UNSET"
    assert server.end_time_unix_nano >= server.start_time_unix_nano > 0

    assert client.trace_id == server.trace_id
    assert client.span_id == format(child_context.span_id, "016x")
    assert client.parent_span_id == server.span_id
    assert client.kind == "CLIENT"
    assert (client.status_code, client.status_message) == ("ERROR", "connection reset")
    assert client.events == [("retry", {"attempt": 2})]

    for span in (server, client):
        assert span.resource["service.name"] == "receiver-under-test"
        assert span.resource["deployment.environment"] == "test"
        assert span.scope_name == "receiver-tests"
        assert span.transport == transport

    requests = receiver.requests("traces", transport)
    assert len(requests) == 2  # SimpleSpanProcessor: one request per ended span
    assert all(request.headers["x-tenant"] == "acme" for request in requests)
    assert receiver.request_count("traces", "grpc" if transport == "http" else "http") == 0


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_exporters_configured_from_the_environment_reach_the_receiver(
    receiver: OtlpReceiver,
    protocol: Literal["grpc", "http/protobuf"],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The way users (and otelkit) configure exporters: base endpoint in the
    # environment, from which the HTTP exporter derives /v1/traces itself.
    for name, value in receiver.otel_env(protocol).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20t0k3n")
    exporter = GrpcSpanExporter() if protocol == "grpc" else HttpSpanExporter()
    with tracing(exporter) as tracer, tracer.start_as_current_span("from-env"):
        pass

    span = receiver.wait_for_span("from-env")
    assert span.transport == ("grpc" if protocol == "grpc" else "http")
    (request,) = receiver.requests("traces")
    assert request.headers["authorization"] == "Bearer t0k3n"


@pytest.mark.parametrize(
    ("transport", "compression"),
    [
        ("http", HttpCompression.Gzip),
        ("http", HttpCompression.Deflate),
        ("grpc", grpc.Compression.Gzip),
    ],
)
def test_compressed_exports_are_decoded(
    receiver: OtlpReceiver, transport: Transport, compression: Any
) -> None:
    exporter = span_exporter(transport, receiver_base(receiver, transport), compression=compression)
    with tracing(exporter) as tracer, tracer.start_as_current_span("compressed"):
        pass

    assert receiver.wait_for_span("compressed").transport == transport
    if transport == "http":
        (request,) = receiver.requests("traces")
        assert request.headers["content-encoding"] == compression.value


ATTRIBUTE_VALUES = st.one_of(
    st.text(max_size=20),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=5), max_size=4),
    st.lists(st.booleans(), max_size=4),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=4),
    st.lists(st.floats(allow_nan=False), max_size=4),
)


def typed(value: Any) -> Any:
    """Keep types in comparisons: True must not come back as 1, nor 1.0 as 1."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return ["sequence", [typed(item) for item in value]]
    return [type(value).__name__, value]


def test_attribute_values_survive_the_round_trip(receiver: OtlpReceiver) -> None:
    # Every example pays for a real OTLP/HTTP round trip, so the pipeline is shared by
    # the examples (an inner @given) rather than rebuilt for each.
    exporter = HttpSpanExporter(endpoint=receiver.http_traces_url, timeout=5)
    with tracing(exporter) as tracer:

        @given(
            attributes=st.dictionaries(
                st.text(min_size=1, max_size=12), ATTRIBUTE_VALUES, max_size=8
            )
        )
        @settings(max_examples=40, deadline=None, database=None)
        def round_trip(attributes: dict[str, Any]) -> None:
            receiver.clear()
            with tracer.start_as_current_span("attributes", attributes=attributes):
                pass
            (span,) = receiver.wait_for_spans(1, timeout=5)
            assert typed(span.attributes) == typed(attributes)

        round_trip()


def test_http_endpoint_speaks_binary_otlp_only(receiver: OtlpReceiver) -> None:
    protobuf = {"Content-Type": "application/x-protobuf"}
    raw_span = trace_pb2.Span(trace_id=bytes(range(16)), span_id=bytes(range(8)), name="raw")
    request = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans(spans=[raw_span])])
        ]
    )
    body = request.SerializeToString()

    status, headers, content = post(
        receiver, "/v1/traces", gzip.compress(body), {**protobuf, "Content-Encoding": "gzip"}
    )
    assert status == 200
    assert headers["Content-Type"] == "application/x-protobuf"
    trace_service_pb2.ExportTraceServiceResponse.FromString(content)
    (span,) = receiver.spans()
    assert (span.trace_id, span.span_id) == (bytes(range(16)).hex(), bytes(range(8)).hex())

    status, _, content = post(receiver, "/v1/profiles", body, protobuf)
    assert (status, status_pb2.Status.FromString(content).code) == (404, code_pb2.NOT_FOUND)
    assert post(receiver, "/v1/traces", b"{}", {"Content-Type": "application/json"})[0] == 415
    assert post(receiver, "/v1/traces", body, {**protobuf, "Content-Encoding": "br"})[0] == 415
    assert post(receiver, "/v1/traces", b"\xff\xff\xff", protobuf)[0] == 400
    assert post(receiver, "/v1/traces", body, {**protobuf, "Content-Encoding": "gzip"})[0] == 400

    connection = http.client.HTTPConnection("127.0.0.1", receiver.http_port, timeout=5)
    try:
        connection.putrequest("POST", "/v1/traces")
        connection.putheader("Content-Type", "application/x-protobuf")
        connection.endheaders()
        assert connection.getresponse().status == 411
    finally:
        connection.close()

    receiver.mode = "unavailable"
    receiver.retry_after = 3
    status, headers, content = post(receiver, "/v1/traces", body, protobuf)
    assert (status, headers["Retry-After"]) == (503, "3")
    assert status_pb2.Status.FromString(content).code == code_pb2.UNAVAILABLE

    assert receiver.request_count() == 1
    assert receiver.request_count(include_rejected=True) == 2


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_metrics_arrive_with_values_temporality_and_exemplars(
    receiver: OtlpReceiver, transport: Transport
) -> None:
    exporter = (
        GrpcMetricExporter(endpoint=receiver.grpc_endpoint, insecure=True)
        if transport == "grpc"
        else HttpMetricExporter(endpoint=receiver.http_metrics_url)
    )
    # An interval far beyond the test: exports happen exactly at force_flush/shutdown.
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader], resource=RESOURCE, shutdown_on_exit=False)
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("receiver-tests")
    try:
        meter = provider.get_meter("receiver-tests.metrics")
        orders = meter.create_counter("orders", unit="{order}", description="Orders taken")
        latency = meter.create_histogram("latency", unit="s")
        # Measurements inside a sampled span carry it as an exemplar (trace-based filter).
        with tracer.start_as_current_span("checkout") as span:
            orders.add(2, {"channel": "web"})
            orders.add(3, {"channel": "web"})
            latency.record(0.3, {"channel": "web"})
        assert provider.force_flush(timeout_millis=5_000)
        (count,) = receiver.wait_for_metric("orders")
        (histogram,) = receiver.wait_for_metric("latency")
    finally:
        provider.shutdown()
    trace_id = format(span.get_span_context().trace_id, "032x")
    span_id = format(span.get_span_context().span_id, "016x")

    assert (count.kind, count.value, count.is_monotonic) == ("sum", 5, True)
    assert count.temporality == "CUMULATIVE"
    assert count.attributes == {"channel": "web"}
    assert (count.unit, count.description) == ("{order}", "Orders taken")
    assert count.exemplars
    assert {(e["trace_id"], e["span_id"]) for e in count.exemplars} == {(trace_id, span_id)}
    assert {e["value"] for e in count.exemplars} <= {2, 3}

    assert histogram.kind == "histogram"
    assert isinstance(histogram.value, HistogramValue)
    assert histogram.value.count == 1
    for statistic in (histogram.value.sum, histogram.value.min, histogram.value.max):
        assert statistic == pytest.approx(0.3)
    bounds = histogram.value.explicit_bounds
    assert bounds[:3] == [0.0, 5.0, 10.0]
    assert len(histogram.value.bucket_counts) == len(bounds) + 1
    assert histogram.value.bucket_counts[1] == 1  # (0, 5]
    assert sum(histogram.value.bucket_counts) == 1
    (exemplar,) = histogram.exemplars
    assert (exemplar["trace_id"], exemplar["span_id"]) == (trace_id, span_id)
    assert exemplar["value"] == pytest.approx(0.3)

    for point in (count, histogram):
        assert point.resource["service.name"] == "receiver-under-test"
        assert point.scope_name == "receiver-tests.metrics"
        assert point.transport == transport
    # shutdown() exported the cumulative series a second time.
    assert receiver.request_count("metrics", transport) == 2


def test_gauges_up_down_counters_exponential_histograms_and_delta_are_decoded(
    receiver: OtlpReceiver,
) -> None:
    exporter = HttpMetricExporter(
        endpoint=receiver.http_metrics_url,
        preferred_temporality={
            Counter: AggregationTemporality.DELTA,
            UpDownCounter: AggregationTemporality.CUMULATIVE,
            Histogram: AggregationTemporality.DELTA,
            ObservableGauge: AggregationTemporality.CUMULATIVE,
        },
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(
        metric_readers=[reader],
        resource=RESOURCE,
        views=[View(instrument_name="sizes", aggregation=ExponentialBucketHistogramAggregation())],
        shutdown_on_exit=False,
    )

    def temperature(_options: CallbackOptions) -> list[Observation]:
        return [Observation(21.5, {"room": "lab"})]

    try:
        meter = provider.get_meter("receiver-tests.metrics")
        meter.create_counter("jobs").add(4)
        in_flight = meter.create_up_down_counter("in_flight")
        in_flight.add(3)
        in_flight.add(-1)
        meter.create_observable_gauge("temperature", callbacks=[temperature])
        sizes = meter.create_histogram("sizes")
        for size in (1, 2, 4):
            sizes.record(size)
        assert provider.force_flush(timeout_millis=5_000)
        points = {
            name: receiver.wait_for_metric(name)[0]
            for name in ("jobs", "in_flight", "temperature", "sizes")
        }
    finally:
        provider.shutdown()

    jobs, in_flight_point = points["jobs"], points["in_flight"]
    assert (jobs.kind, jobs.value, jobs.is_monotonic, jobs.temporality) == (
        "sum",
        4,
        True,
        "DELTA",
    )
    assert (in_flight_point.value, in_flight_point.is_monotonic) == (2, False)
    assert in_flight_point.temporality == "CUMULATIVE"

    gauge = points["temperature"]
    assert (gauge.kind, gauge.value, gauge.attributes) == ("gauge", 21.5, {"room": "lab"})
    assert (gauge.is_monotonic, gauge.temporality) == (None, None)

    sizes_point = points["sizes"]
    assert sizes_point.kind == "exponential_histogram"
    assert sizes_point.temporality == "DELTA"
    value = sizes_point.value
    assert isinstance(value, ExponentialHistogramValue)
    assert (value.count, value.sum, value.min, value.max) == (3, 7, 1, 4)
    assert (value.zero_count, sum(value.positive_bucket_counts)) == (0, 3)
    assert sum(value.negative_bucket_counts) == 0


def test_summary_points_are_decoded(receiver: OtlpReceiver) -> None:
    # The Python SDK never produces summaries, but other SDKs' data can reach a
    # collector, so the receiver must read them; send one by hand.
    summary = metrics_pb2.Metric(
        name="rpc.duration",
        summary=metrics_pb2.Summary(
            data_points=[
                metrics_pb2.SummaryDataPoint(
                    count=10,
                    sum=2.5,
                    quantile_values=[
                        metrics_pb2.SummaryDataPoint.ValueAtQuantile(quantile=0.5, value=0.2),
                        metrics_pb2.SummaryDataPoint.ValueAtQuantile(quantile=0.99, value=0.9),
                    ],
                    attributes=[
                        common_pb2.KeyValue(key="rpc", value=common_pb2.AnyValue(string_value="x"))
                    ],
                )
            ]
        ),
    )
    request = metrics_service_pb2.ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource=resource_pb2.Resource(
                    attributes=[
                        common_pb2.KeyValue(
                            key="service.name", value=common_pb2.AnyValue(string_value="other")
                        )
                    ]
                ),
                scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[summary])],
            )
        ]
    )
    status, _, _ = post(
        receiver,
        "/v1/metrics",
        request.SerializeToString(),
        {"Content-Type": "application/x-protobuf"},
    )
    assert status == 200

    (point,) = receiver.metrics("rpc.duration")
    assert point.kind == "summary"
    assert point.value == SummaryValue(count=10, sum=2.5, quantiles=[(0.5, 0.2), (0.99, 0.9)])
    assert (point.attributes, point.resource) == ({"rpc": "x"}, {"service.name": "other"})
    assert point.temporality is None


# --------------------------------------------------------------------------- logs


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_logs_arrive_with_body_severity_and_trace_context(
    receiver: OtlpReceiver, transport: Transport
) -> None:
    exporter = (
        GrpcLogExporter(endpoint=receiver.grpc_endpoint, insecure=True)
        if transport == "grpc"
        else HttpLogExporter(endpoint=receiver.http_logs_url)
    )
    provider = LoggerProvider(resource=RESOURCE, shutdown_on_exit=False)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("receiver-tests")
    try:
        logger = provider.get_logger("receiver-tests.logs")
        with tracer.start_as_current_span("handler") as span:
            logger.emit(
                body="order placed",
                severity_number=SeverityNumber.WARN,
                severity_text="WARN",
                attributes={"order.id": 42},
            )
        logger.emit(body={"event": "tick", "n": [1, 2]}, severity_number=SeverityNumber.INFO)
        in_span, outside = receiver.wait_for_logs(2)
    finally:
        provider.shutdown()

    assert in_span.body == "order placed"
    assert (in_span.severity_text, in_span.severity_number) == ("WARN", SeverityNumber.WARN.value)
    assert in_span.attributes == {"order.id": 42}
    assert in_span.trace_id == format(span.get_span_context().trace_id, "032x")
    assert in_span.span_id == format(span.get_span_context().span_id, "016x")

    assert outside.body == {"event": "tick", "n": [1, 2]}
    assert (outside.trace_id, outside.span_id) == (None, None)

    for record in (in_span, outside):
        assert record.resource["service.name"] == "receiver-under-test"
        assert record.scope_name == "receiver-tests.logs"
        assert record.transport == transport


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unavailable_mode_fails_the_export_within_the_timeout(
    receiver: OtlpReceiver, transport: Transport
) -> None:
    receiver.mode = "unavailable"
    base = receiver_base(receiver, transport)
    with shut_down_after(span_exporter(transport, base, timeout=FAULT_TIMEOUT)) as exporter:
        result, elapsed = timed_export(exporter)
        assert result is SpanExportResult.FAILURE
        assert elapsed < FAULT_TIMEOUT + SLACK
        assert receiver.request_count("traces", transport, include_rejected=True) >= 1
        assert receiver.spans() == []

        receiver.mode = "ok"
        result, _ = timed_export(exporter)
        assert result is SpanExportResult.SUCCESS
    assert [span.name for span in receiver.spans()] == ["payload"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retry_after_hint_is_sent_and_honoured(
    receiver: OtlpReceiver, transport: Transport
) -> None:
    receiver.mode = "unavailable"
    receiver.retry_after = 0.05
    base = receiver_base(receiver, transport)
    with shut_down_after(span_exporter(transport, base, timeout=FAULT_TIMEOUT)) as exporter:
        result, elapsed = timed_export(exporter)
    assert result is SpanExportResult.FAILURE
    assert elapsed < FAULT_TIMEOUT + SLACK
    # Without the hint, backing off 1 s then 2 s leaves room for only two attempts in
    # FAULT_TIMEOUT; with it, the exporter retries until it runs out of attempts.
    assert receiver.request_count("traces", transport, include_rejected=True) >= 3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_mode_answers_after_the_delay(receiver: OtlpReceiver, transport: Transport) -> None:
    receiver.mode = "slow"
    receiver.delay = 0.5
    base = receiver_base(receiver, transport)
    with shut_down_after(span_exporter(transport, base, timeout=5)) as exporter:
        result, elapsed = timed_export(exporter)
    assert result is SpanExportResult.SUCCESS
    assert 0.5 <= elapsed < 0.5 + SLACK
    assert len(receiver.spans()) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_mode_past_the_timeout_fails_the_export_and_stop_releases_it(
    receiver: OtlpReceiver, transport: Transport
) -> None:
    receiver.mode = "slow"
    receiver.delay = 60
    base = receiver_base(receiver, transport)
    with shut_down_after(span_exporter(transport, base, timeout=1)) as exporter:
        result, elapsed = timed_export(exporter)
    assert result is SpanExportResult.FAILURE
    assert elapsed < 1 + SLACK

    # The held request must not keep a server thread (and stop()) waiting for 60 s.
    started = time.monotonic()
    receiver.stop()
    assert time.monotonic() - started < SLACK
    assert receiver.spans() == []
    assert receiver.request_count("traces", transport, include_rejected=True) >= 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_restart_keeps_the_ports_and_exporters_recover(
    receiver: OtlpReceiver, transport: Transport
) -> None:
    ports = (receiver.grpc_port, receiver.http_port)
    base = receiver_base(receiver, transport)
    with shut_down_after(span_exporter(transport, base, timeout=FAULT_TIMEOUT)) as exporter:
        assert timed_export(exporter)[0] is SpanExportResult.SUCCESS

        receiver.stop()
        assert not receiver.running
        result, elapsed = timed_export(exporter)
        assert result is SpanExportResult.FAILURE
        assert elapsed < FAULT_TIMEOUT + SLACK

        receiver.start()
        assert (receiver.grpc_port, receiver.http_port) == ports
        # gRPC: the first attempt meets the old channel in reconnect back-off; the
        # exporter rebuilds its channel and the retry ~1 s later gets through.
        result, elapsed = timed_export(exporter)
        assert result is SpanExportResult.SUCCESS
        assert elapsed < FAULT_TIMEOUT + SLACK
    assert len(receiver.spans()) == 2


def test_restart_fails_loudly_when_a_port_was_taken(receiver: OtlpReceiver) -> None:
    receiver.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", receiver.http_port))
        squatter.listen()
        with pytest.raises(RuntimeError, match="could not bind"):
            receiver.start()
        assert not receiver.running
    receiver.start()
    assert receiver.running


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_blackholed_collector_fails_the_export_at_the_timeout(transport: Transport) -> None:
    with (
        Blackhole() as hole,
        shut_down_after(span_exporter(transport, hole.endpoint, timeout=1)) as exporter,
    ):
        result, elapsed = timed_export(exporter)
    assert result is SpanExportResult.FAILURE
    # Nothing fails fast: only the exporter's own deadline ends the export.
    assert 0.9 <= elapsed < 1 + SLACK
    assert hole.connection_count >= 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refused_connection_fails_the_export_within_the_timeout(transport: Transport) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    with shut_down_after(span_exporter(transport, base, timeout=FAULT_TIMEOUT)) as exporter:
        result, elapsed = timed_export(exporter)
    assert result is SpanExportResult.FAILURE
    assert elapsed < FAULT_TIMEOUT + SLACK


def test_free_port_refuses_connections() -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", free_port()), timeout=2).close()


def test_blackhole_holds_connections_open_without_answering() -> None:
    with Blackhole() as hole:
        client = socket.create_connection(("127.0.0.1", hole.port), timeout=0.3)
        with client:
            with pytest.raises(TimeoutError):
                client.recv(1)
            hole.stop()
            client.settimeout(2)
            assert client.recv(1) == b""  # closed only now, by stop()
    assert hole.connection_count == 1


# --------------------------------------------------------------------------- lifecycle


def test_stop_ends_every_thread_and_is_idempotent() -> None:
    before = set(threading.enumerate())
    rx = OtlpReceiver()
    with pytest.raises(RuntimeError, match="not been started"):
        _ = rx.grpc_endpoint
    with rx:
        assert rx.running
        for transport in TRANSPORTS:
            exporter = span_exporter(transport, receiver_base(rx, transport), timeout=5)
            with shut_down_after(exporter):
                assert timed_export(exporter)[0] is SpanExportResult.SUCCESS
        assert set(threading.enumerate()) - before
    rx.stop()
    assert not rx.running
    assert rx.grpc_endpoint == f"http://127.0.0.1:{rx.grpc_port}"  # kept for restarts

    def leftover() -> set[threading.Thread]:
        # Threads other tests' telemetry may start meanwhile are not the receiver's.
        return {
            thread
            for thread in set(threading.enumerate()) - before
            if thread.is_alive() and not thread.name.startswith(("otelkit-", "Otel"))
        }

    deadline = time.monotonic() + 2
    while leftover() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftover() == set()


def test_mode_is_validated() -> None:
    receiver = OtlpReceiver()
    with pytest.raises(ValueError, match="mode must be one of"):
        receiver.mode = "down"  # type: ignore[assignment]
    assert receiver.mode == "ok"


def test_wait_for_returns_once_the_data_arrives(receiver: OtlpReceiver) -> None:
    exporter = span_exporter("http", receiver.http_endpoint, timeout=5)

    def export_later() -> None:
        time.sleep(0.2)
        with tracing(exporter) as tracer, tracer.start_as_current_span("late"):
            pass

    worker = threading.Thread(target=export_later)
    worker.start()
    try:
        assert receiver.spans() == []
        assert receiver.wait_for_span("late", timeout=5).name == "late"
    finally:
        worker.join()


def test_wait_for_failure_says_what_was_awaited_and_what_arrived(receiver: OtlpReceiver) -> None:
    with (
        tracing(span_exporter("http", receiver.http_endpoint, timeout=5)) as tracer,
        tracer.start_as_current_span("present"),
    ):
        pass
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"a span named 'absent'.*\['present'\]"):
        receiver.wait_for_span("absent", timeout=0.2)
    assert time.monotonic() - started < 0.2 + SLACK


def test_clear_forgets_received_data(receiver: OtlpReceiver) -> None:
    exporter = span_exporter("grpc", receiver.grpc_endpoint, timeout=5)
    with tracing(exporter) as tracer:
        with tracer.start_as_current_span("before"):
            pass
        receiver.clear()
        assert (receiver.spans(), receiver.request_count()) == ([], 0)
        with tracer.start_as_current_span("after"):
            pass
    assert [span.name for span in receiver.spans()] == ["after"]
