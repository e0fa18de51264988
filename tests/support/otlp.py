"""An in-process OTLP receiver, and fault servers, for tests that use the real exporters.

Why this exists: otelkit's promise is that telemetry reaches a collector, so the tests
must watch the *real* OpenTelemetry exporters talk the *real* protocols (OTLP/gRPC and
OTLP/HTTP with protobuf bodies) to something that answers like a collector, including
a collector that is down, slow, refusing or blackholed. Mocking the exporter would
test nothing of that. Running the actual collector binary is not possible here, so
this module is a small, faithful stand-in:

* :class:`OtlpReceiver` serves the three OTLP services over gRPC *and* HTTP on
  127.0.0.1, stores every request, and decodes it into plain dataclasses
  (:class:`SpanRecord`, :class:`MetricPoint`, :class:`LogRecordData`) so that tests
  compare strings and numbers instead of walking protobuf trees. Its ``mode``
  switches at run time between answering normally, refusing with
  UNAVAILABLE / HTTP 503, and answering late; ``stop()`` then ``start()`` brings it
  back on the same ports, like a collector that restarts.
* :class:`Blackhole` accepts TCP connections and never answers: a collector behind a
  dead network path, where only the exporter's own timeout ends an export.
* :func:`free_port` names a port where nothing listens: a collector that is not
  running, so connections are refused at once.

Everything binds 127.0.0.1 only; nothing here is reachable from another machine.
"""

from __future__ import annotations

import gzip
import http.server
import logging
import select
import socket
import socketserver
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from http import HTTPStatus
from types import TracebackType
from typing import Any, ClassVar, Final, Literal, Self, TypeVar, cast, get_args
from urllib.parse import urlsplit

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = [
    "Blackhole",
    "ExponentialHistogramValue",
    "HistogramValue",
    "LogRecordData",
    "MetricKind",
    "MetricPoint",
    "MetricValue",
    "Mode",
    "OtlpReceiver",
    "ReceivedRequest",
    "Signal",
    "SpanRecord",
    "SummaryValue",
    "Transport",
    "decode_any_value",
    "free_port",
]

_logger = logging.getLogger(__name__)

Transport = Literal["grpc", "http"]
Signal = Literal["traces", "metrics", "logs"]
Mode = Literal["ok", "unavailable", "slow"]
MetricKind = Literal["sum", "gauge", "histogram", "exponential_histogram", "summary"]

_T = TypeVar("_T")

_LOOPBACK: Final = "127.0.0.1"
_MODES: Final[frozenset[str]] = frozenset(get_args(Mode))
_SIGNALS: Final[tuple[Signal, ...]] = get_args(Signal)
_TRANSPORTS: Final[tuple[Transport, ...]] = get_args(Transport)
# How often wait_for re-evaluates a predicate that does not depend on new requests
# (e.g. "the exporter returned"); new requests wake it at once.
_WAIT_POLL_SECONDS: Final = 0.05

# One entry per OTLP signal: HTTP path, request type, response type.
_HTTP_ROUTES: Final[dict[str, tuple[Signal, type[Message], type[Message]]]] = {
    "/v1/traces": (
        "traces",
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
    ),
    "/v1/metrics": (
        "metrics",
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
    "/v1/logs": (
        "logs",
        logs_service_pb2.ExportLogsServiceRequest,
        logs_service_pb2.ExportLogsServiceResponse,
    ),
}
_SIGNAL_PATHS: Final[dict[Signal, str]] = {
    signal: path for path, (signal, _, _) in _HTTP_ROUTES.items()
}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One export request as it reached the receiver, before any decoding.

    Kept so that tests can check what the decoded views leave out: headers sent by
    the exporter (``OTEL_EXPORTER_OTLP_HEADERS``, user agent), requests the receiver
    refused (``accepted=False``: the exporter's retries are visible as several of
    them), or the raw protobuf ``message``.
    """

    signal: Signal
    transport: Transport
    accepted: bool
    headers: dict[str, str]
    """Lower-cased names. HTTP headers, or gRPC metadata without the binary ``-bin`` keys."""
    message: Message
    """The ``Export{Trace,Metrics,Logs}ServiceRequest``. Do not mutate it."""
    received_at: float
    """``time.monotonic()`` when the request arrived."""


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One received span, with ids as lower-case hex as they appear in logs and headers."""

    name: str
    trace_id: str
    """32 lower-case hex digits."""
    span_id: str
    """16 lower-case hex digits."""
    parent_span_id: str | None
    kind: str
    """The ``SpanKind`` name without prefix: ``"SERVER"``, ``"CLIENT"``, ``"INTERNAL"``..."""
    attributes: dict[str, Any]
    status_code: str
    """``"UNSET"``, ``"OK"`` or ``"ERROR"``."""
    status_message: str
    events: list[tuple[str, dict[str, Any]]]
    """``(name, attributes)`` for each span event, in order."""
    resource: dict[str, Any]
    scope_name: str
    transport: Transport
    start_time_unix_nano: int
    end_time_unix_nano: int


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """The value of one explicit-bucket histogram data point."""

    count: int
    sum: float | None
    bucket_counts: list[int]
    explicit_bounds: list[float]
    min: float | None
    max: float | None


@dataclass(frozen=True, slots=True)
class ExponentialHistogramValue:
    """The value of one base-2 exponential histogram data point."""

    count: int
    sum: float | None
    scale: int
    zero_count: int
    positive_offset: int
    positive_bucket_counts: list[int]
    negative_offset: int
    negative_bucket_counts: list[int]
    min: float | None
    max: float | None


@dataclass(frozen=True, slots=True)
class SummaryValue:
    """The value of one summary data point (not produced by the Python SDK, but legal OTLP)."""

    count: int
    sum: float
    quantiles: list[tuple[float, float]]
    """``(quantile, value)`` pairs."""


MetricValue = int | float | HistogramValue | ExponentialHistogramValue | SummaryValue | None


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One data point of one received metric, flattened with its metric's properties."""

    name: str
    kind: MetricKind
    attributes: dict[str, Any]
    value: MetricValue
    """int or float for sums and gauges (None if the point carries no value), else the
    histogram / exponential histogram / summary dataclass."""
    is_monotonic: bool | None
    """For sums only."""
    temporality: str | None
    """``"CUMULATIVE"`` or ``"DELTA"`` for sums and histograms; None for gauges and summaries."""
    exemplars: list[dict[str, Any]]
    """Each ``{"trace_id": hex | None, "span_id": hex | None, "value": int | float | None,
    "attributes": dict, "time_unix_nano": int}``."""
    resource: dict[str, Any]
    scope_name: str
    unit: str
    description: str
    transport: Transport
    time_unix_nano: int


@dataclass(frozen=True, slots=True)
class LogRecordData:
    """One received log record."""

    body: Any
    severity_text: str
    severity_number: int
    attributes: dict[str, Any]
    trace_id: str | None
    span_id: str | None
    resource: dict[str, Any]
    scope_name: str
    event_name: str
    transport: Transport
    time_unix_nano: int
    observed_time_unix_nano: int


# --------------------------------------------------------------------------- decoding


def decode_any_value(value: common_pb2.AnyValue) -> Any:
    """Turn an OTLP ``AnyValue`` into the plain Python value it carries.

    str, bool, int, float and bytes come back as such, arrays as lists, key-value
    lists as dicts, and an empty ``AnyValue`` as None.
    """
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [decode_any_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return _decode_attributes(value.kvlist_value.values)
    # The remaining cases (string/bool/int/double/bytes_value) are plain scalars.
    return getattr(value, which)


def _decode_attributes(attributes: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {item.key: decode_any_value(item.value) for item in attributes}


def _resource_dict(resource: resource_pb2.Resource) -> dict[str, Any]:
    return _decode_attributes(resource.attributes)


def _hex_or_none(raw: bytes) -> str | None:
    """Hex of a trace/span id, or None when the field is empty (no parent, no context)."""
    return raw.hex() if raw else None


def _number(message: Message) -> int | float | None:
    """The ``as_int``/``as_double`` value of a number data point or exemplar."""
    which = message.WhichOneof("value")
    return None if which is None else getattr(message, which)


def _optional_float(message: Message, field: str) -> float | None:
    return getattr(message, field) if message.HasField(field) else None


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    """``SPAN_KIND_SERVER`` -> ``SERVER``: the protobuf enum name without its namespace prefix."""
    name: str = enum.Name(value)
    return name.removeprefix(prefix)


def _temporality(value: int) -> str:
    return _enum_name(metrics_pb2.AggregationTemporality, value, "AGGREGATION_TEMPORALITY_")


def _exemplars(exemplars: Iterable[metrics_pb2.Exemplar]) -> list[dict[str, Any]]:
    return [
        {
            "trace_id": _hex_or_none(exemplar.trace_id),
            "span_id": _hex_or_none(exemplar.span_id),
            "value": _number(exemplar),
            "attributes": _decode_attributes(exemplar.filtered_attributes),
            "time_unix_nano": exemplar.time_unix_nano,
        }
        for exemplar in exemplars
    ]


def _spans_of(request: ReceivedRequest) -> list[SpanRecord]:
    message = cast(trace_service_pb2.ExportTraceServiceRequest, request.message)
    records = []
    for resource_spans in message.resource_spans:
        resource = _resource_dict(resource_spans.resource)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                records.append(
                    SpanRecord(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=_hex_or_none(span.parent_span_id),
                        kind=_enum_name(trace_pb2.Span.SpanKind, span.kind, "SPAN_KIND_"),
                        attributes=_decode_attributes(span.attributes),
                        status_code=_enum_name(
                            trace_pb2.Status.StatusCode, span.status.code, "STATUS_CODE_"
                        ),
                        status_message=span.status.message,
                        events=[
                            (event.name, _decode_attributes(event.attributes))
                            for event in span.events
                        ],
                        resource=resource,
                        scope_name=scope_spans.scope.name,
                        transport=request.transport,
                        start_time_unix_nano=span.start_time_unix_nano,
                        end_time_unix_nano=span.end_time_unix_nano,
                    )
                )
    return records


def _metric_points(
    metric: metrics_pb2.Metric,
    resource: dict[str, Any],
    scope_name: str,
    transport: Transport,
) -> list[MetricPoint]:
    """Flatten one metric into its data points, whatever its kind."""

    def point(
        data_point: Any,
        kind: MetricKind,
        value: MetricValue,
        *,
        is_monotonic: bool | None = None,
        temporality: str | None = None,
        exemplars: list[dict[str, Any]] | None = None,
    ) -> MetricPoint:
        return MetricPoint(
            name=metric.name,
            kind=kind,
            attributes=_decode_attributes(data_point.attributes),
            value=value,
            is_monotonic=is_monotonic,
            temporality=temporality,
            exemplars=exemplars or [],
            resource=resource,
            scope_name=scope_name,
            unit=metric.unit,
            description=metric.description,
            transport=transport,
            time_unix_nano=data_point.time_unix_nano,
        )

    which = metric.WhichOneof("data")
    if which == "sum":
        return [
            point(
                dp,
                "sum",
                _number(dp),
                is_monotonic=metric.sum.is_monotonic,
                temporality=_temporality(metric.sum.aggregation_temporality),
                exemplars=_exemplars(dp.exemplars),
            )
            for dp in metric.sum.data_points
        ]
    if which == "gauge":
        return [
            point(dp, "gauge", _number(dp), exemplars=_exemplars(dp.exemplars))
            for dp in metric.gauge.data_points
        ]
    if which == "histogram":
        return [
            point(
                dp,
                "histogram",
                HistogramValue(
                    count=dp.count,
                    sum=_optional_float(dp, "sum"),
                    bucket_counts=list(dp.bucket_counts),
                    explicit_bounds=list(dp.explicit_bounds),
                    min=_optional_float(dp, "min"),
                    max=_optional_float(dp, "max"),
                ),
                temporality=_temporality(metric.histogram.aggregation_temporality),
                exemplars=_exemplars(dp.exemplars),
            )
            for dp in metric.histogram.data_points
        ]
    if which == "exponential_histogram":
        return [
            point(
                dp,
                "exponential_histogram",
                ExponentialHistogramValue(
                    count=dp.count,
                    sum=_optional_float(dp, "sum"),
                    scale=dp.scale,
                    zero_count=dp.zero_count,
                    positive_offset=dp.positive.offset,
                    positive_bucket_counts=list(dp.positive.bucket_counts),
                    negative_offset=dp.negative.offset,
                    negative_bucket_counts=list(dp.negative.bucket_counts),
                    min=_optional_float(dp, "min"),
                    max=_optional_float(dp, "max"),
                ),
                temporality=_temporality(metric.exponential_histogram.aggregation_temporality),
                exemplars=_exemplars(dp.exemplars),
            )
            for dp in metric.exponential_histogram.data_points
        ]
    if which == "summary":
        return [
            point(
                dp,
                "summary",
                SummaryValue(
                    count=dp.count,
                    sum=dp.sum,
                    quantiles=[(q.quantile, q.value) for q in dp.quantile_values],
                ),
            )
            for dp in metric.summary.data_points
        ]
    # A metric with no data is legal OTLP (and carries nothing to assert on).
    return []


def _metrics_of(request: ReceivedRequest) -> list[MetricPoint]:
    message = cast(metrics_service_pb2.ExportMetricsServiceRequest, request.message)
    points = []
    for resource_metrics in message.resource_metrics:
        resource = _resource_dict(resource_metrics.resource)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points.extend(
                    _metric_points(metric, resource, scope_metrics.scope.name, request.transport)
                )
    return points


def _logs_of(request: ReceivedRequest) -> list[LogRecordData]:
    message = cast(logs_service_pb2.ExportLogsServiceRequest, request.message)
    records = []
    for resource_logs in message.resource_logs:
        resource = _resource_dict(resource_logs.resource)
        for scope_logs in resource_logs.scope_logs:
            for log in scope_logs.log_records:
                records.append(
                    LogRecordData(
                        body=decode_any_value(log.body),
                        severity_text=log.severity_text,
                        severity_number=log.severity_number,
                        attributes=_decode_attributes(log.attributes),
                        trace_id=_hex_or_none(log.trace_id),
                        span_id=_hex_or_none(log.span_id),
                        resource=resource,
                        scope_name=scope_logs.scope.name,
                        event_name=log.event_name,
                        transport=request.transport,
                        time_unix_nano=log.time_unix_nano,
                        observed_time_unix_nano=log.observed_time_unix_nano,
                    )
                )
    return records


# --------------------------------------------------------------------------- gRPC side


# The generated servicer base classes only raise UNIMPLEMENTED; each subclass routes
# ``Export`` to the receiver. They take a plain callable so that they stay ignorant of
# the receiver's internals.
_GrpcExport = Callable[[Any, grpc.ServicerContext], Message]


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, export: _GrpcExport) -> None:
        self._export = export

    def Export(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self._export(request, context)


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, export: _GrpcExport) -> None:
        self._export = export

    def Export(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self._export(request, context)


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, export: _GrpcExport) -> None:
        self._export = export

    def Export(self, request: Any, context: grpc.ServicerContext) -> Message:
        return self._export(request, context)


# --------------------------------------------------------------------------- HTTP side


class _OtlpHttpServer(http.server.ThreadingHTTPServer):
    """Threading HTTP server that knows its receiver and can cut its open connections.

    The exporters keep HTTP/1.1 connections alive between exports, so each idle
    connection pins a handler thread in a blocking read. ``cut_connections`` shuts
    those sockets down so that ``stop()`` is immediate, and so that the exporter sees
    what it would see when a collector dies: its pooled connection is gone.
    """

    daemon_threads = True

    def __init__(self, port: int, receiver: OtlpReceiver) -> None:
        self.receiver = receiver
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((_LOOPBACK, port), _OtlpHttpHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can
        # take seconds on a badly configured host; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        self.server_name = _LOOPBACK
        self.server_port = self.server_address[1]

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def cut_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                # Already closed by the client or by its handler: nothing to cut.
                _logger.debug("connection already closed while stopping", exc_info=True)


# google.rpc.Code carried in the body of each error answer; client errors not listed
# here (400, 411, 415) are INVALID_ARGUMENT.
_RPC_CODES: Final[dict[HTTPStatus, int]] = {
    HTTPStatus.NOT_FOUND: code_pb2.NOT_FOUND,
    HTTPStatus.SERVICE_UNAVAILABLE: code_pb2.UNAVAILABLE,
}


class _OtlpHttpHandler(http.server.BaseHTTPRequestHandler):
    """OTLP/HTTP binary-protobuf endpoint: ``POST /v1/{traces,metrics,logs}``."""

    server: _OtlpHttpServer
    # Like the collector: keep-alive, so that the exporter's connection pool (and its
    # "stale pooled connection" retry) behaves as in production.
    protocol_version = "HTTP/1.1"
    # Bounds how long a handler thread waits for a silent client.
    timeout = 10.0

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        self.server.track(self.connection, add=False)
        super().finish()

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            # Without a length the request body cannot be delimited on this connection.
            self.close_connection = True
            self._reply_status(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return
        body = self.rfile.read(int(length))

        route = _HTTP_ROUTES.get(urlsplit(self.path).path)
        if route is None:
            self._reply_status(HTTPStatus.NOT_FOUND, f"no OTLP endpoint at {self.path}")
            return
        signal, request_type, response_type = route

        if self.headers.get_content_type() != "application/x-protobuf":
            self._reply_status(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "only application/x-protobuf is supported (no OTLP/JSON)",
            )
            return
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding != "identity":
                self._reply_status(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported Content-Encoding {encoding}"
                )
                return
            message = request_type.FromString(body)
        except (OSError, EOFError, zlib.error, DecodeError) as error:
            self._reply_status(HTTPStatus.BAD_REQUEST, f"undecodable body: {error}")
            return

        headers = {name.lower(): value for name, value in self.headers.items()}
        receiver = self.server.receiver
        outcome = receiver._answer(signal, "http", message, headers)
        if outcome == "accept":
            self._reply(HTTPStatus.OK, response_type().SerializeToString())
        elif outcome == "reject":
            retry_after = receiver.retry_after
            extra = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
            self._reply_status(HTTPStatus.SERVICE_UNAVAILABLE, "receiver is unavailable", extra)
        else:
            # Stopped while holding a slow request: drop it unanswered, as a dying
            # collector would.
            self.close_connection = True

    def _reply_status(
        self, status: HTTPStatus, message: str, extra_headers: Mapping[str, str] | None = None
    ) -> None:
        # OTLP/HTTP: error bodies are a google.rpc.Status in the request's encoding.
        code = _RPC_CODES.get(status, code_pb2.INVALID_ARGUMENT)
        body = status_pb2.Status(code=code, message=message).SerializeToString()
        self._reply(status, body, extra_headers)

    def _reply(
        self, status: HTTPStatus, body: bytes, extra_headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # The base class writes every request to stderr; keep that out of test output.
        _logger.debug("otlp http: " + format, *args)


# --------------------------------------------------------------------------- receiver


class OtlpReceiver:
    """OTLP/gRPC + OTLP/HTTP receiver on 127.0.0.1 that records what the exporters send.

    Use it as a context manager (``with OtlpReceiver() as rx:``); ``stop()`` always
    ends both servers and every thread they started, and may be called any number of
    times. ``start()`` after ``stop()`` listens again on the *same* two ports, which is
    how tests simulate a collector that goes away and comes back: exporters keep their
    endpoint and must reconnect. There is a small race in that: while stopped, the
    ports are free and the OS may hand one to another socket (another test binding
    port 0); ``start()`` then raises ``RuntimeError`` rather than silently moving. On a
    test machine that is rare, since Linux hands out ephemeral ports in sequence.

    Fault modes, switchable at any time through the ``mode`` attribute:

    * ``"ok"``: accept and answer at once.
    * ``"unavailable"``: refuse every export with gRPC ``UNAVAILABLE`` / HTTP ``503``
      (retryable for the exporters). If ``retry_after`` is set, the refusal carries
      that back-off hint (gRPC ``RetryInfo`` trailer / HTTP ``Retry-After``), which
      the exporters honour instead of their exponential back-off.
    * ``"slow"``: wait ``delay`` seconds, then accept (even if the client has given up
      by then, as a real collector would). ``stop()`` cuts the wait short and drops the
      request unanswered.

    Refused requests are recorded too (``accepted=False``) but never appear in
    ``spans()``, ``metrics()`` or ``logs()``.
    """

    def __init__(
        self,
        *,
        mode: Mode = "ok",
        delay: float = 1.0,
        retry_after: float | None = None,
    ) -> None:
        self.mode = mode
        self.delay = delay
        """Seconds a request waits in ``"slow"`` mode."""
        self.retry_after = retry_after
        """Back-off hint, in seconds, sent with ``"unavailable"`` refusals; None sends none.

        Fractions are sent as such (``Retry-After: 0.05``): RFC 9110 wants whole
        seconds, but the Python exporters parse a float, and fast tests need it."""

        self._requests: list[ReceivedRequest] = []
        self._changed = threading.Condition()
        self._lifecycle = threading.Lock()
        self._grpc_port: int | None = None
        self._http_port: int | None = None
        self._grpc_server: grpc.Server | None = None
        self._grpc_executor: ThreadPoolExecutor | None = None
        self._http_server: _OtlpHttpServer | None = None
        self._http_thread: threading.Thread | None = None
        # Set by stop(); a fresh one per start() so that requests held by a previous
        # run stay released.
        self._stopping = threading.Event()
        self._stopping.set()

    # ---------------------------------------------------------------- configuration

    @property
    def mode(self) -> Mode:
        """How the receiver answers exports from now on: ``"ok"``, ``"unavailable"``, ``"slow"``."""
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        if value not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, not {value!r}")
        self._mode = value

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Listen on both transports; on the ports of the previous run if there was one.

        Does nothing if already running. Raises ``RuntimeError`` if a previous port has
        been taken by someone else in the meantime.
        """
        with self._lifecycle:
            if self.running:
                return self
            # Before the servers start, so that no request can see the old, set event.
            self._stopping = threading.Event()
            try:
                self._start_grpc()
                self._start_http()
            except BaseException:
                self._stopping.set()
                self._stop_servers()
                raise
        return self

    def stop(self) -> None:
        """Stop both servers and join their threads. Idempotent; ports stay reserved for start()."""
        with self._lifecycle:
            # Release requests held in "slow" mode first, so that the servers'
            # threads can finish and the shutdown below does not wait for them.
            self._stopping.set()
            self._stop_servers()

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._grpc_server is not None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_grpc(self) -> None:
        executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="otlp-receiver-grpc")
        # SO_REUSEPORT (gRPC's default on Linux) would let a second socket share the port
        # silently; without it a port taken while stopped is an error, not a split.
        server = grpc.server(executor, options=[("grpc.so_reuseport", 0)])
        # The generated *_pb2_grpc modules carry no annotations.
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceServicer(self._grpc_export_for("traces")), server
        )
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _MetricsServicer(self._grpc_export_for("metrics")), server
        )
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _LogsServicer(self._grpc_export_for("logs")), server
        )
        address = f"{_LOOPBACK}:{self._grpc_port or 0}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as error:
            port = 0
            cause: BaseException | None = error
        else:
            cause = None
        if port == 0:
            server.stop(None)
            executor.shutdown(wait=True, cancel_futures=True)
            raise RuntimeError(
                f"OTLP/gRPC receiver could not bind {address}: another socket took the port"
                " while the receiver was stopped"
            ) from cause
        server.start()
        self._grpc_port = port
        self._grpc_server = server
        self._grpc_executor = executor

    def _start_http(self) -> None:
        port = self._http_port or 0
        try:
            server = _OtlpHttpServer(port, self)
        except OSError as error:
            raise RuntimeError(
                f"OTLP/HTTP receiver could not bind {_LOOPBACK}:{port}: another socket took"
                " the port while the receiver was stopped"
            ) from error
        thread = threading.Thread(
            # A short poll interval keeps shutdown() quick.
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"otlp-receiver-http-{server.server_port}",
            daemon=True,
        )
        thread.start()
        self._http_port = server.server_port
        self._http_server = server
        self._http_thread = thread

    def _stop_servers(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.cut_connections()
            # Joins the handler threads (block_on_close), which the cut above released.
            self._http_server.server_close()
            self._http_server = None
        if self._http_thread is not None:
            self._http_thread.join()
            self._http_thread = None
        if self._grpc_server is not None:
            # A grace period makes the server send a clean GOAWAY (grace=None sends an
            # error GOAWAY that gRPC's C core logs to stderr in the client process). It
            # costs nothing here: held "slow" requests were released above, and stop()
            # returns as soon as no RPC is active. The event fires once the listening
            # socket and the server's polling thread are gone.
            self._grpc_server.stop(grace=0.5).wait()
            self._grpc_server = None
        if self._grpc_executor is not None:
            self._grpc_executor.shutdown(wait=True, cancel_futures=True)
            self._grpc_executor = None

    # ---------------------------------------------------------------- endpoints

    @property
    def grpc_port(self) -> int:
        """Port of the OTLP/gRPC server (known from the first ``start()`` on)."""
        if self._grpc_port is None:
            raise RuntimeError("OtlpReceiver has not been started")
        return self._grpc_port

    @property
    def http_port(self) -> int:
        """Port of the OTLP/HTTP server (known from the first ``start()`` on)."""
        if self._http_port is None:
            raise RuntimeError("OtlpReceiver has not been started")
        return self._http_port

    @property
    def grpc_endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, the gRPC exporters' ``endpoint`` (``http`` means insecure)."""
        return f"http://{_LOOPBACK}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: a base URL, as for ``OTEL_EXPORTER_OTLP_ENDPOINT``.

        The HTTP exporters append ``/v1/<signal>`` only to the environment variable;
        an ``endpoint=`` argument must be the full URL (see :meth:`http_url`).
        """
        return f"http://{_LOOPBACK}:{self.http_port}"

    def http_url(self, signal: Signal) -> str:
        """Full OTLP/HTTP URL of one signal, e.g. ``http://127.0.0.1:PORT/v1/traces``."""
        return self.http_endpoint + _SIGNAL_PATHS[signal]

    @property
    def http_traces_url(self) -> str:
        """Full OTLP/HTTP URL for spans."""
        return self.http_url("traces")

    @property
    def http_metrics_url(self) -> str:
        """Full OTLP/HTTP URL for metrics."""
        return self.http_url("metrics")

    @property
    def http_logs_url(self) -> str:
        """Full OTLP/HTTP URL for logs."""
        return self.http_url("logs")

    def otel_env(self, protocol: Literal["grpc", "http/protobuf"]) -> dict[str, str]:
        """Environment that points every signal of a process at this receiver.

        For tests that configure exporters the way users do, or that start a
        subprocess; the gRPC endpoint's ``http://`` scheme selects an insecure channel.
        """
        endpoint = self.grpc_endpoint if protocol == "grpc" else self.http_endpoint
        return {"OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}

    # ---------------------------------------------------------------- request handling

    def _grpc_export_for(self, signal: Signal) -> _GrpcExport:
        response_type = _HTTP_ROUTES[_SIGNAL_PATHS[signal]][2]

        def export(request: Message, context: grpc.ServicerContext) -> Message:
            headers = {
                key.lower(): value
                for key, value in context.invocation_metadata()
                if isinstance(value, str)
            }
            outcome = self._answer(signal, "grpc", request, headers)
            if outcome == "accept":
                return response_type()
            retry_after = self.retry_after
            if outcome == "reject" and retry_after is not None:
                context.set_trailing_metadata(
                    (("google.rpc.retryinfo-bin", _retry_info(retry_after)),)
                )
            detail = "receiver is unavailable" if outcome == "reject" else "receiver stopped"
            context.abort(grpc.StatusCode.UNAVAILABLE, detail)
            raise AssertionError("unreachable: ServicerContext.abort() raises")

        return export

    def _answer(
        self,
        signal: Signal,
        transport: Transport,
        message: Message,
        headers: dict[str, str],
    ) -> Literal["accept", "reject", "drop"]:
        """Apply the fault mode to one arrived request, record it, and say how to answer.

        Called from the servers' threads. ``"drop"`` means the receiver was stopped
        while the request waited in ``"slow"`` mode.
        """
        stopping = self._stopping
        mode = self.mode
        if mode == "slow" and stopping.wait(self.delay):
            outcome: Literal["accept", "reject", "drop"] = "drop"
        elif mode == "unavailable":
            outcome = "reject"
        else:
            outcome = "accept"
        request = ReceivedRequest(
            signal=signal,
            transport=transport,
            accepted=outcome == "accept",
            headers=headers,
            message=message,
            received_at=time.monotonic(),
        )
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()
        return outcome

    # ---------------------------------------------------------------- accessors

    def requests(
        self,
        signal: Signal | None = None,
        transport: Transport | None = None,
        *,
        include_rejected: bool = False,
    ) -> list[ReceivedRequest]:
        """Export requests received so far, oldest first, optionally filtered."""
        with self._changed:
            snapshot = list(self._requests)
        return [
            request
            for request in snapshot
            if (signal is None or request.signal == signal)
            and (transport is None or request.transport == transport)
            and (include_rejected or request.accepted)
        ]

    def request_count(
        self,
        signal: Signal | None = None,
        transport: Transport | None = None,
        *,
        include_rejected: bool = False,
    ) -> int:
        """How many export requests arrived (accepted ones only, unless asked)."""
        return len(self.requests(signal, transport, include_rejected=include_rejected))

    def spans(self, name: str | None = None) -> list[SpanRecord]:
        """Every accepted span, in arrival order; only those called ``name`` if given."""
        return [
            span
            for request in self.requests("traces")
            for span in _spans_of(request)
            if name is None or span.name == name
        ]

    def metrics(self, name: str | None = None) -> list[MetricPoint]:
        """Every accepted metric data point, in arrival order; only metric ``name`` if given.

        Cumulative metrics are re-sent on every collection, so the same series shows up
        once per export; the last one is the current value.
        """
        return [
            point
            for request in self.requests("metrics")
            for point in _metrics_of(request)
            if name is None or point.name == name
        ]

    def logs(self) -> list[LogRecordData]:
        """Every accepted log record, in arrival order."""
        return [record for request in self.requests("logs") for record in _logs_of(request)]

    def clear(self) -> None:
        """Forget every request received so far (mode and ports are kept)."""
        with self._changed:
            self._requests.clear()

    # ---------------------------------------------------------------- waiting

    def wait_for(
        self,
        predicate: Callable[[], _T | None],
        timeout: float = 10.0,
        *,
        message: str | None = None,
    ) -> _T:
        """Return ``predicate()``'s first truthy result, or fail the test after ``timeout`` s.

        Exports run on the SDK's background threads, so tests must wait rather than
        look once. The predicate is re-evaluated on every new request and at least
        every 50 ms. The ``AssertionError`` names what was awaited and what did arrive.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = message or getattr(predicate, "__name__", repr(predicate))
                raise AssertionError(
                    f"timed out after {timeout:g}s waiting for {what}; {self.describe()}"
                )
            with self._changed:
                self._changed.wait(min(remaining, _WAIT_POLL_SECONDS))

    def wait_for_spans(self, count: int, timeout: float = 10.0) -> list[SpanRecord]:
        """Wait until at least ``count`` spans arrived; return all spans."""
        return self.wait_for(
            lambda: spans if len(spans := self.spans()) >= count else None,
            timeout,
            message=f"{count} span(s)",
        )

    def wait_for_span(self, name: str, timeout: float = 10.0) -> SpanRecord:
        """Wait for a span called ``name``; return the first one."""
        spans = self.wait_for(lambda: self.spans(name), timeout, message=f"a span named {name!r}")
        return spans[0]

    def wait_for_metric(self, name: str, timeout: float = 10.0) -> list[MetricPoint]:
        """Wait for data points of metric ``name``; return all of them so far."""
        return self.wait_for(
            lambda: self.metrics(name), timeout, message=f"data points of metric {name!r}"
        )

    def wait_for_logs(self, count: int, timeout: float = 10.0) -> list[LogRecordData]:
        """Wait until at least ``count`` log records arrived; return all of them."""
        return self.wait_for(
            lambda: logs if len(logs := self.logs()) >= count else None,
            timeout,
            message=f"{count} log record(s)",
        )

    def describe(self) -> str:
        """One-line account of what arrived, for failure messages."""
        with self._changed:
            snapshot = list(self._requests)
        counts = Counter((r.signal, r.transport, r.accepted) for r in snapshot)
        parts = []
        for signal in _SIGNALS:
            for transport in _TRANSPORTS:
                accepted = counts[signal, transport, True]
                rejected = counts[signal, transport, False]
                if accepted or rejected:
                    parts.append(f"{signal}/{transport}: {accepted} accepted, {rejected} refused")
        span_names = sorted({span.name for span in self.spans()})
        metric_names = sorted({point.name for point in self.metrics()})
        return (
            f"mode={self.mode!r}, requests: {'; '.join(parts) or 'none'}; "
            f"span names {span_names}; metric names {metric_names}; "
            f"{len(self.logs())} log record(s)"
        )

    def __repr__(self) -> str:
        ports = f"grpc={self._grpc_port}, http={self._http_port}"
        return f"<OtlpReceiver {ports} running={self.running} mode={self.mode!r}>"


def _retry_info(seconds: float) -> bytes:
    """A serialized ``google.rpc.RetryInfo``: the gRPC way of saying "retry after N s"."""
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromTimedelta(timedelta(seconds=seconds))
    serialized: bytes = info.SerializeToString()
    return serialized


# --------------------------------------------------------------------------- fault servers


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens: connecting to it is refused at once.

    The port was free when this returned; another socket binding port 0 could take it
    before the test connects (rare: Linux hands out ephemeral ports in sequence).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_LOOPBACK, 0))
        port: int = probe.getsockname()[1]
    return port


class Blackhole:
    """A TCP server on 127.0.0.1 that accepts connections and never answers or closes them.

    This is the collector behind a dead network path (or a hung collector): the TCP
    handshake succeeds, so nothing fails fast, and only the client's own timeout ends
    the request. Connections stay open until ``stop()``.
    """

    _BACKLOG: ClassVar[int] = 64

    def __init__(self) -> None:
        self._listener: socket.socket | None = None
        self._wake_reader: socket.socket | None = None
        self._wake_writer: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._connections: list[socket.socket] = []
        self._accepted = 0
        self._lock = threading.Lock()
        self._port: int | None = None

    def start(self) -> Self:
        """Listen on a free port of 127.0.0.1 (does nothing if already started)."""
        if self._thread is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((_LOOPBACK, 0))
        listener.listen(self._BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        # stop() writes a byte here to wake the accept loop out of select().
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread = threading.Thread(
            target=self._accept_loop,
            args=(listener, self._wake_reader),
            name=f"blackhole-{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every connection and the listener, and join the thread. Idempotent."""
        if self._thread is None:
            return
        assert self._wake_writer is not None
        self._wake_writer.send(b"x")
        self._thread.join()
        self._thread = None
        with self._lock:
            connections, self._connections = self._connections, []
        for sock in [*connections, self._listener, self._wake_reader, self._wake_writer]:
            if sock is not None:
                sock.close()
        self._listener = self._wake_reader = self._wake_writer = None

    def _accept_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        while True:
            readable, _, _ = select.select([listener, wake], [], [])
            if wake in readable:
                return
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                # The client gave up between select() and accept().
                continue
            with self._lock:
                self._connections.append(connection)
                self._accepted += 1

    @property
    def port(self) -> int:
        """The listening port (known after ``start()``)."""
        if self._port is None:
            raise RuntimeError("Blackhole has not been started")
        return self._port

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, usable as a gRPC or HTTP exporter endpoint."""
        return f"http://{_LOOPBACK}:{self.port}"

    @property
    def connection_count(self) -> int:
        """Connections accepted so far (still counted after ``stop()`` closed them)."""
        with self._lock:
            return self._accepted

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
