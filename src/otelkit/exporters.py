"""OTLP and console exporters, built from the resolved settings.

Nothing connects anywhere unless an OTLP endpoint is configured: the OTLP
exporter is the default of OTEL_TRACES_EXPORTER, but without
OTEL_EXPORTER_OTLP_ENDPOINT (or the per-signal variable) otelkit builds no
exporter at all rather than guessing ``localhost:4317``.
"""

from __future__ import annotations

from typing import Any, Literal

from otelkit.settings import Settings

__all__ = ["MissingDependencyError", "otlp_endpoint", "span_exporters"]

Signal = Literal["traces", "metrics", "logs"]


class MissingDependencyError(ImportError):
    """An optional part of otelkit was asked for but is not installed."""


def _require(extra: str, module: str) -> None:
    raise MissingDependencyError(
        f"otelkit: {module} is not installed; `pip install 'otelkit[{extra}]'` to use it",
    )


def otlp_endpoint(settings: Settings, signal: Signal) -> str | None:
    """The URL the OTLP exporter of ``signal`` sends to, or ``None``.

    A per-signal endpoint is used as given. The base endpoint gets the
    signal's path appended for http/protobuf (``/v1/traces``), as the
    specification says; gRPC uses it as is.
    """
    specific: str | None = getattr(settings, f"otlp_{signal}_endpoint")
    if specific is not None:
        return specific
    base: str | None = settings.otlp_endpoint
    if base is None:
        return None
    if settings.otlp_protocol == "grpc":
        return base
    return f"{base.rstrip('/')}/v1/{signal}"


def _otlp_kwargs(settings: Settings, signal: Signal) -> dict[str, Any]:
    endpoint = otlp_endpoint(settings, signal)
    kwargs: dict[str, Any] = {
        "endpoint": endpoint,
        "timeout": settings.otlp_timeout / 1000.0,
    }
    if settings.otlp_headers:
        kwargs["headers"] = dict(settings.otlp_headers)
    if settings.otlp_protocol == "grpc":
        kwargs["insecure"] = endpoint is not None and endpoint.startswith("http://")
    return kwargs


def otlp_span_exporter(settings: Settings) -> Any:
    """The OTLP span exporter for the configured protocol."""
    kwargs = _otlp_kwargs(settings, "traces")
    if settings.otlp_protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            _require("otlp", "opentelemetry-exporter-otlp-proto-grpc")
        return OTLPSpanExporter(**kwargs)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )
    except ImportError:
        _require("otlp", "opentelemetry-exporter-otlp-proto-http")
    return HttpSpanExporter(**kwargs)


def otlp_metric_exporter(settings: Settings) -> Any:
    """The OTLP metric exporter for the configured protocol and temporality."""
    from opentelemetry.sdk.metrics import (
        Counter,
        Histogram,
        ObservableCounter,
        ObservableGauge,
        ObservableUpDownCounter,
        UpDownCounter,
    )
    from opentelemetry.sdk.metrics.export import AggregationTemporality

    cumulative, delta = AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA
    preference: str = settings.metrics_temporality
    temporality = {
        Counter: cumulative if preference == "cumulative" else delta,
        Histogram: cumulative if preference == "cumulative" else delta,
        ObservableCounter: delta if preference == "delta" else cumulative,
        UpDownCounter: cumulative,
        ObservableUpDownCounter: cumulative,
        ObservableGauge: cumulative,
    }
    kwargs = _otlp_kwargs(settings, "metrics")
    kwargs["preferred_temporality"] = temporality
    if settings.otlp_protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        except ImportError:
            _require("otlp", "opentelemetry-exporter-otlp-proto-grpc")
        return OTLPMetricExporter(**kwargs)
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )
    except ImportError:
        _require("otlp", "opentelemetry-exporter-otlp-proto-http")
    return HttpMetricExporter(**kwargs)


def otlp_log_exporter(settings: Settings) -> Any:
    """The OTLP log exporter for the configured protocol."""
    kwargs = _otlp_kwargs(settings, "logs")
    if settings.otlp_protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        except ImportError:
            _require("otlp", "opentelemetry-exporter-otlp-proto-grpc")
        return OTLPLogExporter(**kwargs)
    try:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (
            OTLPLogExporter as HttpLogExporter,
        )
    except ImportError:
        _require("otlp", "opentelemetry-exporter-otlp-proto-http")
    return HttpLogExporter(**kwargs)


def span_exporters(settings: Settings) -> list[Any]:
    """Every span exporter OTEL_TRACES_EXPORTER asks for that can work here."""
    exporters: list[Any] = []
    for name in settings.traces_exporter:
        if name == "otlp" and otlp_endpoint(settings, "traces") is not None:
            exporters.append(otlp_span_exporter(settings))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
    return exporters
