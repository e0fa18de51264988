"""Exactly one server span (and one duration sample) per request, whatever else is there.

FastAPI's native telemetry switches itself on when global providers exist,
and opentelemetry-instrumentation-fastapi can instrument the app before or
after otelkit, or patch the FastAPI class. Each case runs in a fresh
interpreter, because global providers can be set only once per process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.support.servers import base_env

SCRIPT = """
import json
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(tracer_provider)
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
{before_import}
import fastapi
from fastapi.testclient import TestClient
import otelkit

app = fastapi.FastAPI()

@app.get("/items/{{item_id}}")
async def item(item_id: int):
    return {{"id": item_id}}

{setup}

with TestClient(app) as client:
    ids = [client.get(f"/items/{{i}}").headers.get("x-request-id") for i in range(3)]

durations = 0
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            if m.name == "http.server.request.duration":
                durations += sum(p.count for p in m.data.data_points)
spans = exporter.get_finished_spans()
print(json.dumps({{
    "server_spans": [s.name for s in spans if s.kind == trace.SpanKind.SERVER],
    "scopes": sorted({{s.instrumentation_scope.name for s in spans}}),
    "durations": durations,
    "ids": ids,
    "trace_ids": [format(s.context.trace_id, "032x") for s in spans],
}}))
"""

CASES = {
    "fastapi-native-telemetry-at-defaults": ("", "otelkit.instrument(app)"),
    "contrib-instrument-app-before": (
        "",
        "FastAPIInstrumentor.instrument_app(app)\notelkit.instrument(app)",
    ),
    "contrib-instrument-app-after": (
        "",
        "otelkit.instrument(app)\nFastAPIInstrumentor.instrument_app(app)",
    ),
    "contrib-class-patch-like-the-launcher": (
        "FastAPIInstrumentor().instrument()",
        "otelkit.instrument(app)",
    ),
}


def _run(before_import: str, setup: str) -> dict[str, object]:
    code = SCRIPT.format(before_import=before_import, setup=setup)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=base_env({"LOG_LEVEL": "WARNING"}),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    return dict(json.loads(last))


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_server_span_and_one_duration_per_request(case: str) -> None:
    outcome = _run(*CASES[case])
    assert outcome["server_spans"] == ["GET /items/{item_id}"] * 3
    assert outcome["scopes"] == ["otelkit"]
    assert outcome["durations"] == 3
    assert outcome["ids"] == outcome["trace_ids"]


def test_without_otelkit_the_other_instrumentations_do_make_spans() -> None:
    """The control: the cases above would fail if otelkit did nothing about them."""
    outcome = _run("", "FastAPIInstrumentor.instrument_app(app)")
    assert len(outcome["server_spans"]) >= 3  # type: ignore[arg-type]
    native = _run("", "")
    assert native["server_spans"]
