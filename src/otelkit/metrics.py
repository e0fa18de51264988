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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

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


class HttpMetrics:
    """The HTTP instruments, created once from one meter provider."""

    __slots__ = (
        "_attribute_cache",
        "_duration",
        "_errors",
        "_exceptions",
        "_requests",
        "_semconv_duration",
        "in_flight",
    )

    def __init__(
        self,
        provider: MeterProvider,
        in_flight: InFlight,
        *,
        semconv: bool,
        version: str = "",
    ) -> None:
        meter = provider.get_meter(HTTP_METER_NAME, version)
        self.in_flight = in_flight
        self._requests = meter.create_counter("http_requests", "", "Total HTTP requests")
        self._duration = meter.create_histogram(
            "http_request_duration",
            "s",
            "HTTP request latency in seconds",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._errors = meter.create_counter(
            "errors", "", "Total errors by type: client_error, server_error, exception"
        )
        self._exceptions = meter.create_counter(
            "exceptions", "", "Total unhandled exceptions by type"
        )
        meter.create_observable_up_down_counter(
            "http_requests_in_progress",
            [self._observe_in_progress],
            "",
            "HTTP requests being processed",
        )
        self._semconv_duration = None
        if semconv:
            self._semconv_duration = meter.create_histogram(
                "http.server.request.duration",
                "s",
                "Duration of HTTP server requests.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
            meter.create_observable_up_down_counter(
                "http.server.active_requests",
                [self._observe_active],
                "{request}",
                "Number of active HTTP server requests.",
            )
        self._attribute_cache: dict[tuple[str, str, int, str | None], tuple[Any, ...]] = {}
        meter.create_observable_counter(
            "otelkit_exporter_dropped",
            [_observe_dropped],
            "",
            "Telemetry items otelkit could not deliver (queue full or export failed)",
        )

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

    def _attributes(
        self,
        method: str,
        endpoint: str,
        route: str | None,
        status: int,
        scheme: str,
        error_type: str | None,
    ) -> tuple[Any, ...]:
        key = (method, endpoint, status, error_type)
        cached = self._attribute_cache.get(key)
        if cached is None or cached[3] != scheme:
            semconv: dict[str, Any] = {
                "http.request.method": method,
                "http.response.status_code": status,
                "url.scheme": scheme,
            }
            if route is not None:
                semconv["http.route"] = route
            if error_type is not None:
                semconv["error.type"] = error_type
            cached = (
                {"method": method, "endpoint": endpoint, "status": str(status)},
                {"method": method, "endpoint": endpoint},
                semconv,
                scheme,
            )
            # Keys are bounded (known methods x route templates x statuses),
            # but a buggy app could still invent statuses; bound the cache.
            if len(self._attribute_cache) < 10_000:
                self._attribute_cache[key] = cached
            self.in_flight.seen((method, endpoint, scheme))
        return cached

    def record(
        self,
        *,
        method: str,
        endpoint: str,
        route: str | None,
        status: int,
        scheme: str,
        duration: float,
        error_type: str | None,
        exception_type: str | None,
    ) -> None:
        """Record one finished request. Call while its span is current (exemplars)."""
        requests, durations, semconv, _ = self._attributes(
            method, endpoint, route, status, scheme, error_type
        )
        self._requests.add(1, requests)
        self._duration.record(duration, durations)
        if self._semconv_duration is not None:
            self._semconv_duration.record(duration, semconv)
        if exception_type is not None:
            self._errors.add(1, {"error_type": "exception", "endpoint": endpoint})
            self._exceptions.add(1, {"exception_type": exception_type})
        elif status >= 500:
            self._errors.add(1, {"error_type": "server_error", "endpoint": endpoint})
        elif status >= 400:
            self._errors.add(1, {"error_type": "client_error", "endpoint": endpoint})

    def record_exception(self, exception_type: str, route: str | None) -> None:
        """Count an exception raised after its request's response was complete."""
        self._errors.add(1, {"error_type": "exception", "endpoint": route or "<unmatched>"})
        self._exceptions.add(1, {"exception_type": exception_type})
