"""otelkit under the real ``opentelemetry-instrument`` launcher, in subprocesses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.support.otlp import OtlpReceiver
from tests.support.servers import Server, base_env, serve

pytestmark = pytest.mark.integration

LAUNCHER = shutil.which("opentelemetry-instrument") or "opentelemetry-instrument"


def launched(*server_argv: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [LAUNCHER, *flags, sys.executable, "-m", *server_argv]


def uvicorn_app(app: str = "tests.launcher.plain:app", *extra: str) -> tuple[str, ...]:
    return ("uvicorn", app, "--host", "127.0.0.1", "--port", "{port}", *extra)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


def _env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    return (
        receiver.otel_env("grpc")
        | {
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRICS_EXPORTER": "prometheus",
            "LOG_LEVEL": "INFO",
        }
        | extra
    )


def _requests(server: Server, count: int) -> list[str]:
    ids = []
    for i in range(count):
        response = httpx.get(f"{server.url}/hello/n{i}")
        assert response.status_code == 200
        ids.append(response.headers.get("x-request-id", ""))
    return ids


def test_zero_code_gives_the_same_telemetry(receiver: OtlpReceiver) -> None:
    env = _env(receiver, OTEL_PYTHON_DISTRO="otelkit")
    with serve(launched(*uvicorn_app()), env=env) as server:
        (request_id,) = _requests(server, 1)
        span = receiver.wait_for_span("GET /hello/{name}")
        metrics = httpx.get(f"{server.url}/metrics").text
        server.stop()
        lines = server.json_lines()
        output = server.output()
    assert span.trace_id == request_id
    assert span.resource["service.name"] == "plain-service"
    assert span.resource["service.version"] == "3.1.4"
    assert 'http_requests_total{endpoint="/hello/{name}",method="GET",status="200"} 1' in metrics
    hello = [line for line in lines if line.get("logger") == "plain"]
    assert [line["event"] for line in hello] == ["saying hello to n0"]
    assert hello[0]["request_id"] == request_id
    assert hello[0]["trace_id"] == request_id
    assert any(line.get("logger") == "uvicorn.error" for line in lines)
    assert [line.get("event") for line in lines].count("http_request_completed") == 1
    assert not [line for line in output.splitlines() if line and not line.startswith("{")]


COEXISTENCE = {
    "otelkit distro pinned": ("tests.launcher.plain:app", {"OTEL_PYTHON_DISTRO": "otelkit"}),
    "whatever distro the launcher finds first": ("tests.launcher.plain:app", {}),
    "opentelemetry-distro and its configurator chosen": (
        "tests.launcher.plain:app",
        {
            "OTEL_PYTHON_DISTRO": "distro",
            "OTEL_PYTHON_CONFIGURATOR": "configurator",
            "OTEL_LOGS_EXPORTER": "none",
        },
    ),
    "contrib fastapi instrumentor left on": (
        "tests.launcher.plain:app",
        {"OTEL_PYTHON_DISTRO": "distro", "OTEL_LOGS_EXPORTER": "none"},
    ),
    "the app also calls otelkit.instrument": (
        "tests.launcher.also_instrumented:app",
        {"OTEL_PYTHON_DISTRO": "otelkit"},
    ),
}


@pytest.mark.parametrize("case", sorted(COEXISTENCE))
def test_one_span_one_access_line_one_sample_per_request(receiver: OtlpReceiver, case: str) -> None:
    app, extra = COEXISTENCE[case]
    with serve(launched(*uvicorn_app(app)), env=_env(receiver, **extra)) as server:
        ids = _requests(server, 3)
        receiver.wait_for(lambda: len(receiver.spans()) >= 3, 10)
        metrics = httpx.get(f"{server.url}/metrics").text
        server.stop()
        lines = server.json_lines()
    server_spans = [s for s in receiver.spans() if s.kind == "SERVER"]
    assert sorted(s.trace_id for s in server_spans) == sorted(ids)
    assert {s.name for s in server_spans} == {"GET /hello/{name}"}
    assert [line.get("event") for line in lines].count("http_request_completed") == 3
    assert 'http_requests_total{endpoint="/hello/{name}",method="GET",status="200"} 3' in metrics
    assert 'http_request_duration_seconds_count{endpoint="/hello/{name}",method="GET"} 3' in metrics


def test_disabling_otelkit_turns_it_off(receiver: OtlpReceiver) -> None:
    env = _env(
        receiver, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="otelkit", OTEL_PYTHON_DISTRO="otelkit"
    )
    with serve(launched(*uvicorn_app()), env=env) as server:
        response = httpx.get(f"{server.url}/hello/x")
        assert "x-request-id" not in response.headers
        assert httpx.get(f"{server.url}/metrics").status_code == 404


def test_launcher_flags_set_otelkit_settings(receiver: OtlpReceiver) -> None:
    flags = ("--service_name", "flagged-service", "--otelkit_log_format", "console")
    env = _env(receiver, OTEL_PYTHON_DISTRO="otelkit")
    with serve(launched(*uvicorn_app(), flags=flags), env=env) as server:
        _requests(server, 1)
        span = receiver.wait_for_span("GET /hello/{name}")
        server.stop()
        output = server.output()
        json_lines = server.json_lines()
    assert span.resource["service.name"] == "flagged-service"
    assert "http_request_completed" in output
    assert not json_lines  # console format, not JSON


def test_bad_configuration_stops_the_program_with_a_clear_message() -> None:
    result = subprocess.run(
        launched("uvicorn", "tests.launcher.plain:app", "--port", "1"),
        env=base_env({"LOG_LEVEL": "loud", "OTEL_PYTHON_DISTRO": "otelkit"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()
    assert message == [
        "otelkit: invalid LOG_LEVEL='loud' (environment variable LOG_LEVEL); "
        "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    ]


GUNICORN = (
    "gunicorn",
    "tests.launcher.plain:app",
    "-w",
    "2",
    "-k",
    "uvicorn_worker.UvicornWorker",
    "-b",
    "127.0.0.1:{port}",
)
PRE_FORK = {
    "gunicorn": GUNICORN,
    "gunicorn --preload": (*GUNICORN, "--preload"),
    "uvicorn --workers": uvicorn_app("tests.launcher.plain:app", "--workers", "2"),
}


@pytest.mark.slow
@pytest.mark.parametrize("server_kind", sorted(PRE_FORK))
def test_exporters_work_in_every_pre_fork_worker(receiver: OtlpReceiver, server_kind: str) -> None:
    env = _env(receiver, OTEL_PYTHON_DISTRO="otelkit")
    with serve(launched(*PRE_FORK[server_kind]), env=env, timeout=60) as server:
        sent = 0
        instances: set[str] = set()
        while len(instances) < 2 and sent < 200:
            with httpx.Client(base_url=server.url) as client:  # a new connection each time
                assert client.get("/hello/w").status_code == 200
            sent += 1
            if sent % 20 == 0:
                spans = receiver.wait_for(
                    lambda n=sent: receiver.spans() if len(receiver.spans()) >= n else None, 10
                )
                instances = {s.resource.get("service.instance.id", "") for s in spans}
    assert len(instances) == 2, f"spans from {len(instances)} worker(s) after {sent} requests"
