"""Structured logging: one structlog pipeline for otelkit, the app and stdlib.

Every line carries ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``,
``event``, ``service``, ``version`` and ``environment``; inside a request also
``request_id``, ``trace_id`` and ``span_id``. Records from the stdlib
``logging`` module (uvicorn, gunicorn, libraries) go through the same
processors and the same writer, so there is one format and lines never
interleave mid-line.

Values of fields named like a secret are replaced by ``[REDACTED]``, and a
line never contains a raw control character, whatever a client sent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import IO, Any

import orjson
import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

from otelkit._pipeline import RateLimitFilter
from otelkit.context import get_request_id

__all__ = [
    "REDACTED",
    "RedactSecrets",
    "configure_logging",
    "get_logger",
    "mark_logged",
]

REDACTED = "[REDACTED]"
DEFAULT_REDACT_FIELDS = (
    "token",
    "password",
    "passwd",
    "secret",
    "api_key",
    "apikey",
    "authorization",
)

# Header names whose values are credentials whatever the configured words:
# they are redacted when logged as fields (e.g. a dict of request headers).
_ALWAYS_SECRET = ("authorization", "cookie")

# Characters that must not appear raw in a log line: C0 controls (JSON
# escapes those itself), DEL, C1 controls and the Unicode line separators,
# which line-oriented tools (and str.splitlines) treat as line breaks.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029]")
_UNSAFE_IN_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# A query string inside a foreign log message (an HTTP client logging the URL
# it called, say): the values go, the keys stay.
_QUERY_VALUE = re.compile(r"([?&][^=&#\s\"']+=)[^&#\s\"']*")


def redact_query_values(text: str) -> str:
    """Replace the values of URL query parameters in ``text`` with [REDACTED]."""
    if "=" not in text or ("?" not in text and "&" not in text):
        return text
    return _QUERY_VALUE.sub(lambda m: m.group(1) + REDACTED, text)


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _escape_readably(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]  # \r, \n, \x1b: as Python shows them


def get_logger(name: str | None = None, **initial_values: Any) -> Any:
    """Return a structlog logger whose lines carry ``logger=name``.

    It may be called at import time, before :func:`otelkit.instrument`: the
    logger picks up otelkit's configuration on first use.

    Example:
        >>> log = get_logger(__name__)
        >>> log.info("model_created", model_id="123", model_type="cadquery")
    """
    if name is None:
        return structlog.get_logger(**initial_values)
    return structlog.get_logger(name, **initial_values)


def mark_logged(exc: BaseException) -> None:
    """Remember that ``exc`` was logged with its traceback.

    The server (uvicorn, gunicorn) logs an exception that escapes the app
    once more; the stdlib bridge drops that second copy.
    """
    with contextlib.suppress(AttributeError):  # exceptions with __slots__ only
        exc.__otelkit_logged__ = True  # type: ignore[attr-defined]


def _already_logged(record: logging.LogRecord) -> bool:
    exc_info = record.exc_info
    return bool(exc_info and getattr(exc_info[1], "__otelkit_logged__", False))


class RedactSecrets:
    """Replace the values of fields named like a secret with ``[REDACTED]``.

    A field is secret when its name, lower-cased with ``-`` read as ``_``,
    contains one of ``words``. Nested dictionaries (a logged dict of headers,
    say) are redacted the same way; the caller's dict is not changed.
    """

    __slots__ = ("_cache", "_pattern")

    def __init__(self, words: Iterable[str]) -> None:
        cleaned = {word.strip().lower().replace("-", "_") for word in words}
        if not cleaned or not all(cleaned):
            raise ValueError("RedactSecrets needs at least one non-empty word")
        cleaned.update(_ALWAYS_SECRET)
        alternatives = "|".join(sorted(map(re.escape, cleaned)))
        self._pattern = re.compile(alternatives)
        self._cache: dict[str, bool] = {}

    def is_secret(self, key: object) -> bool:
        """Whether a field called ``key`` holds a secret."""
        if not isinstance(key, str):
            return False
        cached = self._cache.get(key)
        if cached is None:
            cached = self._pattern.search(key.lower().replace("-", "_")) is not None
            if len(self._cache) < 4096:  # field names come from code, but bound it anyway
                self._cache[key] = cached
        return cached

    def _redact_mapping(self, mapping: MutableMapping[Any, Any]) -> dict[Any, Any]:
        return {
            key: REDACTED
            if self.is_secret(key)
            else self._redact_mapping(value)
            if isinstance(value, dict)
            else value
            for key, value in mapping.items()
        }

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            if self.is_secret(key):
                event_dict[key] = REDACTED
            elif isinstance(value, dict):
                event_dict[key] = self._redact_mapping(value)
        return event_dict


_SEVERITY = {"debug": 5, "info": 9, "warning": 13, "error": 17, "critical": 21}
_otel_logger: Any = None


def set_otlp_logger(logger: Any) -> None:
    """Also send every line as an OpenTelemetry log record through ``logger``."""
    global _otel_logger
    _otel_logger = logger


def _attribute(value: object) -> Any:
    if isinstance(value, str | bool | int | float):
        return value
    return repr(value)


def emit_otlp(event_dict: EventDict) -> None:
    """Send one line's fields as an OTLP log record (when OTEL_LOGS_EXPORTER=otlp)."""
    logger = _otel_logger
    if logger is None:
        return
    level = str(event_dict.get("level", "info"))
    exc_info = event_dict.get("exc_info")
    attributes = {
        key: _attribute(value)
        for key, value in event_dict.items()
        if key not in {"event", "level", "timestamp", "exc_info", "exception"} and value is not None
    }
    with contextlib.suppress(Exception):  # telemetry must never fail the log call
        logger.emit(
            severity_number=_SEVERITY.get(level, 9),
            severity_text=level.upper(),
            body=str(event_dict.get("event", "")),
            attributes=attributes,
            exception=exc_info if isinstance(exc_info, BaseException) else None,
        )


def _emit_otlp(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    emit_otlp(event_dict)
    return event_dict


class AddServiceFields:
    """Add ``service``, ``version`` and ``environment`` unless the call set them."""

    __slots__ = ("_fields",)

    def __init__(self, service: str, version: str, environment: str) -> None:
        self._fields = (("service", service), ("version", version), ("environment", environment))

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        for key, value in self._fields:
            event_dict.setdefault(key, value)
        return event_dict


def add_request_context(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Add ``request_id``, ``trace_id`` and ``span_id`` of the current request/span."""
    request_id = get_request_id()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(span_context.span_id, "016x"))
    return event_dict


def _escape_control_characters(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    # Only the console format needs this: the JSON renderer escapes itself.
    for key, value in event_dict.items():
        if isinstance(value, str) and _UNSAFE_IN_TEXT.search(value):
            event_dict[key] = _UNSAFE_IN_TEXT.sub(_escape_readably, value)
    return event_dict


def _json_default(value: object) -> str:
    return repr(value)


_FIRST = ("timestamp", "level", "logger", "event")


def render_json(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
    """Render one JSON object on one line, whatever the values hold.

    ``timestamp``, ``level``, ``logger`` and ``event`` come first, for people
    reading raw lines; parsers do not care.
    """
    if next(iter(event_dict), None) == "timestamp":
        ordered = event_dict  # built in order already (the access line)
    else:
        ordered = {key: event_dict[key] for key in _FIRST if key in event_dict}
        ordered.update(event_dict)
    try:
        text = orjson.dumps(ordered, default=_json_default, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # orjson refuses lone surrogates (undecodable bytes in a path, say);
        # the stdlib encoder escapes them.
        line = json.dumps(ordered, default=_json_default, ensure_ascii=True)
    else:
        line = text.decode()
    if _UNSAFE_IN_JSON.search(line):
        line = _UNSAFE_IN_JSON.sub(_escape, line)
    return line


class _Sink:
    """Writes whole lines to one stream under one lock, for structlog and stdlib alike.

    When the stream is backed by a file descriptor (stdout, a log file), a line
    is one ``os.write``: no trip through the text and buffer layers, and never
    half a line left in a buffer when the process dies.
    """

    __slots__ = ("_fd", "_lock", "_stream")

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._fd: int | None = None
        try:
            fd = stream.fileno()
            stream.flush()  # what was printed before goes first
        except (AttributeError, OSError, ValueError):
            return
        self._fd = fd

    def write(self, line: str) -> None:
        with self._lock:
            try:
                if self._fd is not None:
                    data = (line + "\n").encode("utf-8", "backslashreplace")
                    while data:
                        data = data[os.write(self._fd, data) :]
                else:
                    self._stream.write(line + "\n")
                    self._stream.flush()
            except (OSError, ValueError):
                # A closed or broken stdout (a pipe whose reader went away)
                # must not turn a log call into a failed request.
                pass


class _NamedSink:
    """What structlog wraps: the shared sink plus the logger's name."""

    __slots__ = ("name", "write")

    def __init__(self, sink: _Sink, name: str | None) -> None:
        self.name = name
        self.write = sink.write

    def __getattr__(self, method: str) -> Callable[[str], None]:
        # structlog calls the method named after the level (info, error...).
        return self.write


class _SinkFactory:
    __slots__ = ("_sink",)

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def __call__(self, *args: Any) -> _NamedSink:
        return _NamedSink(self._sink, str(args[0]) if args else None)


def add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Add ``logger``: the name given to :func:`get_logger`."""
    name = getattr(logger, "name", None)
    if name is not None:
        event_dict.setdefault("logger", name)
    return event_dict


# Attributes every LogRecord has; anything else came in through ``extra=``
# (uvicorn's color_message repeats the message with terminal escapes).
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "color_message",
}


class StructlogHandler(logging.Handler):
    """Send stdlib log records through otelkit's structlog processors."""

    def __init__(self, processors: list[Processor], sink: _Sink) -> None:
        super().__init__()
        self._processors = processors
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if _already_logged(record):
            return
        try:
            level = record.levelname.lower()
            event_dict: dict[str, Any] = {
                key: value
                for key, value in vars(record).items()
                if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
            }
            event_dict["event"] = redact_query_values(record.getMessage())
            event_dict["logger"] = record.name
            if record.exc_info:
                event_dict["exc_info"] = record.exc_info
            result: Any = event_dict
            for processor in self._processors:
                result = processor(None, level, result)
            self._sink.write(result)
        except structlog.DropEvent:
            return
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


_configured_handler: StructlogHandler | None = None


class AccessLine:
    """Writes the access line without the generic processor chain.

    The line is the one the structlog pipeline would render (same fields, same
    order, same escaping); building it directly saves most of its cost on the
    per-request path. Used for JSON lines without an exception; everything
    else goes through structlog.
    """

    __slots__ = ("_fields", "_minimum", "_second", "_sink", "_stamp")

    def __init__(
        self, sink: _Sink, level: int, service: str, version: str, environment: str
    ) -> None:
        self._sink = sink
        self._minimum = level
        self._fields = {"service": service, "version": version, "environment": environment}
        self._second = -1
        self._stamp = ""

    def enabled(self, level: int) -> bool:
        """Whether a line at ``level`` (a logging level number) is written."""
        return level >= self._minimum

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1_000_000):06d}Z"

    def write(
        self,
        level: str,
        fields: dict[str, Any],
        request_id: str | None,
        trace_id: str | None,
        span_id: str | None,
    ) -> None:
        """Write one line: standard fields, ``fields``, service fields, then the ids."""
        line: dict[str, Any] = {
            "timestamp": self._timestamp(),
            "level": level,
            "logger": "otelkit.access",
            "event": "http_request_completed",
        }
        line.update(fields)
        line.update(self._fields)
        if request_id is not None:
            line["request_id"] = request_id
        if trace_id is not None:
            line["trace_id"] = trace_id
            line["span_id"] = span_id
        if _otel_logger is not None:
            emit_otlp(line)
        self._sink.write(render_json(None, level, line))


_access_line: AccessLine | None = None


def access_line() -> AccessLine | None:
    """The fast access-line writer, when JSON logging is configured."""
    return _access_line


def _processors(
    *,
    service: str,
    version: str,
    environment: str,
    redact_fields: Iterable[str],
    log_format: str,
    colors: bool,
) -> list[Processor]:
    processors: list[Processor] = [
        structlog.processors.add_log_level,
        add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        AddServiceFields(service, version, environment),
        add_request_context,
        RedactSecrets(redact_fields),
        _emit_otlp,
    ]
    if log_format == "console":
        processors += [
            _escape_control_characters,
            structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False),
        ]
    else:
        processors += [structlog.processors.format_exc_info, render_json]
    return processors


def configure_logging(
    *,
    level: int = logging.INFO,
    log_format: str = "json",
    service: str = "unknown_service",
    version: str = "unknown",
    environment: str = "production",
    redact_fields: Iterable[str] = DEFAULT_REDACT_FIELDS,
    stream: IO[str] | None = None,
    quiet_server_access_log: bool = True,
) -> None:
    """Configure structlog and the stdlib root logger to write otelkit's lines.

    Called by :func:`otelkit.instrument`; call it directly to log the same
    way outside a web app (a worker, a script).

    Args:
        level: The lowest level written, for structlog and stdlib alike.
        log_format: ``"json"`` or ``"console"``.
        service: The ``service`` field.
        version: The ``version`` field.
        environment: The ``environment`` field.
        redact_fields: Words that make a field secret.
        stream: Where lines go; standard output by default.
        quiet_server_access_log: Silence uvicorn's and gunicorn's own access
            loggers, which would repeat otelkit's access line.
    """
    global _configured_handler, _access_line
    if log_format not in {"json", "console"}:
        raise ValueError(f"log_format must be 'json' or 'console', not {log_format!r}")
    stream = sys.stdout if stream is None else stream
    sink = _Sink(stream)
    colors = log_format == "console" and _isatty(stream)
    processors = _processors(
        service=service,
        version=version,
        environment=environment,
        redact_fields=redact_fields,
        log_format=log_format,
        colors=colors,
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_SinkFactory(sink),
        context_class=dict,
        cache_logger_on_first_use=True,
    )
    handler = StructlogHandler(processors, sink)
    handler.setLevel(level)
    handler.addFilter(RateLimitFilter(("opentelemetry",)))
    root = logging.getLogger()
    for old in list(root.handlers):
        # Replace otelkit's earlier handler and console handlers (basicConfig's,
        # a server's) that would print every line a second time; keep files.
        console = type(old) is logging.StreamHandler and getattr(old, "stream", None) in (
            sys.stdout,
            sys.stderr,
            sys.__stdout__,
            sys.__stderr__,
        )
        if old is _configured_handler or console:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    _configured_handler = handler
    _access_line = (
        AccessLine(sink, level, service, version, environment) if log_format == "json" else None
    )
    _route_server_loggers(quiet_server_access_log)


def _route_server_loggers(quiet_access: bool) -> None:
    # Servers configure their loggers with their own handlers and no
    # propagation before they import the app; send them through the root.
    # Their levels stay as the server set them (--log-level); the root
    # handler's level applies LOG_LEVEL on top.
    for name in ("uvicorn", "uvicorn.error", "gunicorn", "gunicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    if quiet_access:
        # otelkit's access line replaces the server's; without it (access_log
        # off) the server's access logger is left exactly as configured.
        for name in ("uvicorn.access", "gunicorn.access"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = False
            logger.disabled = True


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def reset_logging() -> None:
    """Undo :func:`configure_logging` (for tests and ``otelkit.uninstrument``)."""
    global _configured_handler, _access_line
    _access_line = None
    if _configured_handler is not None:
        logging.getLogger().removeHandler(_configured_handler)
        _configured_handler = None
    structlog.reset_defaults()
