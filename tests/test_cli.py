"""The otelkit command line, end to end, as a person and as a script use it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.otlp import OtlpReceiver
from tests.support.servers import base_env, free_port, serve, uvicorn


def otelkit(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otelkit.cli", *args],
        env=base_env(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- check ----------------------------------------------------------------


def test_check_shows_each_setting_its_value_and_source() -> None:
    result = otelkit("check", env={"LOG_FORMAT": "console", "OTEL_SERVICE_NAME": "svc"})
    assert result.returncode == 0, result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line}
    assert rows["log_format"][-2:] == ["console", "environment"]
    assert rows["service_name"][-2:] == ["svc", "environment"]
    assert rows["request_id_header"][-2:] == ["X-Request-ID", "default"]
    assert rows["log_level"][-2:] == ["INFO", "default"]
    assert "\x1b[" not in result.stdout  # no colour when not on a terminal
    assert "configuration is valid" in result.stdout


def test_check_json_lists_every_problem_and_exits_non_zero() -> None:
    result = otelkit(
        "check",
        "--json",
        env={
            "LOG_LEVEL": "loud",
            "OTEL_TRACES_SAMPLER": "x",
            "OTEL_EXPORTER_OTLP_HEADERS": "broken",
        },
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    problems = {p["setting"]: p["problem"] for p in report["problems"]}
    assert set(problems) == {"log_level", "traces_sampler", "otlp_headers"}
    assert "LOG_LEVEL='loud'" in problems["log_level"]
    assert "DEBUG, INFO" in problems["log_level"]
    assert "OTEL_TRACES_SAMPLER" in problems["traces_sampler"]
    settings = {s["setting"]: s for s in report["settings"]}
    assert settings["log_format"] == {
        "setting": "log_format",
        "env": "LOG_FORMAT",
        "value": "json",
        "source": "default",
    }


def test_check_probes_the_otlp_endpoint() -> None:
    with OtlpReceiver() as receiver:
        ok = otelkit(
            "check",
            "--json",
            env=receiver.otel_env("grpc") | {"OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3cret"},
        )
    assert ok.returncode == 0, ok.stdout
    report = json.loads(ok.stdout)
    headers = next(s for s in report["settings"] if s["setting"] == "otlp_headers")
    assert headers["value"] == "api-key=[REDACTED]"
    assert "s3cret" not in ok.stdout
    down = otelkit("check", env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert down.returncode == 1
    assert "otlp_traces_endpoint: cannot connect to 127.0.0.1" in down.stdout


def test_check_probes_the_prometheus_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = otelkit("check", env={"OTEL_EXPORTER_PROMETHEUS_PORT": str(port)})
    assert result.returncode == 1
    assert f"prometheus_port: cannot listen on 127.0.0.1:{port}" in result.stdout
    free = otelkit("check", env={"OTEL_EXPORTER_PROMETHEUS_PORT": str(free_port())})
    assert free.returncode == 0


def test_check_flags_otlp_metrics_without_endpoint() -> None:
    result = otelkit("check", env={"OTEL_METRICS_EXPORTER": "otlp"})
    assert result.returncode == 1
    assert "no OTLP endpoint is configured" in result.stdout


# --- logs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A real server's log with a failed request and a successful one."""
    with serve(uvicorn()) as server:
        failed = httpx.get(f"{server.url}/api/v1/boom").headers["x-request-id"]
        created = httpx.post(
            f"{server.url}/api/v1/modeling", json={"project_id": 1, "name": "bracket"}
        ).headers["x-request-id"]
        time.sleep(0.1)  # the background thumbnail task logs after the response
        server.stop()
        text = server.output()
    path = tmp_path_factory.mktemp("logs") / "app.log"
    path.write_text(text)
    return path, failed, created


def test_logs_prints_the_timeline_of_one_request(server_log: tuple[Path, str, str]) -> None:
    path, _, created = server_log
    result = otelkit("logs", created, str(path))
    assert result.returncode == 0
    events = [line.split()[3] for line in result.stdout.splitlines()[2:] if line.strip()]
    assert events == [
        "model_validation_started",
        "model_created",
        "http_request_completed",
        "thumbnail_rendered",
    ]
    assert "model_type=cadquery" in result.stdout
    assert f"request {created}" in result.stdout


def test_logs_shows_the_failure_with_its_traceback(server_log: tuple[Path, str, str]) -> None:
    path, failed, _ = server_log
    result = otelkit("logs", failed, stdin=path.read_text())
    assert result.returncode == 0
    assert "about_to_fail" in result.stdout
    assert "Traceback (most recent call last)" in result.stdout
    assert "RuntimeError: simulated failure" in result.stdout


def test_logs_json_and_no_match(server_log: tuple[Path, str, str]) -> None:
    path, failed, _ = server_log
    result = otelkit("logs", "--json", failed, str(path))
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["request_id"] for r in records} == {failed}
    assert [r["event"] for r in records][-1] == "http_request_completed"
    missing = otelkit("logs", "0" * 32, str(path))
    assert missing.returncode == 1
    assert "no log line carries request id" in missing.stdout
    unreadable = otelkit("logs", failed, str(path.parent / "nope.log"))
    assert unreadable.returncode == 2


# --- demo --traffic -------------------------------------------------------


@pytest.mark.integration
def test_demo_traffic_fills_metrics_and_traces_by_itself() -> None:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "otelkit.cli",
        "demo",
        "--traffic",
        "--rate",
        "50",
        "--port",
        str(port),
    ]
    with serve(argv, port=port) as server:

        def filled() -> bool:
            text = httpx.get(f"{server.url}/metrics").text
            counts = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("http_requests_total{")
            ]
            return sum(counts) >= 30 and "models_created_total" in text

        deadline = time.monotonic() + 20
        while not filled() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert filled()
        traces = httpx.get(
            f"{server.url}/debug/traces", headers={"Accept": "application/json"}
        ).json()
        output = server.output()
    assert len(traces) >= 10
    assert {"GET /api/v1/projects", "POST /api/v1/modeling"} <= {t["root"] for t in traces}
    assert "a request mix is being sent" in output
