"""The benchmarked applications: one minimal FastAPI app, instrumented a dozen ways.

Why one module for both measures: the in-process driver (``bench/run.py``) and
the end-to-end servers (``uvicorn --factory bench.apps:create_app``) must measure
exactly the same application and exactly the same instrumentation, so both build
it here, through :func:`build`.

Why every variant gets its own providers: OpenTelemetry's global providers can be
set once per process, and instruments belong to the provider that created them.
Each variant therefore builds a fresh ``TracerProvider`` / ``MeterProvider`` and
hands them over explicitly; nothing here reads or sets the globals.

Why the exporters do nothing: the benchmark measures what instrumentation costs
the request path, not what a collector costs. Spans go through a real
``BatchSpanProcessor`` (the production path, worker thread included) into an
exporter that only counts them; metrics are aggregated into a real SDK
``MeterProvider`` with one pull reader that is never scraped. Every variant that
exports uses these same two pieces. ``bench/run.py`` repeats two variants with a
real OTLP/gRPC exporter to show what export itself adds.
"""

from __future__ import annotations

import atexit
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Final, cast

import orjson
import structlog
from fastapi import FastAPI
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler
from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otelkit._pipeline import SpanPipeline

__all__ = [
    "OTLP_VARIANTS",
    "VARIANTS",
    "Built",
    "CountingBatchSpanProcessor",
    "CountingSpanExporter",
    "SpanStats",
    "build",
    "create_app",
]

ITEM_PATH: Final = "/items/42"
"""The one path every request asks for (the route is ``/items/{item_id}``)."""

VARIANTS: Final[dict[str, str]] = {
    "bare": "FastAPI, no middleware",
    "otelkit-full": "otelkit.instrument(): spans, metrics, access log, request id",
    "otelkit-sampled-out": "otelkit, TracerProvider(sampler=ALWAYS_OFF)",
    "otelkit-tracing": "otelkit, tracing only",
    "otelkit-tracing-pipeline": "otelkit, tracing only, otelkit's own span pipeline",
    "otelkit-metrics": "otelkit, metrics only",
    "otelkit-access-log": "otelkit, access log only",
    "otelkit-request-id": "otelkit, request id only",
    "otel-contrib": "opentelemetry-instrumentation-fastapi + SDK",
    "fastapi-native": "FastAPI(telemetry={...}) + SDK",
    "prom-instrumentator": "prometheus-fastapi-instrumentator",
    "starlette-exporter": "starlette-exporter PrometheusMiddleware",
    "correlation-id-structlog": "asgi-correlation-id + structlog JSON access log",
}
"""Variant name -> what it is, in report order."""

OTLP_VARIANTS: Final = ("bare", "otelkit-full", "otelkit-tracing-pipeline", "otel-contrib")
"""Variants repeated with a real OTLP/gRPC span exporter (``bare`` is the baseline)."""

# --------------------------------------------------------------------------- exporters


class CountingSpanExporter(SpanExporter):
    """Counts the spans it is handed, then passes them on to ``inner`` (if any).

    Runs on the BatchSpanProcessor's worker thread, never on the request path.
    Server spans are counted apart so that they can be compared with requests:
    some instrumentations make several spans per request.
    """

    def __init__(self, inner: SpanExporter | None = None) -> None:
        self.inner = inner
        self.exported = 0
        self.server_spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Count, then delegate; counting never fails."""
        self.exported += len(spans)
        self.server_spans += sum(1 for span in spans if span.kind is SpanKind.SERVER)
        if self.inner is not None:
            return self.inner.export(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Shut the wrapped exporter down (an OTLP channel)."""
        if self.inner is not None:
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Flush the wrapped exporter."""
        if self.inner is not None:
            return self.inner.force_flush(timeout_millis)
        return True


class _CountsEnded:
    """Counts the spans a processor is given: ``ended - exported`` is what it dropped.

    The count costs one attribute increment per span, the same for every
    traced variant, whatever the number of spans per request.
    """

    ended = 0

    def on_end(self, span: ReadableSpan) -> None:
        """Count, then queue as usual."""
        self.ended += 1
        super().on_end(span)  # type: ignore[misc]


class CountingBatchSpanProcessor(_CountsEnded, BatchSpanProcessor):
    """The SDK's BatchSpanProcessor (default settings), counted."""


class CountingSpanPipeline(_CountsEnded, SpanPipeline):
    """otelkit's own span pipeline (default settings), counted.

    otelkit uses it for the exporters it creates; the benchmark's other
    variants inject an SDK BatchSpanProcessor so that every peer exports the
    same way. This variant shows what otelkit's pipeline drops under the same
    load (the budget: nothing).
    """


class UnscrapedReader(MetricReader):
    """A pull reader that nobody pulls: the SDK aggregates, nothing collects.

    Used where otelkit is not the one adding a reader (contrib, FastAPI's
    native telemetry), so that every meter provider has exactly one reader,
    as otelkit's own provider has (its Prometheus reader, never scraped here).
    """

    def _receive_metrics(self, metrics_data: Any, timeout_millis: float = 10_000, **_: Any) -> None:
        """Never called: the benchmark never collects."""

    def shutdown(self, timeout_millis: float = 30_000, **_: Any) -> None:
        """Nothing to release."""


@dataclass(frozen=True, slots=True)
class SpanStats:
    """What happened to the spans of one variant's BatchSpanProcessor."""

    ended: int
    """Spans handed to the processor (ended, sampled)."""
    exported: int
    """Spans the processor handed to the exporter."""
    server_spans: int
    """Of those, SERVER spans: one per request when nothing is dropped."""

    @property
    def dropped(self) -> int:
        """Spans lost because the processor's queue was full."""
        return self.ended - self.exported

    def as_dict(self) -> dict[str, int]:
        """JSON-ready, with ``dropped`` spelled out."""
        return {
            "ended": self.ended,
            "exported": self.exported,
            "server_spans": self.server_spans,
            "dropped": self.dropped,
        }


@dataclass(slots=True)
class Built:
    """One variant's app and the providers behind it (kept to flush and count)."""

    name: str
    app: ASGIApp
    tracer_provider: TracerProvider | None = None
    processor: CountingBatchSpanProcessor | CountingSpanPipeline | None = None
    exporter: CountingSpanExporter | None = None
    meter_provider: MeterProvider | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def flush(self) -> None:
        """Export every queued span now (so that a variant's export work is its own)."""
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()

    def span_stats(self) -> SpanStats | None:
        """Span counts so far; ``None`` for variants without an SDK tracer provider."""
        if self.processor is None or self.exporter is None:
            return None
        return SpanStats(
            ended=self.processor.ended,
            exported=self.exporter.exported,
            server_spans=self.exporter.server_spans,
        )

    def shutdown(self) -> None:
        """Shut the providers down and close what the variant opened."""
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                provider.shutdown()
        for close in self.closers:
            close()


# --------------------------------------------------------------------------- the app


def _new_app(**kwargs: Any) -> FastAPI:
    """The application under test: one route, a small JSON dict back.

    ``async def`` keeps the handler on the event loop: a sync handler would go
    through the thread pool, whose scheduling noise would swamp what we measure.
    """
    app = FastAPI(**kwargs)

    @app.get("/items/{item_id}")
    async def read_item(item_id: int) -> dict[str, Any]:
        return {"item_id": item_id, "name": "widget", "price": 9.99, "tags": ["a", "b"]}

    return app


def _tracing(
    sampler: Sampler = ALWAYS_ON, span_exporter: SpanExporter | None = None
) -> tuple[TracerProvider, CountingBatchSpanProcessor, CountingSpanExporter]:
    exporter = CountingSpanExporter(span_exporter)
    processor = CountingBatchSpanProcessor(exporter)
    provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
    provider.add_span_processor(processor)
    return provider, processor, exporter


def _meters(*, with_reader: bool) -> MeterProvider:
    readers: list[MetricReader] = [UnscrapedReader()] if with_reader else []
    return MeterProvider(metric_readers=readers, shutdown_on_exit=False)


# Logging is process-wide (otelkit replaces the root logger's handlers and
# configures structlog), so every otelkit variant of a process writes to one
# file, opened once.
_log_lock = threading.Lock()
_log_streams: dict[str, IO[Any]] = {}


def _log_dir() -> Path:
    configured = os.environ.get("BENCH_LOG_DIR")
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / "otelkit-bench-logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log_stream(name: str, mode: str) -> IO[Any]:
    with _log_lock:
        stream = _log_streams.get(name)
        if stream is None:
            # One long-lived file per process on purpose: it is the log stream.
            stream = open(_log_dir() / f"{name}-{os.getpid()}.log", mode)  # noqa: SIM115
            _log_streams[name] = stream
        return stream


def _otelkit(
    app: FastAPI, *, tracer_provider: Any, meter_provider: Any, **overrides: Any
) -> FastAPI:
    import otelkit

    otelkit.instrument(
        app,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        log_stream=_log_stream("otelkit", "a"),
        **overrides,
    )
    return app


def _pipeline_tracing(
    span_exporter: SpanExporter | None,
) -> tuple[TracerProvider, CountingSpanPipeline, CountingSpanExporter]:
    exporter = CountingSpanExporter(span_exporter)
    processor = CountingSpanPipeline(exporter)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    return provider, processor, exporter


def _build_otelkit(name: str, span_exporter: SpanExporter | None) -> Built:
    noop_tracing = otel_trace.NoOpTracerProvider()
    noop_metrics = otel_metrics.NoOpMeterProvider()
    if name in {"otelkit-full", "otelkit-sampled-out"}:
        sampler = ALWAYS_OFF if name == "otelkit-sampled-out" else ALWAYS_ON
        tp, processor, exporter = _tracing(sampler, span_exporter)
        # No reader: otelkit adds its own Prometheus pull reader (never scraped here).
        mp = _meters(with_reader=False)
        app = _otelkit(_new_app(), tracer_provider=tp, meter_provider=mp, semconv_metrics=True)
        return Built(name, app, tp, processor, exporter, mp)
    if name == "otelkit-tracing":
        tp, processor, exporter = _tracing(ALWAYS_ON, span_exporter)
        app = _otelkit(
            _new_app(), tracer_provider=tp, meter_provider=noop_metrics, access_log=False
        )
        return Built(name, app, tp, processor, exporter)
    if name == "otelkit-tracing-pipeline":
        tp, pipeline, exporter = _pipeline_tracing(span_exporter)
        app = _otelkit(
            _new_app(), tracer_provider=tp, meter_provider=noop_metrics, access_log=False
        )
        return Built(name, app, tp, pipeline, exporter)
    if name == "otelkit-metrics":
        mp = _meters(with_reader=False)
        app = _otelkit(
            _new_app(), tracer_provider=noop_tracing, meter_provider=mp, access_log=False
        )
        return Built(name, app, meter_provider=mp)
    if name == "otelkit-access-log":
        app = _otelkit(_new_app(), tracer_provider=noop_tracing, meter_provider=noop_metrics)
        return Built(name, app)
    if name == "otelkit-request-id":
        app = _otelkit(
            _new_app(),
            tracer_provider=noop_tracing,
            meter_provider=noop_metrics,
            access_log=False,
        )
        return Built(name, app)
    raise ValueError(f"not an otelkit variant: {name}")


def _build_contrib(span_exporter: SpanExporter | None) -> Built:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    tp, processor, exporter = _tracing(ALWAYS_ON, span_exporter)
    mp = _meters(with_reader=True)
    # A fresh app object; instrument_app() (not instrument()) leaves the
    # FastAPI class itself unpatched, so other variants stay bare.
    app = _new_app()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=tp, meter_provider=mp)
    return Built("otel-contrib", app, tp, processor, exporter, mp)


def _build_native() -> Built:
    tp, processor, exporter = _tracing()
    mp = _meters(with_reader=True)
    # Defaults otherwise: operation spans on, logs off (no logger provider).
    app = _new_app(telemetry={"tracer_provider": tp, "meter_provider": mp})
    return Built("fastapi-native", app, tp, processor, exporter, mp)


def _build_prometheus_instrumentator() -> Built:
    from prometheus_client import CollectorRegistry
    from prometheus_fastapi_instrumentator import Instrumentator

    app = _new_app()
    # A registry of its own: several builds in one process must not collide
    # in prometheus_client's global one. /metrics is not exposed (not scraped).
    Instrumentator(registry=CollectorRegistry()).instrument(app)
    return Built("prom-instrumentator", app)


def _build_starlette_exporter() -> Built:
    from starlette_exporter import PrometheusMiddleware

    app = _new_app()
    # starlette-exporter keeps its metrics on the middleware class, in the global
    # registry, so each build is told apart by app_name instead of a registry.
    app.add_middleware(PrometheusMiddleware, app_name=f"bench-{next(_app_numbers)}")
    return Built("starlette-exporter", app)


class _Counter:
    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    def __next__(self) -> int:
        with self._lock:
            self._value += 1
            return self._value


_app_numbers = _Counter()


class StructlogAccessLog:
    """One JSON line per request, the way a careful user writes it by hand.

    Pure ASGI (not ``BaseHTTPMiddleware``, which costs a task per request),
    sits inside ``CorrelationIdMiddleware`` so the id is set, and reads the
    route template after the app ran. The logger is built with
    ``structlog.wrap_logger`` rather than ``structlog.configure``: otelkit
    configures structlog process-wide, and this variant must not use that.
    """

    def __init__(self, app: ASGIApp, logger: Any) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request, capture the status, log once at the end."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            client = scope.get("client")
            log = self.logger.info if status < 400 else self.logger.warning
            log(
                "http_request_completed",
                method=scope["method"],
                path=scope["path"],
                route=getattr(route, "path_format", None),
                status_code=status,
                duration_ms=round((time.perf_counter() - start) * 1000, 3),
                client=client[0] if client else None,
            )


def _add_correlation_id(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    from asgi_correlation_id import correlation_id

    event_dict["request_id"] = correlation_id.get()
    return event_dict


def _build_correlation_id() -> Built:
    import logging

    from asgi_correlation_id import CorrelationIdMiddleware

    # structlog's recommended fast path: orjson into a BytesLogger, a bound
    # logger class that filters by level without a stdlib round trip.
    logger = structlog.wrap_logger(
        structlog.BytesLogger(cast("BinaryIO", _log_stream("structlog", "ab"))),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_correlation_id,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )
    app = _new_app()
    app.add_middleware(StructlogAccessLog, logger=logger)
    app.add_middleware(CorrelationIdMiddleware)  # added last: outermost
    return Built("correlation-id-structlog", app)


_UNTRACED_BUILDERS: Final[dict[str, Callable[[], Built]]] = {
    "bare": lambda: Built("bare", _new_app()),
    "fastapi-native": _build_native,
    "prom-instrumentator": _build_prometheus_instrumentator,
    "starlette-exporter": _build_starlette_exporter,
    "correlation-id-structlog": _build_correlation_id,
}


def build(name: str, span_exporter: SpanExporter | None = None) -> Built:
    """Build variant ``name`` (a key of :data:`VARIANTS`) on a fresh app.

    ``span_exporter`` replaces the counting-only exporter's destination (the
    OTLP table) for otelkit and contrib; spans are still counted on the way.
    """
    if name.startswith("otelkit-"):
        return _build_otelkit(name, span_exporter)
    if name == "otel-contrib":
        return _build_contrib(span_exporter)
    builder = _UNTRACED_BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if span_exporter is not None:
        raise ValueError(f"{name} takes no span exporter")
    return builder()


# --------------------------------------------------------------------------- uvicorn


def create_app(environ: Mapping[str, str] | None = None) -> ASGIApp:
    """The uvicorn factory: the variant named by ``BENCH_VARIANT``.

    ``uvicorn --factory bench.apps:create_app`` calls this with no argument.
    At exit, the span counts are written to ``BENCH_STATS_FILE`` (JSON), after
    a flush, so that run.py can report dropped spans for the served variant.
    """
    env = os.environ if environ is None else environ
    built = build(env["BENCH_VARIANT"])
    stats_file = env.get("BENCH_STATS_FILE")
    if stats_file:

        def write_stats() -> None:
            built.flush()
            stats = built.span_stats()
            payload = {"variant": built.name, "spans": stats.as_dict() if stats else None}
            Path(stats_file).write_text(json.dumps(payload))

        # Registered after the providers, so it runs before their own exit hooks.
        atexit.register(write_stats)
    return built.app
