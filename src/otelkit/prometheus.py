"""Prometheus exposition of OpenTelemetry metrics, with exemplars.

:class:`PrometheusReader` is a pull reader: a scrape collects the meter
provider and renders the result in the Prometheus text format (0.0.4), or in
OpenMetrics 1.0 when the scraper asks for it, which is the format that
carries exemplars (the trace id of a sampled request on its latency bucket).

Names follow the OpenTelemetry-to-Prometheus conventions: dots become
underscores, a unit suffix is added (``_seconds`` for ``s``), counters end in
``_total``. Scope labels (``otel_scope_name`` and friends) are not added: they
help nobody on an application's own metrics and multiply series. The
resource is exposed once, as ``target_info``.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics import _Gauge as SyncGauge
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = [
    "OPENMETRICS_CONTENT_TYPE",
    "TEXT_CONTENT_TYPE",
    "PrometheusReader",
    "negotiate",
    "render",
]

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_UNITS = {
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "min": "minutes",
    "h": "hours",
    "d": "days",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "GiBy": "gibibytes",
    "KBy": "kilobytes",
    "MBy": "megabytes",
    "GBy": "gigabytes",
    "m": "meters",
    "V": "volts",
    "A": "amperes",
    "J": "joules",
    "W": "watts",
    "g": "grams",
    "Cel": "celsius",
    "Hz": "hertz",
    "%": "percent",
}

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")
_MULTIPLE_UNDERSCORES = re.compile(r"__+")


def negotiate(accept: str | None) -> str:
    """The content type to answer a scrape whose Accept header is ``accept``."""
    if accept and "application/openmetrics-text" in accept:
        return OPENMETRICS_CONTENT_TYPE
    return TEXT_CONTENT_TYPE


def metric_name(name: str, unit: str, *, counter: bool) -> str:
    """The Prometheus name of an OpenTelemetry instrument (without ``_total``)."""
    prom = _INVALID_NAME.sub("_", name)
    if prom[:1].isdigit():
        prom = "_" + prom
    unit_word = _unit_word(unit)
    if unit_word and not prom.endswith("_" + unit_word):
        prom = f"{prom}_{unit_word}"
    if counter and prom.endswith("_total"):
        prom = prom[: -len("_total")]
    return _MULTIPLE_UNDERSCORES.sub("_", prom).strip("_") or "_"


def _unit_word(unit: str) -> str:
    if not unit or unit.startswith("{"):
        return ""
    if "/" in unit:
        numerator, _, denominator = unit.partition("/")
        first = _UNITS.get(numerator, _INVALID_LABEL.sub("_", numerator)) if numerator else ""
        per = {"s": "second", "m": "minute", "h": "hour", "d": "day"}.get(denominator, denominator)
        return f"{first}_per_{_INVALID_LABEL.sub('_', per)}".strip("_")
    return _UNITS.get(unit, _INVALID_LABEL.sub("_", unit))


def label_name(key: str) -> str:
    """A valid Prometheus label name for an attribute key."""
    name = _INVALID_LABEL.sub("_", key)
    if name[:1].isdigit():
        name = "key_" + name
    if name.startswith("__") and not key.startswith("__"):
        name = name.lstrip("_") or "_"
    return name


def _escape_value(value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list | tuple):
        text = "[" + ",".join(str(v) for v in value) + "]"
    else:
        text = str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _labels(pairs: Iterable[tuple[str, object]]) -> str:
    body = ",".join(f'{name}="{_escape_value(value)}"' for name, value in pairs)
    return "{" + body + "}" if body else ""


@dataclass(slots=True)
class Sample:
    """One series of a family: its labels and its value.

    For histograms ``value`` is the count, and ``buckets`` (per-bucket counts,
    one more than ``bounds``), ``bounds`` and ``total`` (the sum) are set.
    ``exemplars`` holds ``(bucket index, trace_id, span_id, value, unix time)``.
    """

    labels: dict[str, Any]
    value: float
    bounds: tuple[float, ...] = ()
    buckets: list[int] = field(default_factory=list)
    total: float = 0.0
    exemplars: list[tuple[int, str, str, float, float]] = field(default_factory=list)


@dataclass(slots=True)
class Family:
    """A metric family as Prometheus sees it: name, type, help and series."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    samples: list[Sample] = field(default_factory=list)
    # Whether series add up across processes: true for sums (up-down
    # counters are gauges that add), false for last-value gauges.
    additive: bool = True


def _exemplars_of(point: HistogramDataPoint) -> list[tuple[int, str, str, float, float]]:
    result = []
    bounds = point.explicit_bounds
    for exemplar in point.exemplars or ():
        if not exemplar.trace_id:
            continue
        index = next((i for i, bound in enumerate(bounds) if exemplar.value <= bound), len(bounds))
        result.append(
            (
                index,
                format(exemplar.trace_id, "032x"),
                format(exemplar.span_id or 0, "016x"),
                float(exemplar.value),
                exemplar.time_unix_nano / 1e9,
            )
        )
    return result


def families_from(data: MetricsData | None) -> tuple[dict[str, Any], list[Family]]:
    """Turn what a reader collected into ``(resource attributes, families)``."""
    families: dict[str, Family] = {}
    resource: dict[str, Any] = {}

    def family(name: str, kind: str, help_text: str) -> Family | None:
        existing = families.get(name)
        if existing is None:
            existing = families[name] = Family(name, kind, help_text)
        elif existing.kind != kind:
            return None  # two instruments of different kinds under one name: keep the first
        return existing

    for resource_metrics in data.resource_metrics if data is not None else ():
        if not resource:
            resource = dict(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                point_data = metric.data
                description = metric.description or ""
                if isinstance(point_data, Sum):
                    counter = point_data.is_monotonic and (
                        point_data.aggregation_temporality == AggregationTemporality.CUMULATIVE
                    )
                    name = metric_name(metric.name, metric.unit or "", counter=counter)
                    fam = family(name, "counter" if counter else "gauge", description)
                    if fam is not None:
                        fam.samples.extend(
                            Sample(dict(p.attributes or {}), p.value)
                            for p in point_data.data_points
                        )
                elif isinstance(point_data, Gauge):
                    name = metric_name(metric.name, metric.unit or "", counter=False)
                    fam = family(name, "gauge", description)
                    if fam is not None:
                        fam.additive = False
                        fam.samples.extend(
                            Sample(dict(p.attributes or {}), p.value)
                            for p in point_data.data_points
                        )
                elif isinstance(point_data, HistogramData):
                    name = metric_name(metric.name, metric.unit or "", counter=False)
                    fam = family(name, "histogram", description)
                    if fam is not None:
                        fam.samples.extend(
                            Sample(
                                dict(p.attributes or {}),
                                p.count,
                                tuple(p.explicit_bounds),
                                list(p.bucket_counts),
                                p.sum,
                                _exemplars_of(p),
                            )
                            for p in point_data.data_points
                        )
    return resource, list(families.values())


def _attribute_pairs(attributes: Mapping[str, Any]) -> list[tuple[str, object]]:
    merged: dict[str, list[str]] = {}
    for key, value in attributes.items():
        merged.setdefault(label_name(key), []).append(_escape_value(value))
    # Two keys that sanitize to one name (a.b and a_b) are joined with ';',
    # as the OpenTelemetry compatibility specification says.
    return [(name, ";".join(sorted(values))) for name, values in sorted(merged.items())]


def _histogram_lines(name: str, sample: Sample, openmetrics: bool) -> Iterator[str]:
    pairs = _attribute_pairs(sample.labels)
    exemplars: dict[int, tuple[int, str, str, float, float]] = {}
    if openmetrics:
        for exemplar in sample.exemplars:
            if exemplar[0] not in exemplars or exemplar[4] >= exemplars[exemplar[0]][4]:
                exemplars[exemplar[0]] = exemplar
    cumulative = 0
    for index, (bound, count) in enumerate(
        zip([*sample.bounds, math.inf], sample.buckets, strict=True)
    ):
        cumulative += count
        le = "+Inf" if math.isinf(bound) else _number(float(bound))
        line = f"{name}_bucket{_labels([*pairs, ('le', le)])} {cumulative}"
        if index in exemplars:
            _, trace_id, span_id, value, timestamp = exemplars[index]
            ids = _labels([("trace_id", trace_id), ("span_id", span_id)])
            line += f" # {ids} {_number(value)} {timestamp:.3f}"
        yield line
    labels = _labels(pairs)
    yield f"{name}_sum{labels} {_number(sample.total)}"
    yield f"{name}_count{labels} {int(sample.value)}"


def render_families(
    resource: Mapping[str, Any], families: Iterable[Family], *, openmetrics: bool
) -> str:
    """Render families as Prometheus text (0.0.4) or OpenMetrics 1.0."""
    lines: list[str] = []
    if resource:
        if openmetrics:
            lines += ["# TYPE target info", "# HELP target Target metadata"]
        else:
            lines += ["# HELP target_info Target metadata", "# TYPE target_info gauge"]
        lines.append(f"target_info{_labels(_attribute_pairs(resource))} 1")
    for fam in families:
        if not fam.samples:
            continue
        type_name = fam.name if openmetrics or fam.kind != "counter" else fam.name + "_total"
        if fam.help:
            lines.append(f"# HELP {type_name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {type_name} {fam.kind}")
        for sample in fam.samples:
            if fam.kind == "histogram":
                lines.extend(_histogram_lines(fam.name, sample, openmetrics))
            else:
                suffix = "_total" if fam.kind == "counter" else ""
                labels = _labels(_attribute_pairs(sample.labels))
                lines.append(f"{fam.name}{suffix}{labels} {_number(sample.value)}")
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def render(data: MetricsData | None, *, openmetrics: bool) -> str:
    """Render what a reader collected as Prometheus text or OpenMetrics."""
    resource, families = families_from(data)
    return render_families(resource, families, openmetrics=openmetrics)


def with_produced(
    data: MetricsData | None, producers: Iterable[Callable[[], list[Metric]]]
) -> MetricsData | None:
    """``data`` plus the producers' metrics, under otelkit's scope, same resource."""
    extra = [metric for producer in producers for metric in producer()]
    if not extra or data is None or not data.resource_metrics:
        return data
    first, *rest = data.resource_metrics
    scope = ScopeMetrics(InstrumentationScope("otelkit"), extra, "")
    return MetricsData(
        [ResourceMetrics(first.resource, [*first.scope_metrics, scope], first.schema_url), *rest]
    )


class PrometheusReader(MetricReader):
    """A pull reader: collects when scraped, keeps nothing between scrapes.

    Cumulative temporality for every instrument, as Prometheus expects.
    """

    def __init__(self) -> None:
        cumulative = AggregationTemporality.CUMULATIVE
        super().__init__(
            preferred_temporality={
                Counter: cumulative,
                UpDownCounter: cumulative,
                Histogram: cumulative,
                ObservableCounter: cumulative,
                ObservableUpDownCounter: cumulative,
                ObservableGauge: cumulative,
                SyncGauge: cumulative,
            },
        )
        self._lock = threading.Lock()
        self._latest: MetricsData | None = None
        # Functions returning metrics to add to every collection: the HTTP
        # histograms, which otelkit aggregates itself (see HttpMetrics).
        self.producers: list[Callable[[], list[Metric]]] = []

    def _receive_metrics(
        self,
        metrics_data: MetricsData,
        timeout_millis: float = 10_000,
        **kwargs: Any,
    ) -> None:
        self._latest = metrics_data

    def snapshot(self) -> MetricsData | None:
        """Collect now and return what the meter provider holds (and the producers)."""
        with self._lock:
            self._latest = None
            self.collect()
            return with_produced(self._latest, self.producers)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Nothing to release: the reader holds no thread or connection."""


class MetricsServer:
    """Serves ``/metrics`` on its own host and port, in a daemon thread."""

    def __init__(self, host: str, port: int, render_for: Any) -> None:
        self._render_for = render_for

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in {"/metrics", "/"}:
                    self.send_error(404)
                    return
                content_type, body = outer._render_for(self.headers.get("Accept"))
                payload = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                """Scrapes are not worth a log line each."""

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otelkit-metrics", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        """The port actually bound (useful when 0 was asked)."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
