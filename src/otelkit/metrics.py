"""HTTP and business metrics, recorded through OpenTelemetry meters.

Business metrics are declared once, with the label names they may carry,
and recorded anywhere::

    models_created = otelkit.counter("models_created", "Total 3D models created",
                                     labels=("model_type",))
    models_created.add(1, model_type="cadquery")
    # Prometheus: models_created_total{model_type="cadquery"} 1

A label that was not declared is an error in development (``environment``
``development`` or ``test``, and under :mod:`otelkit.testing`); elsewhere it
is dropped, with a rate-limited warning, so a typo can never create a series
per request.
"""

from __future__ import annotations

import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import AggregationTemporality, HistogramDataPoint, Metric
from opentelemetry.sdk.metrics.export import Histogram as HistogramData

__all__ = [
    "DURATION_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "HttpMetrics",
    "UpDownCounter",
    "counter",
    "gauge",
    "histogram",
    "up_down_counter",
]

# Seconds. OTel's default boundaries (0, 5, 10, 25, ... 10000) suit
# milliseconds; these are the semantic conventions' advice for http durations.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)

APP_METER_NAME = "otelkit.app"
HTTP_METER_NAME = "otelkit"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_strict = False


def set_strict(strict: bool) -> None:
    """Make an undeclared label raise (development) or be dropped (production)."""
    global _strict
    _strict = strict


class _RateLimitedWarning:
    """At most one warning per key per interval, so bad calls cannot flood the log."""

    __slots__ = ("_interval", "_last", "_lock")

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, event: str, **fields: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                return
            self._last[key] = now
        from otelkit.logs import get_logger

        get_logger("otelkit").warning(event, **fields)


warn_once_per_minute = _RateLimitedWarning()


class _Declared:
    """Common part of the business instruments: name checks and label checks."""

    __slots__ = ("_instrument", "_labels", "description", "name", "unit")
    kind = ""

    def __init__(self, name: str, description: str, unit: str, labels: Iterable[str]) -> None:
        if not _NAME.fullmatch(name) or len(name) > 255:
            raise ValueError(
                f"metric name {name!r} is invalid: use letters, digits, _ and ., "
                "starting with a letter or _",
            )
        self.name = name
        self.description = description
        self.unit = unit
        self._labels = frozenset(labels)
        for label in self._labels:
            if not _LABEL.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"label name {label!r} of metric {name!r} is invalid")
        self._instrument: Any = None

    @property
    def labels(self) -> frozenset[str]:
        """The label names this metric accepts."""
        return self._labels

    def _attributes(self, labels: dict[str, Any]) -> dict[str, Any]:
        if labels.keys() <= self._labels:
            return labels
        unknown = sorted(labels.keys() - self._labels)
        if _strict:
            raise ValueError(
                f"metric {self.name!r} got undeclared label(s) {', '.join(unknown)}; "
                f"declared: {', '.join(sorted(self._labels)) or 'none'}",
            )
        warn_once_per_minute(
            f"label:{self.name}",
            "metric_label_dropped",
            metric=self.name,
            labels=unknown,
            declared=sorted(self._labels),
        )
        return {key: value for key, value in labels.items() if key in self._labels}

    def _bind(self, meter: Meter) -> None:
        raise NotImplementedError


class Counter(_Declared):
    """A monotonic counter; Prometheus shows it as ``<name>_total``."""

    __slots__ = ()
    kind = "counter"

    def _bind(self, meter: Meter) -> None:
        self._instrument = meter.create_counter(self.name, self.unit, self.description)

    def add(self, amount: float = 1, **labels: Any) -> None:
        """Add ``amount`` (>= 0) to the series named by ``labels``."""
        if amount < 0:
            raise ValueError(f"counter {self.name!r} cannot decrease (got {amount})")
        self._instrument.add(amount, self._attributes(labels))


class UpDownCounter(_Declared):
    """A sum that can go down (queue length, items in flight)."""

    __slots__ = ()
    kind = "up_down_counter"

    def _bind(self, meter: Meter) -> None:
        self._instrument = meter.create_up_down_counter(self.name, self.unit, self.description)

    def add(self, amount: float, **labels: Any) -> None:
        """Add ``amount`` (negative to subtract) to the series named by ``labels``."""
        self._instrument.add(amount, self._attributes(labels))


class Histogram(_Declared):
    """A distribution (durations, sizes), with explicit bucket boundaries."""

    __slots__ = ("buckets",)
    kind = "histogram"

    def __init__(
        self,
        name: str,
        description: str,
        unit: str,
        labels: Iterable[str],
        buckets: Sequence[float] | None,
    ) -> None:
        super().__init__(name, description, unit, labels)
        if buckets is not None and list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets of histogram {name!r} must be increasing")
        self.buckets = tuple(buckets) if buckets is not None else None

    def _bind(self, meter: Meter) -> None:
        self._instrument = meter.create_histogram(
            self.name,
            self.unit,
            self.description,
            explicit_bucket_boundaries_advisory=self.buckets,
        )

    def record(self, value: float, **labels: Any) -> None:
        """Record one observation in the series named by ``labels``."""
        self._instrument.record(value, self._attributes(labels))


class Gauge(_Declared):
    """The last value set (temperature, pool size)."""

    __slots__ = ()
    kind = "gauge"

    def _bind(self, meter: Meter) -> None:
        self._instrument = meter.create_gauge(self.name, self.unit, self.description)

    def set(self, value: float, **labels: Any) -> None:
        """Set the series named by ``labels`` to ``value``."""
        self._instrument.set(value, self._attributes(labels))


_declared: dict[str, _Declared] = {}
_declared_lock = threading.Lock()


def _declare(metric: _Declared) -> Any:
    with _declared_lock:
        existing = _declared.get(metric.name)
        if existing is not None:
            if (
                type(existing) is not type(metric)
                or existing.labels != metric.labels
                or existing.unit != metric.unit
            ):
                raise ValueError(
                    f"metric {metric.name!r} is already declared as a {existing.kind} "
                    f"with labels {sorted(existing.labels)} and unit {existing.unit!r}",
                )
            return existing
        metric._bind(_app_meter())
        _declared[metric.name] = metric
        return metric


_bound_provider: MeterProvider | None = None


def _app_meter() -> Meter:
    if _bound_provider is not None:
        return _bound_provider.get_meter(APP_METER_NAME)
    # The global meter provider may not be set yet (declarations run at
    # import time); the API's proxy meter binds to it once it is.
    return metrics.get_meter(APP_METER_NAME)


def bind_declared(provider: MeterProvider | None) -> None:
    """Record business metrics into ``provider`` (``None``: the global one).

    :func:`otelkit.instrument` calls this with the provider it uses, so that
    metrics declared at import time follow an injected provider too.
    """
    global _bound_provider
    with _declared_lock:
        if provider is _bound_provider:
            return
        _bound_provider = provider
        for metric in _declared.values():
            metric._bind(_app_meter())


def counter(
    name: str, description: str = "", *, unit: str = "", labels: Iterable[str] = ()
) -> Counter:
    """Declare a counter. Declaring the same name again returns the same counter.

    Example:
        >>> models_created = counter("models_created", "Total 3D models created",
        ...                          labels=("model_type",))
        >>> models_created.add(1, model_type="cadquery")
    """
    result: Counter = _declare(Counter(name, description, unit, labels))
    return result


def up_down_counter(
    name: str, description: str = "", *, unit: str = "", labels: Iterable[str] = ()
) -> UpDownCounter:
    """Declare an up-down counter (a sum that can decrease)."""
    result: UpDownCounter = _declare(UpDownCounter(name, description, unit, labels))
    return result


def histogram(
    name: str,
    description: str = "",
    *,
    unit: str = "",
    labels: Iterable[str] = (),
    buckets: Sequence[float] | None = None,
) -> Histogram:
    """Declare a histogram; ``buckets`` are the upper bounds, in ``unit``.

    Example:
        >>> solve_time = histogram("solver_duration", "Solver time", unit="s",
        ...                        labels=("simulation_type",), buckets=(0.1, 1, 10, 60))
        >>> solve_time.record(2.4, simulation_type="structural")
    """
    result: Histogram = _declare(Histogram(name, description, unit, labels, buckets))
    return result


def gauge(name: str, description: str = "", *, unit: str = "", labels: Iterable[str] = ()) -> Gauge:
    """Declare a gauge (last value wins)."""
    result: Gauge = _declare(Gauge(name, description, unit, labels))
    return result


def _reset_declarations() -> None:
    """Forget every declared metric (tests only)."""
    with _declared_lock:
        _declared.clear()


# ---------------------------------------------------------------------------
# HTTP metrics, recorded by the middleware.


class InFlight:
    """The requests being served, counted when a scrape asks.

    The route of a request is known only once the router has run, so the
    in-progress gauge cannot be an up-down counter keyed by route at request
    start. Instead each request registers itself here (a set insertion) and
    the observable gauge reads the routes at collection time.
    """

    __slots__ = ("_active", "_resolve", "_seen")

    def __init__(self, resolve: Callable[[Any], tuple[str, str, str]]) -> None:
        self._active: set[Any] = set()
        self._resolve = resolve
        # Series once seen keep reporting (0 when idle) rather than vanishing,
        # so `http_requests_in_progress` reads 0, not "no data", between bursts.
        self._seen: dict[tuple[str, str, str], int] = {}

    def add(self, request: Any) -> None:
        self._active.add(request)

    def seen(self, key: tuple[str, str, str]) -> None:
        """Report ``key`` (0 when idle) from now on, once a request has used it."""
        if len(self._seen) < 10_000:
            self._seen.setdefault(key, 0)

    def discard(self, request: Any) -> None:
        self._active.discard(request)

    def counts(self) -> dict[tuple[str, str, str], int]:
        """``{(method, endpoint, scheme): n}`` over the requests now in flight."""
        result = dict.fromkeys(self._seen, 0)
        for request in tuple(self._active):
            key = self._resolve(request)
            result[key] = result.get(key, 0) + 1
        if len(self._seen) < 10_000:
            self._seen.update(dict.fromkeys(result, 0))
        return result


def _observe_dropped(options: CallbackOptions) -> Iterable[Observation]:
    from otelkit._pipeline import DROPPED

    return [Observation(count, {"signal": signal}) for signal, count in DROPPED.items()]


_BOUNDS = list(DURATION_BUCKETS)


def semconv_attributes(
    method: str, route: str | None, status: int, scheme: str, error_type: str | None
) -> dict[str, Any]:
    """The attributes of ``http.server.request.duration`` for one kind of request."""
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "http.response.status_code": status,
        "url.scheme": scheme,
    }
    if route is not None:
        attributes["http.route"] = route
    if error_type is not None:
        attributes["error.type"] = error_type
    return attributes


_MAX_SERIES = 10_000
OVERFLOW = "<overflow>"


class _Series:
    """The latency distribution of one (method, route, status, scheme, error) key."""

    __slots__ = ("buckets", "exemplars", "maximum", "minimum", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_BOUNDS) + 1)
        self.total = 0.0
        self.minimum = float("inf")
        self.maximum = 0.0
        # The latest sampled request of each bucket: (trace_id, span_id, value, time_ns).
        self.exemplars: list[tuple[int, int, float, int] | None] = [None] * (len(_BOUNDS) + 1)


class HttpMetrics:
    """The HTTP metrics: one dictionary update per request, everything else at collection.

    Recording through the SDK's synchronous instruments costs about 5 µs per
    call (attribute cleaning and hashing, exemplar reservoirs, locks), and a
    request needs three or four of them. Instead the middleware adds each
    request to one latency distribution per (method, route, status, scheme,
    error type); at collection time that one aggregation yields:

    - ``http_requests_total`` (counts by method, endpoint, status),
      ``errors_total``, ``exceptions_total``, ``http_requests_in_progress`` and
      ``http.server.active_requests``: observable instruments on the meter
      provider, so every reader of it sees them;
    - ``http_request_duration_seconds`` and ``http.server.request.duration``:
      histograms with exemplars, which the SDK cannot take pre-aggregated
      (Python has no asynchronous histogram nor MetricProducer), so otelkit
      adds them to the collections of its own readers (Prometheus, OTLP):
      see :meth:`histograms`.
    """

    __slots__ = (
        "_duration",
        "_errors",
        "_exceptions",
        "_lock",
        "_semconv",
        "_semconv_duration",
        "_series",
        "_start_ns",
        "in_flight",
        "produced",
    )

    def __init__(
        self,
        provider: MeterProvider,
        in_flight: InFlight,
        *,
        semconv: bool,
        version: str = "",
        produced: bool = True,
    ) -> None:
        meter = provider.get_meter(HTTP_METER_NAME, version)
        self.in_flight = in_flight
        self._semconv = semconv
        # Whether otelkit feeds the histograms to every reader of the provider
        # itself (it knows them all); otherwise they go through the SDK.
        self.produced = produced
        self._duration: Any = None
        self._semconv_duration: Any = None
        if not produced:
            self._duration = meter.create_histogram(
                "http_request_duration",
                "s",
                "HTTP request latency in seconds",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
            if semconv:
                self._semconv_duration = meter.create_histogram(
                    "http.server.request.duration",
                    "s",
                    "Duration of HTTP server requests.",
                    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
                )
        self._series: dict[tuple[str, str, str | None, int, str, str | None], _Series] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._exceptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._start_ns = time.time_ns()
        meter.create_observable_counter(
            "http_requests", [self._observe_requests], "", "Total HTTP requests"
        )
        meter.create_observable_counter(
            "errors",
            [self._observe_errors],
            "",
            "Total errors by type: client_error, server_error, exception",
        )
        meter.create_observable_counter(
            "exceptions", [self._observe_exceptions], "", "Total unhandled exceptions by type"
        )
        meter.create_observable_up_down_counter(
            "http_requests_in_progress",
            [self._observe_in_progress],
            "",
            "HTTP requests being processed",
        )
        if semconv:
            meter.create_observable_up_down_counter(
                "http.server.active_requests",
                [self._observe_active],
                "{request}",
                "Number of active HTTP server requests.",
            )
        meter.create_observable_counter(
            "otelkit_exporter_dropped",
            [_observe_dropped],
            "",
            "Telemetry items otelkit could not deliver (queue full or export failed)",
        )

    # -- the request path --------------------------------------------------

    def record(
        self,
        method: str,
        endpoint: str,
        route: str | None,
        status: int,
        scheme: str,
        duration: float,
        error_type: str | None,
        exception_type: str | None,
        exemplar: tuple[int, int, float, int] | None,
    ) -> None:
        """Add one finished request (``exemplar``: its sampled trace, if any)."""
        key = (method, endpoint, route, status, scheme, error_type)
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key)
        index = bisect_left(_BOUNDS, duration)
        series.buckets[index] += 1
        series.total += duration
        series.minimum = min(series.minimum, duration)
        series.maximum = max(series.maximum, duration)
        if exemplar is not None:
            series.exemplars[index] = exemplar
        if self._duration is not None:
            self._record_through_sdk(method, endpoint, route, status, scheme, duration, error_type)
        if exception_type is not None:
            self.record_exception(exception_type, endpoint)
        elif status >= 400:
            kind = "server_error" if status >= 500 else "client_error"
            errors = self._errors
            errors[kind, endpoint] = errors.get((kind, endpoint), 0) + 1

    def _record_through_sdk(
        self,
        method: str,
        endpoint: str,
        route: str | None,
        status: int,
        scheme: str,
        duration: float,
        error_type: str | None,
    ) -> None:
        self._duration.record(duration, {"method": method, "endpoint": endpoint})
        if self._semconv_duration is not None:
            self._semconv_duration.record(
                duration, semconv_attributes(method, route, status, scheme, error_type)
            )

    def _new_series(self, key: tuple[str, str, str | None, int, str, str | None]) -> _Series:
        with self._lock:
            if len(self._series) >= _MAX_SERIES:
                # A bug that invents statuses or error types cannot grow memory
                # or the scrape without bound.
                key = ("_OTHER", OVERFLOW, None, 0, key[4], None)
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series()
            self.in_flight.seen((key[0], key[1], key[4]))
            return series

    def record_exception(self, exception_type: str, endpoint: str | None) -> None:
        """Count an unhandled exception (also one raised after its response was sent)."""
        endpoint = endpoint or "<unmatched>"
        with self._lock:
            if len(self._exceptions) < 1000 or exception_type in self._exceptions:
                self._exceptions[exception_type] = self._exceptions.get(exception_type, 0) + 1
            key = ("exception", endpoint)
            self._errors[key] = self._errors.get(key, 0) + 1

    # -- collection --------------------------------------------------------

    def _observe_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[tuple[str, str, int], int] = {}
        for (method, endpoint, _, status, _, _), series in list(self._series.items()):
            key = (method, endpoint, status)
            totals[key] = totals.get(key, 0) + sum(series.buckets)
        return [
            Observation(n, {"method": m, "endpoint": e, "status": str(s)})
            for (m, e, s), n in totals.items()
        ]

    def _observe_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"error_type": kind, "endpoint": endpoint})
            for (kind, endpoint), n in list(self._errors.items())
        ]

    def _observe_exceptions(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"exception_type": name}) for name, n in list(self._exceptions.items())
        ]

    def _observe_in_progress(self, options: CallbackOptions) -> Iterable[Observation]:
        counts = self.in_flight.counts()
        return [
            Observation(n, {"method": method, "endpoint": endpoint})
            for (method, endpoint, _scheme), n in counts.items()
        ]

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[tuple[str, str], int] = {}
        for (method, _endpoint, scheme), n in self.in_flight.counts().items():
            totals[method, scheme] = totals.get((method, scheme), 0) + n
        return [
            Observation(n, {"http.request.method": method, "url.scheme": scheme})
            for (method, scheme), n in totals.items()
        ]

    def histograms(self) -> list[Metric]:
        """The duration histograms, cumulative, as the SDK's readers would collect them."""
        if not self.produced:
            return []
        now = time.time_ns()
        own: dict[tuple[str, str], list[Any]] = {}
        semconv: list[HistogramDataPoint] = []
        for (method, endpoint, route, status, scheme, error), series in list(self._series.items()):
            buckets = list(series.buckets)
            count = sum(buckets)
            exemplars = [
                Exemplar({}, value, at, span_id, trace_id)
                for entry in list(series.exemplars)
                if entry is not None
                for trace_id, span_id, value, at in (entry,)
            ]
            merged = own.get((method, endpoint))
            if merged is None:
                own[method, endpoint] = [
                    buckets,
                    series.total,
                    count,
                    series.minimum,
                    series.maximum,
                    exemplars,
                ]
            else:
                merged[0] = [a + b for a, b in zip(merged[0], buckets, strict=True)]
                merged[1] += series.total
                merged[2] += count
                merged[3] = min(merged[3], series.minimum)
                merged[4] = max(merged[4], series.maximum)
                merged[5] = merged[5] + exemplars
            if self._semconv:
                semconv.append(
                    HistogramDataPoint(
                        semconv_attributes(method, route, status, scheme, error),
                        self._start_ns,
                        now,
                        count,
                        series.total,
                        buckets,
                        _BOUNDS,
                        series.minimum,
                        series.maximum,
                        exemplars,
                    )
                )
        cumulative = AggregationTemporality.CUMULATIVE
        result = [
            Metric(
                "http_request_duration",
                "HTTP request latency in seconds",
                "s",
                HistogramData(
                    [
                        HistogramDataPoint(
                            {"method": method, "endpoint": endpoint},
                            self._start_ns,
                            now,
                            count,
                            total,
                            buckets,
                            _BOUNDS,
                            low,
                            high,
                            exemplars,
                        )
                        for (method, endpoint), (
                            buckets,
                            total,
                            count,
                            low,
                            high,
                            exemplars,
                        ) in own.items()
                    ],
                    cumulative,
                ),
            )
        ]
        if self._semconv:
            result.append(
                Metric(
                    "http.server.request.duration",
                    "Duration of HTTP server requests.",
                    "s",
                    HistogramData(semconv, cumulative),
                )
            )
        return result
