"""The last traces, kept in memory: see traces without a collector.

The demo uses it so that a person with nothing but a browser can look at the
spans a request made; it is also handy on a laptop when Jaeger is not
running. Memory is bounded by ``max_traces`` and ``max_spans_per_trace``.

Example:
    >>> from fastapi import FastAPI
    >>> from otelkit.recent import RecentTraces
    >>> app = FastAPI()
    >>> recent = RecentTraces()
    >>> recent.install()                      # on the global SDK tracer provider
    >>> app.add_route("/debug/traces", recent.endpoint)
"""

from __future__ import annotations

import html
import threading
from collections import OrderedDict
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

__all__ = ["RecentTraces"]


def _span_record(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    start = span.start_time or 0
    end = span.end_time or start
    return {
        "name": span.name,
        "trace_id": format(context.trace_id if context else 0, "032x"),
        "span_id": format(context.span_id if context else 0, "016x"),
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
        "kind": span.kind.name,
        "start_unix_nano": start,
        "duration_ms": round((end - start) / 1e6, 3),
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": event.name, "attributes": dict(event.attributes or {})}
            for event in span.events
        ],
    }


class RecentTraces(SpanProcessor):
    """A span processor that keeps the most recent traces in memory."""

    def __init__(self, max_traces: int = 200, max_spans_per_trace: int = 200) -> None:
        if max_traces < 1 or max_spans_per_trace < 1:
            raise ValueError("max_traces and max_spans_per_trace must be at least 1")
        self._max_traces = max_traces
        self._max_spans = max_spans_per_trace
        self._traces: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def install(self, provider: Any = None) -> bool:
        """Add this processor to ``provider`` (the global one by default).

        Returns ``False`` when the provider is not an SDK provider.
        """
        provider = provider if provider is not None else trace.get_tracer_provider()
        add = getattr(provider, "add_span_processor", None)
        if add is None:
            return False
        add(self)
        return True

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing to do until the span ends."""

    def on_end(self, span: ReadableSpan) -> None:
        """Keep the span with its trace; forget the oldest trace when full."""
        record = _span_record(span)
        trace_id = record["trace_id"]
        with self._lock:
            spans = self._traces.get(trace_id)
            if spans is None:
                spans = self._traces[trace_id] = []
                while len(self._traces) > self._max_traces:
                    self._traces.popitem(last=False)
            else:
                self._traces.move_to_end(trace_id)
            if len(spans) < self._max_spans:
                spans.append(record)

    def shutdown(self) -> None:
        """Forget everything."""
        with self._lock:
            self._traces.clear()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered for export."""
        return True

    def traces(self) -> list[dict[str, Any]]:
        """The kept traces, newest first, each with its spans (root first)."""
        with self._lock:
            items = [(trace_id, list(spans)) for trace_id, spans in self._traces.items()]
        result = []
        for trace_id, spans in reversed(items):
            spans.sort(key=lambda s: (s["parent_span_id"] is not None, s["start_unix_nano"]))
            root = spans[0]
            result.append(
                {
                    "trace_id": trace_id,
                    "root": root["name"],
                    "status": root["status"],
                    "duration_ms": root["duration_ms"],
                    "request_id": root["attributes"].get("request.id"),
                    "spans": spans,
                }
            )
        return result

    async def endpoint(self, request: Request) -> Response:
        """An HTML list of traces; ``?trace_id=...`` or ``Accept: application/json`` for JSON."""
        traces = self.traces()
        wanted = request.query_params.get("trace_id")
        if wanted is not None:
            found = [t for t in traces if t["trace_id"] == wanted]
            if not found:
                return JSONResponse({"detail": "trace not found"}, status_code=404)
            return JSONResponse(found[0])
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(traces)
        rows = "".join(
            "<tr><td><a href='?trace_id={tid}'>{tid}</a></td><td>{root}</td><td>{status}</td>"
            "<td>{duration}</td><td>{spans}</td><td>{rid}</td></tr>".format(
                tid=html.escape(t["trace_id"]),
                root=html.escape(t["root"]),
                status=html.escape(t["status"]),
                duration=t["duration_ms"],
                spans=len(t["spans"]),
                rid=html.escape(str(t["request_id"] or "")),
            )
            for t in traces
        )
        page = (
            "<!doctype html><meta charset=utf-8><title>Recent traces</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}</style>"
            f"<h1>Recent traces ({len(traces)})</h1>"
            "<table><tr><th>trace id</th><th>root span</th><th>status</th><th>ms</th>"
            f"<th>spans</th><th>request id</th></tr>{rows}</table>"
        )
        return HTMLResponse(page)
