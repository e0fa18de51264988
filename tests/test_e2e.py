"""End to end: the example service under a real uvicorn, exporting to a real receiver."""

from __future__ import annotations

import re
import signal
import socket
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.support.otlp import OtlpReceiver
from tests.support.servers import serve, uvicorn

pytestmark = pytest.mark.integration

HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


def _otlp_env(receiver: OtlpReceiver, protocol: str) -> dict[str, str]:
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=acme,api-key=k%3D1",
        "OTEL_SERVICE_NAME": "modelling-e2e",
        "OTEL_RESOURCE_ATTRIBUTES": "service.version=9.9.9,deployment.environment.name=staging",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_reach_the_collector_over_both_protocols(
    receiver: OtlpReceiver, protocol: str
) -> None:
    with serve(uvicorn(), env=_otlp_env(receiver, protocol)) as server:
        response = httpx.get(f"{server.url}/api/v1/projects/2")
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        span = receiver.wait_for_span("GET /api/v1/projects/{project_id}")
    assert span.trace_id == request_id
    assert span.kind == "SERVER"
    assert span.attributes["request.id"] == request_id
    assert span.attributes["http.route"] == "/api/v1/projects/{project_id}"
    assert span.resource["service.name"] == "modelling-e2e"
    assert span.resource["service.version"] == "9.9.9"
    assert span.resource["deployment.environment.name"] == "staging"
    assert span.transport == ("grpc" if protocol == "grpc" else "http")
    (request, *_) = receiver.requests("traces")
    assert request.headers["x-tenant"] == "acme"
    assert request.headers["api-key"] == "k=1"


def test_traces_endpoint_variable_wins(receiver: OtlpReceiver) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.http_endpoint}/v1/traces",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # nothing there
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with serve(uvicorn(), env=env) as server:
        httpx.get(f"{server.url}/api/v1/projects")
        receiver.wait_for_span("GET /api/v1/projects")


def test_spans_are_flushed_on_shutdown(receiver: OtlpReceiver) -> None:
    env = _otlp_env(receiver, "grpc") | {"OTEL_BSP_SCHEDULE_DELAY": "600000"}
    with serve(uvicorn(), env=env) as server:
        for _ in range(3):
            assert httpx.get(f"{server.url}/api/v1/projects").status_code == 200
        assert receiver.spans() == []  # the batch waits for its (long) delay
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert server.stop(signal.SIGTERM) in {0, -signal.SIGTERM}
        assert "Application shutdown complete." in server.output()
    assert len(receiver.spans("GET /api/v1/projects")) == 3


def test_sampled_out_requests_still_get_a_trace_id_as_request_id(receiver: OtlpReceiver) -> None:
    env = _otlp_env(receiver, "grpc") | {"OTEL_TRACES_SAMPLER": "always_off"}
    with serve(uvicorn(), env=env) as server:
        response = httpx.get(f"{server.url}/api/v1/projects")
        assert HEX32.fullmatch(response.headers["x-request-id"])
        assert response.headers["traceresponse"].endswith("-00")
        server.stop()
        lines = server.json_lines()
    assert receiver.spans() == []
    (access,) = [line for line in lines if line.get("event") == "http_request_completed"]
    assert access["request_id"] == response.headers["x-request-id"]


def test_ratio_sampler_argument(receiver: OtlpReceiver) -> None:
    env = _otlp_env(receiver, "grpc") | {
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    with serve(uvicorn(), env=env) as server:
        httpx.get(f"{server.url}/api/v1/projects")
    assert receiver.spans() == []


def test_console_exporter_prints_spans() -> None:
    env = {"OTEL_TRACES_EXPORTER": "console"}
    with serve(uvicorn(), env=env) as server:
        httpx.get(f"{server.url}/api/v1/projects")
        server.stop()
        assert '"name": "GET /api/v1/projects"' in server.output()


def test_unhandled_exception_is_logged_once_with_its_trace(receiver: OtlpReceiver) -> None:
    with serve(uvicorn(), env=_otlp_env(receiver, "http/protobuf")) as server:
        response = httpx.get(f"{server.url}/api/v1/boom")
        assert response.status_code == 500
        request_id = response.headers["x-request-id"]
        assert response.json() == {"detail": "Internal Server Error", "request_id": request_id}
        span = receiver.wait_for_span("GET /api/v1/boom")
        server.stop()
        output = server.output()
        errors = [line for line in server.json_lines() if line.get("level") == "error"]
    assert output.count("Traceback (most recent call last)") == 1
    assert "Exception in ASGI application" not in output
    assert span.status_code == "ERROR"
    assert [name for name, _ in span.events] == ["exception"]
    (error,) = errors
    assert error["event"] == "http_request_completed"
    assert error["request_id"] == request_id
    assert "RuntimeError: simulated failure" in error["exception"]


def test_logs_under_uvicorn_are_json_with_ids_and_one_access_line() -> None:
    with serve(uvicorn(), env={"LOG_LEVEL": "INFO"}) as server:
        response = httpx.get(f"{server.url}/api/v1/projects")
        server.stop()
        lines = server.json_lines()
        output = server.output()
    request_id = response.headers["x-request-id"]
    non_json = [line for line in output.splitlines() if line and not line.startswith("{")]
    assert non_json == []
    for line in lines:
        assert {
            "timestamp",
            "level",
            "logger",
            "event",
            "service",
            "version",
            "environment",
        } <= set(line)
    assert any(line["logger"] == "uvicorn.error" for line in lines)
    in_request = [line for line in lines if line.get("request_id") == request_id]
    assert [line["event"] for line in in_request] == ["projects_listed", "http_request_completed"]
    assert all(line["trace_id"] == request_id for line in in_request)
    assert not any("GET /api/v1/projects HTTP/1.1" in line["event"] for line in lines)


class _Listener:
    """Counts TCP connections to a port, to prove nobody tried to export."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_without_an_endpoint_nothing_connects_anywhere() -> None:
    try:
        listeners = [_Listener(4317), _Listener(4318)]
    except OSError:
        pytest.skip("the default OTLP ports are in use on this machine")
    try:
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp,prometheus",
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        with serve(uvicorn(), env=env) as server:
            for _ in range(5):
                httpx.get(f"{server.url}/api/v1/projects")
            server.stop()
    finally:
        for listener in listeners:
            listener.close()
    assert [listener.connections for listener in listeners] == [0, 0]


def test_demo_command_runs_the_example_and_shows_traces() -> None:
    argv = [sys.executable, "-m", "otelkit.cli", "demo", "--port", "{port}"]
    with serve(argv) as server:
        response = httpx.post(
            f"{server.url}/api/v1/modeling",
            json={"project_id": 1, "name": "bracket", "model_type": "cadquery"},
        )
        assert response.status_code == 201
        request_id = response.headers["x-request-id"]
        for path in ("/api/v1/projects", "/api/v1/projects/1"):
            assert httpx.get(server.url + path).status_code == 200
        assert httpx.post(f"{server.url}/api/v1/simulations", json={"model_id": 1}).is_success
        budget = {"material": "pla", "volume_cm3": 10}
        assert httpx.post(f"{server.url}/api/v1/budgets", json=budget).is_success
        assert httpx.get(f"{server.url}/api/v1/boom").status_code == 500
        traces = httpx.get(
            f"{server.url}/debug/traces", headers={"Accept": "application/json"}
        ).json()
        page = httpx.get(f"{server.url}/debug/traces").text
        server.stop()
        output = server.output()
    assert any(t["trace_id"] == request_id and t["root"] == "POST /api/v1/modeling" for t in traces)
    (modeling,) = [t for t in traces if t["trace_id"] == request_id]
    assert "validate_geometry" in {s["name"] for s in modeling["spans"]}
    assert request_id in page
    assert "http://127.0.0.1:" in output
    assert "/debug/traces" in output
    assert "/metrics" in output


@pytest.mark.parametrize("uvicorn_flag", ["--no-access-log", "--access-log"])
def test_with_otelkit_access_log_off_the_server_keeps_its_own(uvicorn_flag: str) -> None:
    env = {"OTELKIT_ACCESS_LOG": "false"}
    with serve(uvicorn("examples.modelling.app:app", uvicorn_flag), env=env) as server:
        httpx.get(f"{server.url}/api/v1/projects")
        server.stop()
        output = server.output()
    assert "http_request_completed" not in output
    uvicorn_line = '"GET /api/v1/projects HTTP/1.1" 200'
    assert (uvicorn_line in output) == (uvicorn_flag == "--access-log")


def test_log_level_also_applies_to_the_servers_loggers() -> None:
    with serve(uvicorn(), env={"LOG_LEVEL": "WARNING"}) as server:
        httpx.get(f"{server.url}/api/v1/projects")
        server.stop()
        output = server.output()
    assert "Uvicorn running on" not in output
    assert "Started server process" not in output
