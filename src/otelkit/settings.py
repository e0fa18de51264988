"""Every otelkit setting, in one table.

A setting resolves from an explicit argument, then its environment variable,
then its default. Standard ``OTEL_*`` variables are used wherever the
OpenTelemetry specification defines one; ``OTELKIT_*`` variables exist only
where it does not. The documentation's configuration reference is tested
against :data:`SETTINGS`, so the two cannot drift.

Bad values fail at start-up with :class:`ConfigurationError`, whose message
names the setting, the variable, the value and what would be accepted.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

__all__ = [
    "SETTINGS",
    "ConfigurationError",
    "Resolution",
    "Setting",
    "Settings",
    "inspect_settings",
    "resolve_settings",
]

Source = Literal["argument", "environment", "default"]


class ConfigurationError(ValueError):
    """A setting has a value otelkit cannot use.

    The message names the setting, where the value came from, the value and
    what would have been accepted, so that it can be fixed without reading
    otelkit's source.
    """


def _fail(setting: Setting, raw: object, source: Source, accepted: str) -> ConfigurationError:
    where = f"environment variable {setting.env}" if source == "environment" else "argument"
    if source == "environment" or setting.env is None:
        name = setting.env if source == "environment" else setting.name
    else:
        name = f"{setting.name} (or {setting.env})"
    if setting.name == "otlp_headers" and isinstance(raw, str):
        # The value holds credentials: show its shape, never its secrets.
        raw = ",".join(
            part.partition("=")[0] + ("=..." if "=" in part else "") for part in raw.split(",")
        )
    return ConfigurationError(
        f"otelkit: invalid {name}={raw!r} ({where}); expected {accepted}",
    )


# ---------------------------------------------------------------------------
# Parsers: each takes the raw value (a string from the environment, or any
# object passed as an argument) and returns the typed value, or raises
# ValueError with what would be accepted.


def _str(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("a non-empty string")
    return raw.strip()


def _optional_str(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError("a string")
    return raw.strip() or None


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
    raise ValueError("true or false")


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if isinstance(raw, str) and raw.strip().lower() in choices:
            return raw.strip().lower()
        raise ValueError("one of " + ", ".join(choices))

    return parse


_LEVELS = ("debug", "info", "warning", "error", "critical")


def _level(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool) and raw in logging._levelToName:
        return raw
    if isinstance(raw, str):
        lowered = raw.strip().lower()
        if lowered == "warn":
            lowered = "warning"
        if lowered in _LEVELS:
            return logging.getLevelNamesMapping()[lowered.upper()]
    raise ValueError("one of " + ", ".join(level.upper() for level in _LEVELS))


def _csv(raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if isinstance(raw, list | tuple | set | frozenset) and all(isinstance(p, str) for p in raw):
        return tuple(raw)
    raise ValueError("a comma-separated list")


def _paths(raw: object) -> frozenset[str]:
    paths = _csv(raw)
    for path in paths:
        if not path.startswith("/"):
            raise ValueError("a comma-separated list of paths starting with /")
    return frozenset(paths)


def _path(raw: object) -> str:
    if isinstance(raw, str) and raw.startswith("/") and len(raw) > 1:
        return raw
    raise ValueError("a path starting with / (for example /metrics)")


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _header_name(raw: object) -> str:
    if isinstance(raw, str) and _HEADER_NAME.match(raw):
        return raw
    raise ValueError("an HTTP header name (letters, digits and - only)")


def _positive_float(raw: object) -> float:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError("a positive number") from None
    if not 0 < value < float("inf"):  # also refuses NaN
        raise ValueError("a positive number")
    return value


def _port(raw: object) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(str(raw))
    except ValueError:
        raise ValueError("a TCP port number from 1 to 65535") from None
    if not 0 < value < 65536:
        raise ValueError("a TCP port number from 1 to 65535")
    return value


def _endpoint(raw: object) -> str | None:
    value = _optional_str(raw)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("an http:// or https:// URL, for example http://localhost:4317")
    try:
        parts.port  # noqa: B018 - urlsplit parses the port lazily; this validates it
    except ValueError:
        raise ValueError("an http:// or https:// URL with a valid port") from None
    return value


def _headers(raw: object) -> dict[str, str]:
    """Parse OTEL_EXPORTER_OTLP_HEADERS: ``key1=value1,key2=value2``, URL-encoded."""
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    if not isinstance(raw, str):
        raise ValueError("key=value pairs separated by commas")
    headers: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = unquote(key.strip())
        if not sep or not _HEADER_NAME.match(key):
            raise ValueError("key=value pairs separated by commas, e.g. api-key=secret")
        headers[key.lower()] = unquote(value.strip())
    return headers


_EXPORTERS = ("otlp", "console", "none")
_METRIC_EXPORTERS = ("prometheus", "otlp", "console", "none")


def _exporters(accepted: tuple[str, ...]) -> Callable[[object], tuple[str, ...]]:
    def parse(raw: object) -> tuple[str, ...]:
        names = tuple(name.lower() for name in _csv(raw))
        if not names or any(name not in accepted for name in names):
            raise ValueError("a comma-separated list of " + ", ".join(accepted))
        if "none" in names:
            return ()
        return names

    return parse


_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _resource_attributes(raw: object) -> dict[str, str]:
    """Parse OTEL_RESOURCE_ATTRIBUTES: ``key=value,...`` (values URL-encoded)."""
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    if not isinstance(raw, str):
        raise ValueError("key=value pairs separated by commas")
    attributes: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("key=value pairs separated by commas, e.g. service.version=1.2.0")
        attributes[key.strip()] = unquote(value.strip())
    return attributes


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the settings table.

    Attributes:
        name: The keyword argument of :func:`otelkit.instrument`.
        env: The environment variable, or ``None`` for argument-only settings.
        default: The value used when neither argument nor variable is given
            (already parsed).
        parse: Turns a raw argument or variable into the value, raising
            ``ValueError("what is accepted")`` when it cannot.
        doc: One sentence for the configuration reference.
    """

    name: str
    env: str | None
    default: Any
    parse: Callable[[object], Any]
    doc: str


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "service_name",
        "OTEL_SERVICE_NAME",
        None,
        _optional_str,
        "Service name on every span, metric resource and log line; defaults to "
        "service.name from OTEL_RESOURCE_ATTRIBUTES, then the FastAPI app's title.",
    ),
    Setting(
        "service_version",
        None,
        None,
        _optional_str,
        "Service version; defaults to service.version from OTEL_RESOURCE_ATTRIBUTES, "
        "then the FastAPI app's version.",
    ),
    Setting(
        "environment",
        None,
        None,
        _optional_str,
        "Deployment environment; defaults to deployment.environment.name (or "
        "deployment.environment) from OTEL_RESOURCE_ATTRIBUTES, then 'production'.",
    ),
    Setting(
        "resource_attributes",
        "OTEL_RESOURCE_ATTRIBUTES",
        {},
        _resource_attributes,
        "Extra resource attributes, key=value pairs separated by commas.",
    ),
    Setting(
        "sdk_disabled",
        "OTEL_SDK_DISABLED",
        False,
        _bool,
        "Turns every signal's export off; request ids and logs keep working.",
    ),
    Setting(
        "log_level",
        "LOG_LEVEL",
        logging.INFO,
        _level,
        "Lowest level written: DEBUG, INFO, WARNING, ERROR or CRITICAL.",
    ),
    Setting(
        "log_format",
        "LOG_FORMAT",
        "json",
        _choice("json", "console"),
        "json (one JSON object per line, for production) or console (for people).",
    ),
    Setting(
        "configure_logging",
        "OTELKIT_CONFIGURE_LOGGING",
        True,
        _bool,
        "Whether otelkit configures structlog and the stdlib root logger.",
    ),
    Setting(
        "excluded_paths",
        "OTELKIT_EXCLUDED_PATHS",
        frozenset({"/health", "/healthz", "/ping", "/metrics"}),
        _paths,
        "Exact paths that get a request id but no span, access line or metrics.",
    ),
    Setting(
        "request_id_header",
        "OTELKIT_REQUEST_ID_HEADER",
        "X-Request-ID",
        _header_name,
        "The request/response header that carries the request id.",
    ),
    Setting(
        "redact_fields",
        "OTELKIT_REDACT_FIELDS",
        ("token", "password", "passwd", "secret", "api_key", "apikey", "authorization"),
        _csv,
        "Log fields whose name contains one of these words are written as [REDACTED].",
    ),
    Setting(
        "access_log",
        "OTELKIT_ACCESS_LOG",
        True,
        _bool,
        "Whether to write one http_request_completed line per request.",
    ),
    Setting(
        "traces_exporter",
        "OTEL_TRACES_EXPORTER",
        ("otlp",),
        _exporters(_EXPORTERS),
        "otlp, console or none; otlp exports only when an OTLP endpoint is configured.",
    ),
    Setting(
        "metrics_exporter",
        "OTEL_METRICS_EXPORTER",
        ("prometheus",),
        _exporters(_METRIC_EXPORTERS),
        "Comma-separated: prometheus (the /metrics endpoint), otlp, console or none.",
    ),
    Setting(
        "logs_exporter",
        "OTEL_LOGS_EXPORTER",
        (),
        _exporters(_EXPORTERS),
        "otlp to also send log lines as OTLP log records; none by default.",
    ),
    Setting(
        "otlp_endpoint",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        None,
        _endpoint,
        "Base URL of the OTLP collector; unset means nothing is sent anywhere.",
    ),
    Setting(
        "otlp_traces_endpoint",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        None,
        _endpoint,
        "URL for spans only (for http/protobuf, the full URL including /v1/traces).",
    ),
    Setting(
        "otlp_metrics_endpoint",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        None,
        _endpoint,
        "URL for metrics only (for http/protobuf, the full URL including /v1/metrics).",
    ),
    Setting(
        "otlp_logs_endpoint",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
        None,
        _endpoint,
        "URL for logs only (for http/protobuf, the full URL including /v1/logs).",
    ),
    Setting(
        "otlp_protocol",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "http/protobuf",
        _choice("grpc", "http/protobuf"),
        "OTLP transport: grpc or http/protobuf.",
    ),
    Setting(
        "otlp_headers",
        "OTEL_EXPORTER_OTLP_HEADERS",
        {},
        _headers,
        "Headers sent with every OTLP export, key=value pairs separated by commas.",
    ),
    Setting(
        "otlp_timeout",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        10_000.0,
        _positive_float,
        "Milliseconds one OTLP export may take before it is abandoned.",
    ),
    Setting(
        "traces_sampler",
        "OTEL_TRACES_SAMPLER",
        "parentbased_always_on",
        _choice(*_SAMPLERS),
        "The head sampler, as in the OpenTelemetry specification.",
    ),
    Setting(
        "traces_sampler_arg",
        "OTEL_TRACES_SAMPLER_ARG",
        None,
        _optional_str,
        "The ratio for traceidratio samplers, from 0 to 1.",
    ),
    Setting(
        "metrics_path",
        "OTELKIT_METRICS_PATH",
        "/metrics",
        _path,
        "Where the app serves Prometheus metrics (when no separate port is set).",
    ),
    Setting(
        "prometheus_host",
        "OTEL_EXPORTER_PROMETHEUS_HOST",
        "127.0.0.1",
        _str,
        "Address of the separate Prometheus server (only with a port).",
    ),
    Setting(
        "prometheus_port",
        "OTEL_EXPORTER_PROMETHEUS_PORT",
        None,
        _port,
        "Serve /metrics on this port instead of on the app.",
    ),
    Setting(
        "metric_export_interval",
        "OTEL_METRIC_EXPORT_INTERVAL",
        60_000.0,
        _positive_float,
        "Milliseconds between OTLP metric exports.",
    ),
    Setting(
        "metrics_temporality",
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
        "cumulative",
        _choice("cumulative", "delta", "lowmemory"),
        "Temporality of OTLP metrics: cumulative, delta or lowmemory.",
    ),
    Setting(
        "semconv_metrics",
        "OTELKIT_SEMCONV_METRICS",
        True,
        _bool,
        "Also record http.server.request.duration and http.server.active_requests.",
    ),
    Setting(
        "multiprocess_dir",
        "PROMETHEUS_MULTIPROC_DIR",
        None,
        _optional_str,
        "A directory shared by all workers; when set, /metrics shows their summed totals.",
    ),
    Setting(
        "shutdown_timeout",
        "OTELKIT_SHUTDOWN_TIMEOUT",
        5.0,
        _positive_float,
        "Seconds the application's shutdown may spend flushing telemetry.",
    ),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclass(frozen=True, slots=True)
class Settings:
    """The resolved configuration, with where each value came from.

    Read values as attributes (``settings.log_format``); ``sources`` maps each
    setting's name to ``"argument"``, ``"environment"`` or ``"default"``.
    """

    values: Mapping[str, Any]
    sources: Mapping[str, Source] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def resource_attribute(self, *keys: str) -> str | None:
        """Return the first of ``keys`` present in OTEL_RESOURCE_ATTRIBUTES."""
        attributes: Mapping[str, str] = self.values["resource_attributes"]
        for key in keys:
            if attributes.get(key):
                return attributes[key]
        return None


@dataclass(frozen=True, slots=True)
class Resolution:
    """How one setting resolved: its value, or the error that stopped it."""

    setting: Setting
    value: Any
    source: Source
    error: ConfigurationError | None = None


def inspect_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[Resolution]:
    """Resolve every setting, collecting errors instead of stopping at the first.

    ``otelkit check`` shows all of them at once; :func:`resolve_settings`
    raises the first.
    """
    overrides = dict(overrides or {})
    environ = os.environ if environ is None else environ
    resolutions: list[Resolution] = []
    for setting in SETTINGS:
        raw: object
        source: Source
        if overrides.get(setting.name) is not None:
            raw, source = overrides[setting.name], "argument"
        elif setting.env is not None and environ.get(setting.env, "").strip():
            raw, source = environ[setting.env], "environment"
        else:
            resolutions.append(Resolution(setting, setting.default, "default"))
            continue
        try:
            resolutions.append(Resolution(setting, setting.parse(raw), source))
        except ValueError as exc:
            error = _fail(setting, raw, source, str(exc))
            resolutions.append(Resolution(setting, raw, source, error))
    by_name = {r.setting.name: r for r in resolutions}
    arg = by_name["traces_sampler_arg"]
    if arg.error is None and arg.value is not None:
        try:
            ratio = float(arg.value)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            error = _fail(arg.setting, arg.value, arg.source, "a number from 0 to 1")
            resolutions[resolutions.index(arg)] = Resolution(
                arg.setting, arg.value, arg.source, error
            )
    return resolutions


def resolve_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every setting: explicit argument, then environment, then default.

    Args:
        overrides: Keyword arguments given to :func:`otelkit.instrument`.
            ``None`` values count as not given.
        environ: The environment to read; ``os.environ`` by default.

    Raises:
        ConfigurationError: A value is invalid, or an override names no setting.
    """
    unknown = sorted(set(overrides or {}) - set(_BY_NAME))
    if unknown:
        raise ConfigurationError(
            f"otelkit: unknown setting(s) {', '.join(unknown)}; "
            f"known settings are {', '.join(sorted(_BY_NAME))}",
        )
    resolutions = inspect_settings(overrides, environ)
    for resolution in resolutions:
        if resolution.error is not None:
            raise resolution.error
    return Settings(
        {r.setting.name: r.value for r in resolutions},
        {r.setting.name: r.source for r in resolutions},
    )
