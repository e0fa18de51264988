"""The one ASGI middleware: span, request id, metrics and access log in one pass.

It sits outside the application's error handling (outside Starlette's
``ServerErrorMiddleware``), so a 500 still carries ``X-Request-ID`` and still
lands in the span, the metrics and the log. The instance holds configuration
and instruments only; everything about one request lives in the locals of
:meth:`OtelkitMiddleware.__call__` and the closures it creates.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otelkit.context import bind_request_id, is_valid_request_id, reset_request_id
from otelkit.logs import access_line, mark_logged
from otelkit.metrics import HttpMetrics

__all__ = ["OtelkitMiddleware", "Runtime"]

KNOWN_METHODS = frozenset(
    method.strip().upper()
    for method in os.environ.get(
        "OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS",
        "CONNECT,DELETE,GET,HEAD,OPTIONS,PATCH,POST,PUT,TRACE",
    ).split(",")
    if method.strip()
)
UNMATCHED = "<unmatched>"
# Client-controlled strings written to logs and span attributes are bounded.
_MAX_LOGGED_PATH = 1024
_MAX_LOGGED_METHOD = 32
_MAX_ATTRIBUTE = 1024


class _HeaderListGetter(Getter[list[tuple[bytes, bytes]]]):
    """Reads propagation headers straight from the ASGI header list."""

    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        wanted = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for name, value in carrier if name == wanted]
        if not values:
            return None
        if key == "baggage":
            return [",".join(values)]
        return values

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier]


_GETTER = _HeaderListGetter()


@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    """What the middleware needs, built once by :func:`otelkit.instrument`."""

    tracer: trace.Tracer
    http_metrics: HttpMetrics | None
    access_logger: Any
    log_started: bool
    access_log: bool
    excluded_paths: Collection[str]
    request_id_header: str
    metrics_path: str | None
    render_metrics: Callable[[str | None], tuple[str, str]] | None
    on_shutdown: Callable[[], Awaitable[None]] | None


def _find_route(routes: Any, scope: Scope) -> str | None:
    # Starlette (unlike FastAPI) does not put the matched route in the scope;
    # find which route matched. Runs only for requests that reached an
    # endpoint, so unmatched (hostile) paths never pay for the scan.
    for route in routes or ():
        match, child = route.matches(scope)
        if match != Match.FULL:
            continue
        template: str = getattr(route, "path_format", "")
        inner = getattr(route, "routes", None)
        if inner:
            rest = _find_route(inner, {**scope, **child})
            return template.rstrip("/") + rest if rest is not None else None
        return template
    return None


def route_template(scope: Scope) -> str | None:
    """The matched route's template (``/items/{item_id}``), or ``None``."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        if "endpoint" not in scope:
            return None
        app = scope.get("app")
        return _find_route(getattr(getattr(app, "router", None), "routes", None), scope)
    # Routes of a mounted sub-application are relative to the mount point.
    app_root = scope.get("app_root_path")
    root = scope.get("root_path", "")
    if app_root is not None and root.startswith(app_root) and len(root) > len(app_root):
        template = root[len(app_root) :] + template
    return template


def _client_address(scope: Scope) -> str | None:
    client = scope.get("client")
    if client:
        return str(client[0])
    return None


def _fresh_request_id() -> str:
    return f"{random.getrandbits(128):032x}"


def _request_id(incoming: bytes | None, span_context: trace.SpanContext | None) -> str:
    """The client's id when valid, else the trace id, else (no tracing) a fresh one."""
    if incoming is not None and is_valid_request_id(incoming):
        return incoming.decode()
    if span_context is not None and span_context.is_valid:
        return format(span_context.trace_id, "032x")
    return _fresh_request_id()


def _exception_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    if module in {"builtins", "__main__"}:
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


class _Request:
    """The in-flight registry entry of one request (read by the in-progress gauge)."""

    __slots__ = ("method", "scheme", "scope")

    def __init__(self, scope: Scope, method: str, scheme: str) -> None:
        self.scope = scope
        self.method = method
        self.scheme = scheme


def resolve_in_flight(request: _Request) -> tuple[str, str, str]:
    """``(method, endpoint, scheme)`` of an in-flight request, read at scrape time."""
    return request.method, route_template(request.scope) or UNMATCHED, request.scheme


class OtelkitMiddleware:
    """Pure ASGI middleware; see the module docstring."""

    __slots__ = ("_fields", "_header", "_header_str", "app", "runtime")

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self._header_str = runtime.request_id_header
        self._header = runtime.request_id_header.lower().encode("latin-1")
        # The headers the configured propagators read: a request carrying
        # none of them skips extraction altogether.
        self._fields = frozenset(
            field.lower().encode("latin-1") for field in propagate.get_global_textmap().fields
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http":
            if scope_type == "websocket":
                await self._websocket(scope, receive, send)
            elif scope_type == "lifespan" and self.runtime.on_shutdown is not None:
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return

        runtime = self.runtime
        path: str = scope["path"]
        if path == runtime.metrics_path and runtime.render_metrics is not None:
            await self._serve_metrics(scope, send)
            return

        incoming: bytes | None = None
        propagated = False
        user_agent: bytes | None = None
        host: bytes | None = None
        header = self._header
        fields = self._fields
        for name, value in scope["headers"]:
            if name == header:
                incoming = value
            elif name in fields:
                propagated = True
            elif name == b"user-agent":
                user_agent = value
            elif name == b"host":
                host = value

        if path in runtime.excluded_paths:
            await self._untraced(scope, receive, send, _request_id(incoming, None))
            return

        raw_method: str = scope["method"]
        method = raw_method if raw_method in KNOWN_METHODS else "_OTHER"
        scheme: str = scope.get("scheme", "http")
        parent = propagate.extract(scope["headers"], getter=_GETTER) if propagated else None
        span_name = "HTTP" if method == "_OTHER" else method
        span = runtime.tracer.start_span(
            span_name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": path[:_MAX_ATTRIBUTE],
                "url.scheme": scheme,
            },
        )
        span_context = span.get_span_context()
        trace_id = format(span_context.trace_id, "032x")
        request_id = _request_id(incoming, span_context)
        recording = span.is_recording()
        sampled = span_context.trace_flags.sampled

        context_token = otel_context.attach(trace.set_span_in_context(span, parent))
        id_token = bind_request_id(request_id)
        if incoming is not None and request_id.encode() != incoming:  # it was invalid
            runtime.access_logger.warning(
                "invalid_request_id_replaced",
                header=self._header_str,
                length=len(incoming),
                request_id=request_id,
            )
        if runtime.log_started:
            runtime.access_logger.debug(
                "http_request_started",
                method=raw_method[:_MAX_LOGGED_METHOD],
                path=path[:_MAX_LOGGED_PATH],
            )
        in_flight = runtime.http_metrics.in_flight if runtime.http_metrics is not None else None
        registration = _Request(scope, method, scheme)
        if in_flight is not None:
            in_flight.add(registration)

        response_headers = [(self._header, request_id.encode())]
        if span_context.is_valid:
            flags = "01" if span_context.trace_flags.sampled else "00"
            traceresponse = f"00-{trace_id}-{format(span_context.span_id, '016x')}-{flags}"
            response_headers.append((b"traceresponse", traceresponse.encode()))

        start = time.perf_counter()
        status = 0
        response_started = False
        response_done = False
        disconnected = False
        client_gone = False
        finished = False
        end: float | None = None
        end_ns: int | None = None

        def finish(exc: BaseException | None) -> None:
            nonlocal finished
            finished = True
            stop = end if end is not None else time.perf_counter()
            duration = stop - start
            route = route_template(scope)
            code = status
            if client_gone:
                # The client left before its response was complete; what the
                # app meant to send never arrived (nginx's 499).
                code = 499
            elif not response_started:
                code = 500
            exception_type = _exception_type(exc) if exc is not None else None
            error_type = exception_type or (str(code) if code >= 500 else None)
            if recording:
                if route:
                    span.update_name(f"{span_name} {route}")
                # All but the sampler's three attributes in one call: each
                # set_attribute(s) call takes the span's lock and cleans values.
                attributes = self._request_attributes(
                    scope, raw_method, method, user_agent, host, request_id
                )
                attributes["http.response.status_code"] = code
                if route:
                    attributes["http.route"] = route
                if error_type is not None:
                    attributes["error.type"] = error_type
                span.set_attributes(attributes)
                if exc is not None:
                    span.record_exception(exc)
                if error_type is not None:
                    span.set_status(Status(StatusCode.ERROR, exception_type))
            if runtime.http_metrics is not None:
                runtime.http_metrics.record(
                    method,
                    route or UNMATCHED,
                    route,
                    code,
                    scheme,
                    duration,
                    error_type,
                    exception_type,
                    (
                        span_context.trace_id,
                        span_context.span_id,
                        duration,
                        end_ns or time.time_ns(),
                    )
                    if sampled
                    else None,
                )
            span.end(end_time=end_ns)
            if runtime.access_log:
                fields = {
                    "method": raw_method[:_MAX_LOGGED_METHOD],
                    "route": route,
                    "path": path[:_MAX_LOGGED_PATH],
                    "status_code": code,
                    "duration_ms": round(duration * 1000, 3),
                    "client": _client_address(scope),
                }
                if code >= 500 or exc is not None:
                    level, number = "error", 40
                elif code >= 400:
                    level, number = "warning", 30
                else:
                    level, number = "info", 20
                fast = access_line()
                if fast is not None and exc is None:
                    if fast.enabled(number):
                        valid = span_context.is_valid
                        fast.write(
                            level,
                            fields,
                            request_id,
                            trace_id if valid else None,
                            format(span_context.span_id, "016x") if valid else None,
                        )
                else:
                    getattr(runtime.access_logger, level)(
                        "http_request_completed", **fields, exc_info=exc
                    )

        async def receive_wrapper() -> Message:
            nonlocal disconnected
            message = await receive()
            # A disconnect after the response (keep-alive closing) is no news.
            if message["type"] == "http.disconnect" and not response_done:
                disconnected = True
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started, response_done, end, end_ns, client_gone
            message_type = message["type"]
            if message_type == "http.response.start":
                response_started = True
                status = message["status"]
                client_gone = client_gone or disconnected
                # Messages are made for this one send; changing it in place is
                # what Starlette's own middleware do (MutableHeaders).
                message["headers"] = _with_headers(message.get("headers", ()), response_headers)
            try:
                await send(message)
            except OSError:
                client_gone = True  # the connection broke under the response
                raise
            if message_type == "http.response.start":
                return
            if message_type == "http.response.body" and not message.get("more_body", False):
                response_done = True
                end = time.perf_counter()
                end_ns = time.time_ns()
                # 5xx wait for the app to return: the exception that caused
                # them is re-raised by the error middleware right after.
                if status < 500:
                    finish(None)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            cancelled = not isinstance(exc, Exception)
            if not finished and (
                client_gone or disconnected or cancelled or type(exc).__name__ == "ClientDisconnect"
            ):
                # Not an application error: the client went away (or the
                # server cancelled the request for it). Recorded as 499, with
                # no traceback; a cancellation keeps propagating.
                client_gone = True
                finish(None)
                if cancelled:
                    raise
                return
            if not finished:
                finish(exc)
            else:
                # The response was complete (a background task failed): the
                # client got its answer; log the failure once, with the id.
                runtime.access_logger.error(
                    "exception_after_response", path=path[:_MAX_LOGGED_PATH], exc_info=exc
                )
                if runtime.http_metrics is not None:
                    runtime.http_metrics.record_exception(
                        _exception_type(exc), route_template(scope)
                    )
            mark_logged(exc)
            if not isinstance(exc, Exception):
                raise  # cancellation, KeyboardInterrupt, SystemExit: not ours to stop
            if not response_started:
                await _send_500(send, response_headers, request_id)
            elif not response_done:
                raise  # a truncated body: the server must abort the connection
            # The client has its complete response and the exception is logged,
            # counted and on the span. Re-raising would only make the server log
            # it a second time and close a keep-alive connection that a proxy
            # may be about to reuse.
        else:
            if not finished:
                client_gone = client_gone or (disconnected and not response_done)
                if not response_started and not client_gone:
                    await _send_500(send, response_headers, request_id)
                finish(None)
        finally:
            if in_flight is not None:
                in_flight.discard(registration)
            reset_request_id(id_token)
            otel_context.detach(context_token)

    @staticmethod
    def _request_attributes(
        scope: Scope,
        raw_method: str,
        method: str,
        user_agent: bytes | None,
        host: bytes | None,
        request_id: str,
    ) -> dict[str, Any]:
        attributes: dict[str, Any] = {"request.id": request_id}
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
            attributes["client.port"] = client[1]
        server_host, server_port = _server(scope, host)
        if server_host:
            attributes["server.address"] = server_host[: _MAX_LOGGED_METHOD * 8]
        if server_port:
            attributes["server.port"] = server_port
        if user_agent:
            attributes["user_agent.original"] = user_agent[:_MAX_ATTRIBUTE].decode("latin-1")
        if method != raw_method:
            attributes["http.request.method_original"] = raw_method[:_MAX_LOGGED_METHOD]
        query: bytes = scope.get("query_string", b"")
        if query:
            attributes["url.query"] = _redacted_query(query)[:_MAX_ATTRIBUTE]
        flavor = scope.get("http_version")
        if flavor:
            attributes["network.protocol.version"] = flavor
        return attributes

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One SERVER span per websocket connection, from handshake to close."""
        runtime = self.runtime
        path: str = scope["path"]
        incoming = None
        propagated = False
        for name, value in scope["headers"]:
            if name == self._header:
                incoming = value
            elif name in self._fields:
                propagated = True
        parent = propagate.extract(scope["headers"], getter=_GETTER) if propagated else None
        span = runtime.tracer.start_span(
            "WS",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "url.path": path[:_MAX_ATTRIBUTE],
                "url.scheme": scope.get("scheme", "ws"),
                "network.protocol.name": "websocket",
            },
        )
        request_id = _request_id(incoming, span.get_span_context())
        span.set_attribute("request.id", request_id)
        context_token = otel_context.attach(trace.set_span_in_context(span, parent))
        id_token = bind_request_id(request_id)
        start = time.perf_counter()
        close_code: int | None = None
        accepted = False

        async def send_wrapper(message: Message) -> None:
            nonlocal close_code, accepted
            if message["type"] == "websocket.accept":
                accepted = True
                message = dict(message)
                message["headers"] = _with_headers(
                    message.get("headers", ()), [(self._header, request_id.encode())]
                )
            elif message["type"] == "websocket.close":
                close_code = int(message.get("code", 1000))
            await send(message)

        async def receive_wrapper() -> Message:
            nonlocal close_code
            message = await receive()
            if message["type"] == "websocket.disconnect" and close_code is None:
                close_code = int(message.get("code", 1005))
            return message

        error: BaseException | None = None
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as exc:
            error = exc
            mark_logged(exc)
            raise
        finally:
            route = route_template(scope)
            if route:
                span.update_name(f"WS {route}")
                span.set_attribute("http.route", route)
            if close_code is not None:
                span.set_attribute("websocket.close.code", close_code)
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, _exception_type(error)))
                span.set_attribute("error.type", _exception_type(error))
            span.end()
            if runtime.access_log:
                log = runtime.access_logger
                emit = log.error if error is not None else log.info
                emit(
                    "websocket_closed",
                    route=route,
                    path=path[:_MAX_LOGGED_PATH],
                    accepted=accepted,
                    close_code=close_code,
                    duration_ms=round((time.perf_counter() - start) * 1000, 3),
                    client=_client_address(scope),
                    exc_info=error,
                )
            reset_request_id(id_token)
            otel_context.detach(context_token)

    async def _untraced(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        token = bind_request_id(request_id)
        headers = [(self._header, request_id.encode())]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = _with_headers(message.get("headers", ()), headers)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            reset_request_id(token)

    async def _serve_metrics(self, scope: Scope, send: Send) -> None:
        render = self.runtime.render_metrics
        if render is None:  # pragma: no cover - __call__ checks before calling
            return
        accept = None
        for name, value in scope["headers"]:
            if name == b"accept":
                accept = value.decode("latin-1")
        if scope["method"] not in {"GET", "HEAD"}:
            await _send_plain(send, 405, b"Method Not Allowed", [(b"allow", b"GET, HEAD")])
            return
        content_type, body = render(accept)
        payload = body.encode()
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(payload)).encode()),
            (self._header, _fresh_request_id().encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else payload}
        )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        on_shutdown = self.runtime.on_shutdown

        async def send_wrapper(message: Message) -> None:
            shutting_down = message["type"] in {
                "lifespan.shutdown.complete",
                "lifespan.shutdown.failed",
            }
            if shutting_down and on_shutdown is not None:
                await on_shutdown()
            await send(message)

        await self.app(scope, receive, send_wrapper)


def _server(scope: Scope, host: bytes | None) -> tuple[str | None, int | None]:
    if host:
        text = host.decode("latin-1")
        if text.startswith("["):  # an IPv6 literal: [::1]:8000
            address, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            address, _, port = text.partition(":")
        return address or None, int(port) if port.isdigit() and len(port) <= 5 else None
    server = scope.get("server")
    if server:
        return str(server[0]), server[1]
    return None, None


def _redacted_query(query: bytes) -> str:
    parts = []
    for item in query.decode("latin-1").split("&"):
        if not item:
            continue
        key, sep, _ = item.partition("=")
        parts.append(f"{key}=[REDACTED]" if sep else key)
    return "&".join(parts)


def _with_headers(headers: Any, ours: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    names = {name for name, _ in ours}
    result = [(name, value) for name, value in headers if name.lower() not in names]
    result.extend(ours)
    return result


async def _send_plain(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_500(send: Send, headers: list[tuple[bytes, bytes]], request_id: str) -> None:
    body = b'{"detail":"Internal Server Error","request_id":"' + request_id.encode() + b'"}'
    try:
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
    except Exception:  # noqa: S110 - the client is gone; nothing left to tell it
        pass
