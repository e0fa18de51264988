"""``instrument(app)``: providers, exporters, logging and the middleware, wired once."""

from __future__ import annotations

import asyncio
import atexit
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import IO, Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from otelkit import exporters, logs, prometheus
from otelkit import metrics as otelkit_metrics
from otelkit._multiprocess import WorkerSnapshots
from otelkit._pipeline import CountingMetricExporter, SpanPipeline
from otelkit.context import get_request_id
from otelkit.middleware import OtelkitMiddleware, Runtime, resolve_in_flight
from otelkit.settings import Settings, resolve_settings
from otelkit.tracing import INSTRUMENTATION_NAME, build_tracer_provider, use_provider

__version__ = "0.1.0"

_ATTRIBUTE = "__otelkit__"
_lock = threading.RLock()

# Instruments and readers are created once per provider, never per app or
# per middleware rebuild.
_http_metrics: weakref.WeakKeyDictionary[Any, otelkit_metrics.HttpMetrics] = (
    weakref.WeakKeyDictionary()
)
_prometheus_readers: weakref.WeakKeyDictionary[Any, prometheus.PrometheusReader] = (
    weakref.WeakKeyDictionary()
)
_snapshots: weakref.WeakKeyDictionary[prometheus.PrometheusReader, WorkerSnapshots] = (
    weakref.WeakKeyDictionary()
)


@dataclass(slots=True)
class _Owned:
    """What otelkit created itself, and so flushes and shuts down."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    metrics_server: prometheus.MetricsServer | None = None
    logger_provider: Any = None
    shutdown_timeout: float = 3.0


_owned = _Owned()
_warned_foreign = [False]
_exit_registered = [False]


def _register_exit_once() -> None:
    # The SDK's own atexit shutdown waits for a hung export as long as it
    # takes; otelkit's providers are shut down by this bounded one instead.
    if not _exit_registered[0]:
        _exit_registered[0] = True
        atexit.register(_shutdown_owned_at_exit)


@dataclass(slots=True)
class _AppState:
    """Kept on an instrumented app, to undo the instrumentation."""

    original_build: Any
    telemetry_config: dict[str, Any] | None
    automatic: bool


def _service_fields(settings: Settings, app: Any) -> tuple[str, str, str]:
    title = getattr(app, "title", None)
    service = (
        settings.service_name
        or settings.resource_attribute("service.name")
        or (title if isinstance(title, str) and title != "FastAPI" else None)
        or "unknown_service"
    )
    app_version = getattr(app, "version", None)
    version = (
        settings.service_version
        or settings.resource_attribute("service.version")
        or (app_version if isinstance(app_version, str) else None)
        or "unknown"
    )
    environment = (
        settings.environment
        or settings.resource_attribute("deployment.environment.name", "deployment.environment")
        or "production"
    )
    return service, version, environment


def _resource(settings: Settings, service: str, version: str, environment: str) -> Resource:
    attributes: dict[str, Any] = dict(settings.resource_attributes)
    attributes.update(
        {
            "service.name": service,
            "service.version": version,
            "deployment.environment.name": environment,
        }
    )
    return Resource.create(attributes)


def _tracer_provider(
    settings: Settings, resource: Resource, given: Any, *, automatic: bool = False
) -> Any:
    if given is not None:
        return given
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        if automatic and current is not _owned.tracer_provider and not _warned_foreign[0]:
            _warned_foreign[0] = True
            logs.get_logger("otelkit").warning(
                "sdk_configured_elsewhere",
                detail="another distro/configurator set up the OpenTelemetry SDK; otelkit "
                "uses its providers and exporters. Set OTEL_PYTHON_DISTRO=otelkit and "
                "OTEL_PYTHON_CONFIGURATOR=otelkit to get otelkit's.",
            )
        return current  # configured by the application, the launcher or an earlier call
    provider = build_tracer_provider(settings, resource)
    if not settings.sdk_disabled:
        for exporter in exporters.span_exporters(settings):
            processor: Any
            if exporter.__class__.__name__ == "ConsoleSpanExporter":
                processor = SimpleSpanProcessor(exporter)
            else:
                processor = SpanPipeline(exporter)
            provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _owned.tracer_provider = provider
    _owned.shutdown_timeout = settings.shutdown_timeout
    _register_exit_once()
    return provider


def _log_provider(settings: Settings, resource: Resource) -> None:
    """OTLP log export of every line, when OTEL_LOGS_EXPORTER asks for it."""
    if (
        settings.sdk_disabled
        or "otlp" not in settings.logs_exporter
        or exporters.otlp_endpoint(settings, "logs") is None
        or _owned.logger_provider is not None
    ):
        return
    from opentelemetry._logs import set_logger_provider
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_log_record_processor(
        BatchLogRecordProcessor(exporters.otlp_log_exporter(settings))
    )
    set_logger_provider(provider)
    _owned.logger_provider = provider
    logs.set_otlp_logger(provider.get_logger("otelkit", __version__))


def _meter_provider(settings: Settings, resource: Resource, given: Any) -> Any:
    if given is not None:
        return given
    current = metrics.get_meter_provider()
    if isinstance(current, MeterProvider):
        return current
    readers: list[MetricReader] = []
    if not settings.sdk_disabled:
        if "otlp" in settings.metrics_exporter and exporters.otlp_endpoint(settings, "metrics"):
            readers.append(
                PeriodicExportingMetricReader(
                    CountingMetricExporter(
                        exporters.otlp_metric_exporter(settings),
                        [lambda: produced_metrics(metrics.get_meter_provider())],
                    ),
                    export_interval_millis=settings.metric_export_interval,
                )
            )
        if "console" in settings.metrics_exporter:
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            readers.append(
                PeriodicExportingMetricReader(
                    ConsoleMetricExporter(),
                    export_interval_millis=settings.metric_export_interval,
                )
            )
    provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)
    metrics.set_meter_provider(provider)
    _owned.meter_provider = provider
    _owned.shutdown_timeout = settings.shutdown_timeout
    _register_exit_once()
    return provider


def produced_metrics(provider: Any) -> list[Any]:
    """The metrics otelkit aggregates itself for ``provider`` (the HTTP histograms)."""
    http = _http_metrics.get(provider)
    return http.histograms() if http is not None else []


def _prometheus_reader(provider: Any) -> prometheus.PrometheusReader | None:
    reader = _prometheus_readers.get(provider)
    if reader is None:
        add = getattr(provider, "add_metric_reader", None)
        if add is None:
            return None
        reader = prometheus.PrometheusReader()
        reader.producers.append(lambda: produced_metrics(provider))
        add(reader)
        _prometheus_readers[provider] = reader
    return reader


def _feeds_every_reader(provider: Any, extra_readers: tuple[Any, ...]) -> bool:
    """Whether otelkit can add its own aggregated metrics to each of the provider's readers.

    True when every reader is otelkit's (its Prometheus reader, or a periodic
    reader around its OTLP exporter wrapper) or one the caller vouched for;
    a reader the application brought would otherwise miss the histograms.
    """
    # The SDK keeps the readers (constructor's and added ones) in its
    # measurement consumer; there is no public way to list them.
    consumer = getattr(provider, "_measurement_consumer", None)
    storages = getattr(consumer, "_reader_storages", None)
    if not isinstance(storages, dict):
        return False
    readers = list(storages)
    for reader in readers:
        if isinstance(reader, prometheus.PrometheusReader) or reader in extra_readers:
            continue
        if isinstance(getattr(reader, "_exporter", None), CountingMetricExporter):
            continue
        return False
    return True


def _http_metrics_for(
    provider: Any, settings: Settings, trusted_readers: tuple[Any, ...] = ()
) -> otelkit_metrics.HttpMetrics:
    http = _http_metrics.get(provider)
    if http is None:
        http = otelkit_metrics.HttpMetrics(
            provider,
            otelkit_metrics.InFlight(resolve_in_flight),
            semconv=settings.semconv_metrics,
            version=__version__,
            produced=_feeds_every_reader(provider, trusted_readers),
        )
        _http_metrics[provider] = http
    return http


async def _internal_error(request: Request, exc: Exception) -> Response:
    """The 500 body: FastAPI's ``detail`` plus the request id to quote to support."""
    return JSONResponse(
        {"detail": "Internal Server Error", "request_id": get_request_id()}, status_code=500
    )


def _without_contrib_middleware(stack: ASGIApp) -> ASGIApp:
    """Splice opentelemetry-instrumentation-asgi's middleware out of a built stack.

    otelkit makes the server span; a second middleware would make a second one.
    """
    node: Any = stack
    parent: Any = None
    seen: set[int] = set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        cls = type(node)
        if cls.__name__ == "OpenTelemetryMiddleware" and cls.__module__.startswith(
            "opentelemetry.instrumentation.asgi"
        ):
            inner = node.app
            if parent is None:
                stack = inner
            else:
                parent.app = inner
            node = inner
            continue
        parent, node = node, getattr(node, "app", None)
    return stack


def instrument(
    app: Any,
    *,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    log_stream: IO[str] | None = None,
    _automatic: bool = False,
    _trusted_readers: tuple[Any, ...] = (),
    **overrides: Any,
) -> None:
    """Make ``app`` observable: spans, request ids, metrics, structured logs.

    Settings resolve from ``overrides``, then environment variables, then
    defaults (see the configuration reference). A second call on the same
    app warns and changes nothing.

    Example:
        >>> from fastapi import FastAPI
        >>> import otelkit
        >>> app = FastAPI()
        >>> otelkit.instrument(app, log_format="console")

    Args:
        app: A FastAPI or Starlette application.
        tracer_provider: Use this tracer provider instead of the global one
            (tests inject an in-memory one). otelkit adds no exporter to it.
        meter_provider: Likewise for metrics; otelkit adds its Prometheus
            reader to it, and business metrics are recorded into it.
        log_stream: Where log lines go; standard output by default.
        **overrides: Any setting by name, e.g. ``log_format="console"``.

    Raises:
        ConfigurationError: A setting has an invalid value.
        TypeError: ``app`` is not a Starlette application.
    """
    with _lock:
        existing: _AppState | None = getattr(app, _ATTRIBUTE, None)
        if existing is not None:
            if not (existing.automatic and not _automatic and not overrides):
                warnings.warn(
                    "otelkit.instrument() was already called on this app; "
                    "this call changes nothing",
                    stacklevel=2,
                )
            return
        if not hasattr(app, "build_middleware_stack"):
            raise TypeError(
                f"otelkit.instrument() needs a FastAPI or Starlette app, not {type(app).__name__}; "
                "wrap other ASGI apps with otelkit.middleware.OtelkitMiddleware",
            )
        settings = resolve_settings(overrides)
        service, version, environment = _service_fields(settings, app)
        if settings.configure_logging:
            logs.configure_logging(
                level=settings.log_level,
                log_format=settings.log_format,
                service=service,
                version=version,
                environment=environment,
                redact_fields=settings.redact_fields,
                quiet_server_access_log=settings.access_log,
                stream=log_stream,
            )
        otelkit_metrics.set_strict(environment in {"development", "test"})
        resource = _resource(settings, service, version, environment)
        if settings.sdk_disabled:
            # OTEL_SDK_DISABLED (or sdk_disabled=True): every signal is a no-op,
            # whichever way it was set; request ids and logs keep working.
            tracer_provider = tracer_provider or trace.NoOpTracerProvider()
            meter_provider = meter_provider or metrics.NoOpMeterProvider()
        tracers = _tracer_provider(settings, resource, tracer_provider, automatic=_automatic)
        _log_provider(settings, resource)
        meters = _meter_provider(settings, resource, meter_provider)
        render = None
        if "prometheus" in settings.metrics_exporter and not settings.sdk_disabled:
            reader = _prometheus_reader(meters)
            if reader is not None:
                render = _renderer(reader, settings)
                if settings.prometheus_port is not None:
                    _serve_separately(settings, render)
                    render = None
        http_metrics = _http_metrics_for(meters, settings, _trusted_readers)
        otelkit_metrics.bind_declared(meters if meter_provider is not None else None)
        use_provider(tracers if tracer_provider is not None else None)

        runtime = Runtime(
            tracer=tracers.get_tracer(INSTRUMENTATION_NAME, __version__),
            http_metrics=http_metrics,
            access_logger=logs.get_logger("otelkit.access"),
            log_started=settings.log_level <= 10,
            access_log=settings.access_log,
            excluded_paths=settings.excluded_paths | {settings.metrics_path},
            request_id_header=settings.request_id_header,
            metrics_path=settings.metrics_path if render is not None else None,
            render_metrics=render,
            on_shutdown=_flusher(tracers, meters, settings.shutdown_timeout),
        )
        telemetry_config = _silence_native_fastapi_telemetry(app)
        _replace_contrib_instrumentation(app)
        handlers = getattr(app, "exception_handlers", None)
        if isinstance(handlers, dict) and Exception not in handlers and 500 not in handlers:
            app.add_exception_handler(Exception, _internal_error)

        original_build = app.build_middleware_stack

        def build_middleware_stack() -> ASGIApp:
            return OtelkitMiddleware(_without_contrib_middleware(original_build()), runtime)

        app.build_middleware_stack = build_middleware_stack
        app.middleware_stack = None
        setattr(
            app,
            _ATTRIBUTE,
            _AppState(original_build, telemetry_config, automatic=_automatic),
        )


def _renderer(reader: prometheus.PrometheusReader, settings: Settings) -> Any:
    snapshots: WorkerSnapshots | None = None
    if settings.multiprocess_dir:
        snapshots = _snapshots.get(reader)
        if snapshots is None:
            snapshots = _snapshots[reader] = WorkerSnapshots(settings.multiprocess_dir, reader)

    def render(accept: str | None) -> tuple[str, str]:
        content_type = prometheus.negotiate(accept)
        openmetrics = content_type == prometheus.OPENMETRICS_CONTENT_TYPE
        if snapshots is not None:
            return content_type, snapshots.render(openmetrics=openmetrics)
        return content_type, prometheus.render(reader.snapshot(), openmetrics=openmetrics)

    return render


def _serve_separately(settings: Settings, render: Any) -> None:
    """Serve /metrics on OTEL_EXPORTER_PROMETHEUS_HOST:PORT, once per process."""
    if _owned.metrics_server is None:
        try:
            _owned.metrics_server = prometheus.MetricsServer(
                settings.prometheus_host, settings.prometheus_port, render
            )
        except OSError as exc:
            logs.get_logger("otelkit").warning(
                "metrics_port_unavailable",
                host=settings.prometheus_host,
                port=settings.prometheus_port,
                error=str(exc),
            )


def run_bounded(work: Any, timeout: float) -> bool:
    """Run ``work()`` in a daemon thread; wait at most ``timeout`` seconds.

    A hung exporter (a blackholed collector) then costs the shutdown at most
    ``timeout``, and cannot keep the process from exiting.
    """
    thread = threading.Thread(target=work, name="otelkit-shutdown", daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def _flush_all(providers: tuple[Any, ...], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for snapshots in list(_snapshots.values()):
        snapshots.close()
    for provider in providers:
        force_flush = getattr(provider, "force_flush", None)
        left = deadline - time.monotonic()
        if force_flush is None or left <= 0:
            continue
        try:
            force_flush(int(left * 1000))
        except Exception as exc:  # a failing exporter must not fail the shutdown
            logs.get_logger("otelkit").warning("telemetry_flush_failed", error=str(exc))


def _flusher(tracers: Any, meters: Any, timeout: float) -> Any:
    async def on_shutdown() -> None:
        providers = (tracers, meters, _owned.logger_provider)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, run_bounded, lambda: _flush_all(providers, timeout), timeout
        )

    return on_shutdown


def _shutdown_owned_at_exit() -> None:
    shutdown(_owned.shutdown_timeout)


def _silence_native_fastapi_telemetry(app: Any) -> dict[str, Any] | None:
    """Turn FastAPI's own telemetry off for this app: otelkit makes the server span.

    FastAPI (0.16x and later) starts its own when global providers exist,
    outside every middleware, which would give each request two server spans
    and two duration histograms.
    """
    config = getattr(app, "_telemetry", None)
    if not isinstance(config, dict):
        return None
    before = dict(config)
    config.update(tracing=False, metrics=False, logs=False, auto_configure=False)
    return before


def _replace_contrib_instrumentation(app: Any) -> None:
    """Undo opentelemetry-instrumentation-fastapi on this app, and keep it off."""
    if getattr(app, "_is_instrumented_by_opentelemetry", False):
        try:
            from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        except ImportError:  # pragma: no cover - the flag comes from that package
            pass
        else:
            FastAPIInstrumentor.uninstrument_app(app)
    # instrument_app() skips apps carrying this flag, so a later call (or the
    # launcher's patched FastAPI class) adds no second server span.
    app._is_instrumented_by_opentelemetry = True


def uninstrument(app: Any) -> None:
    """Undo :func:`instrument` on ``app`` (the providers stay configured)."""
    with _lock:
        state: _AppState | None = getattr(app, _ATTRIBUTE, None)
        if state is None:
            return
        app.build_middleware_stack = state.original_build
        app.middleware_stack = None
        config = getattr(app, "_telemetry", None)
        if isinstance(config, dict) and state.telemetry_config is not None:
            config.update(state.telemetry_config)
        app._is_instrumented_by_opentelemetry = False
        delattr(app, _ATTRIBUTE)


def shutdown(timeout: float = 3.0) -> None:
    """Flush and shut down what otelkit created, within ``timeout`` seconds."""
    with _lock:
        if _owned.metrics_server is not None:
            _owned.metrics_server.close()
            _owned.metrics_server = None
        providers = [
            p
            for p in (_owned.tracer_provider, _owned.meter_provider, _owned.logger_provider)
            if p is not None
        ]
        _owned.tracer_provider = None
        _owned.meter_provider = None
        _owned.logger_provider = None
        logs.set_otlp_logger(None)
    for snapshots in list(_snapshots.values()):
        snapshots.close()
    if not providers:
        return
    deadline = time.monotonic() + timeout

    def stop() -> None:
        for provider in providers:
            left = max(0.0, deadline - time.monotonic())
            if isinstance(provider, MeterProvider):
                provider.shutdown(timeout_millis=int(left * 1000))
            else:  # TracerProvider.shutdown takes no timeout; SpanPipeline keeps its own
                provider.shutdown()

    run_bounded(stop, timeout)
