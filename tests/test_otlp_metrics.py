"""Metrics pushed over OTLP to a real receiver: both protocols, temporality, interval."""

from __future__ import annotations

import httpx
import pytest

from tests.support.otlp import OtlpReceiver
from tests.support.servers import serve, uvicorn

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_http_and_business_metrics_are_pushed_cumulative_by_default(protocol: str) -> None:
    with OtlpReceiver() as receiver:
        env = receiver.otel_env(protocol) | {
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_TRACES_EXPORTER": "none",
        }
        with serve(uvicorn(), env=env) as server:
            for _ in range(3):
                httpx.post(f"{server.url}/api/v1/modeling", json={"project_id": 1, "name": "x"})
            receiver.wait_for(
                lambda: any(p.value == 3 for p in receiver.metrics("models_created")), 10
            )
            requests = receiver.wait_for_metric("http_requests")
            durations = receiver.wait_for_metric("http.server.request.duration")
            assert httpx.get(f"{server.url}/metrics").status_code == 404  # prometheus not chosen
    assert {p.temporality for p in requests} == {"CUMULATIVE"}
    assert requests[-1].attributes == {
        "method": "POST",
        "endpoint": "/api/v1/modeling",
        "status": "201",
    }
    assert requests[-1].is_monotonic
    assert durations[-1].kind == "histogram"
    transport = "grpc" if protocol == "grpc" else "http"
    assert {p.transport for p in requests} == {transport}
    assert requests[-1].resource["service.name"] == "modelling-backend"


def test_delta_temporality_preference_is_honoured() -> None:
    with OtlpReceiver() as receiver:
        env = receiver.otel_env("grpc") | {
            "OTEL_METRICS_EXPORTER": "otlp,prometheus",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta",
            "OTEL_TRACES_EXPORTER": "none",
        }
        with serve(uvicorn(), env=env) as server:
            httpx.get(f"{server.url}/api/v1/projects")
            points = receiver.wait_for_metric("http_requests")
            # Prometheus, on the same app, still gets cumulative totals.
            assert "http_requests_total{" in httpx.get(f"{server.url}/metrics").text
    assert {p.temporality for p in points} == {"DELTA"}


def test_export_interval_is_honoured() -> None:
    with OtlpReceiver() as receiver:
        env = receiver.otel_env("http/protobuf") | {
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_METRIC_EXPORT_INTERVAL": "60000",
            "OTEL_TRACES_EXPORTER": "none",
        }
        with serve(uvicorn(), env=env) as server:
            httpx.get(f"{server.url}/api/v1/projects")
            assert receiver.request_count("metrics") == 0  # a minute has not passed
            server.stop()
        # ...but shutdown flushes what was recorded.
        assert receiver.metrics("http_requests")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_log_lines_are_exported_as_otlp_logs_when_asked(protocol: str) -> None:
    with OtlpReceiver() as receiver:
        env = receiver.otel_env(protocol) | {
            "OTEL_LOGS_EXPORTER": "otlp",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_BLRP_SCHEDULE_DELAY": "100",
        }
        with serve(uvicorn(), env=env) as server:
            request_id = httpx.get(f"{server.url}/api/v1/projects").headers["x-request-id"]
            receiver.wait_for(
                lambda: [r for r in receiver.logs() if r.body == "http_request_completed"], 10
            )
    records = {r.body: r for r in receiver.logs()}
    access = records["http_request_completed"]
    assert access.severity_text == "INFO"
    assert access.attributes["request_id"] == request_id
    assert access.attributes["route"] == "/api/v1/projects"
    assert access.attributes["service"] == "modelling-backend"
    assert records["projects_listed"].attributes["count"] == 3
    assert access.trace_id == request_id  # the record carries the request's trace
