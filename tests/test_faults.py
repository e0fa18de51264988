"""Operator faults: the service never pays for its telemetry.

The collector refused, blackholed, slow or flapping; SIGTERM under load; bad
configuration. Every case is bounded in time and count, on loopback only.
"""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.otlp import Blackhole, OtlpReceiver, free_port
from tests.support.servers import Server, base_env, serve, uvicorn

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUESTS = 300


def _env(endpoint: str, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2000",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_BSP_MAX_QUEUE_SIZE": "128",
        "OTEL_METRICS_EXPORTER": "otlp,prometheus",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "LOG_LEVEL": "INFO",
    } | extra


def _p50(server: Server, count: int = REQUESTS) -> float:
    durations = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(count):
            started = time.perf_counter()
            assert client.get("/api/v1/projects").status_code == 200
            durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _dropped(server: Server, signal_name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(
        rf'^otelkit_exporter_dropped_total\{{signal="{signal_name}"\}} (\S+)$', text, re.M
    )
    assert match, text[-500:]
    return float(match.group(1))


def _stop_timed(server: Server) -> float:
    started = time.monotonic()
    server.stop(signal.SIGTERM, timeout=30)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def baseline_p50() -> float:
    with OtlpReceiver() as receiver, serve(uvicorn(), env=_env(receiver.grpc_endpoint)) as server:
        _p50(server, 50)  # warm up
        return _p50(server)


@contextmanager
def _refused() -> Iterator[str]:
    yield f"http://127.0.0.1:{free_port()}"


@contextmanager
def _blackholed() -> Iterator[str]:
    with Blackhole() as hole:
        yield hole.endpoint


@contextmanager
def _slow() -> Iterator[str]:
    with OtlpReceiver(mode="slow", delay=5.0) as receiver:
        yield receiver.grpc_endpoint


@contextmanager
def _unavailable() -> Iterator[str]:
    with OtlpReceiver(mode="unavailable") as receiver:
        yield receiver.grpc_endpoint


FAULTS: dict[str, Callable[[], object]] = {
    "refused": _refused,
    "blackholed": _blackholed,
    "slow": _slow,
    "unavailable": _unavailable,
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_collector_fault_costs_nothing_but_telemetry(fault: str, baseline_p50: float) -> None:
    with FAULTS[fault]() as endpoint, serve(uvicorn(), env=_env(endpoint)) as server:  # type: ignore[attr-defined]
        _p50(server, 50)
        rss_before = _rss_kib(server.process.pid)
        p50 = _p50(server)
        p50_more = _p50(server)
        rss_after = _rss_kib(server.process.pid)
        time.sleep(3)  # let exports fail a few times
        dropped = _dropped(server, "traces")
        elapsed = _stop_timed(server)
        output = server.output()
    # Requests do not wait for the collector.
    assert p50 < baseline_p50 * 3 + 0.005, (p50, baseline_p50)
    assert p50_more < baseline_p50 * 3 + 0.005, (p50_more, baseline_p50)
    # The queue is bounded: what does not fit is dropped and counted, memory stays flat.
    assert dropped > 0
    assert rss_after - rss_before < 20_000, (rss_before, rss_after)
    # Shutdown does not wait for a collector that will never answer.
    assert elapsed < 5.0, elapsed
    # One warning per kind of failure, not one per batch.
    warnings = [
        line
        for line in output.splitlines()
        if '"level":"warning"' in line or '"level":"error"' in line
    ]
    assert len(warnings) <= 8, "\n".join(warnings)


def test_flapping_collector_telemetry_resumes() -> None:
    with OtlpReceiver() as receiver, serve(uvicorn(), env=_env(receiver.grpc_endpoint)) as server:
        httpx.get(f"{server.url}/api/v1/projects")
        receiver.wait_for_span("GET /api/v1/projects")
        receiver.stop()
        down_ids = {
            httpx.get(f"{server.url}/api/v1/projects/1").headers["x-request-id"] for _ in range(20)
        }
        time.sleep(1.0)
        receiver.start()
        up_ids = {
            httpx.get(f"{server.url}/api/v1/projects/2").headers["x-request-id"] for _ in range(20)
        }
        receiver.wait_for(
            lambda: up_ids <= {s.trace_id for s in receiver.spans()} or None,
            15,
            message="spans sent after the collector came back",
        )
        receiver.wait_for(lambda: receiver.metrics("http_requests"), 10)
        dropped = _dropped(server, "traces")
    received = {s.trace_id for s in receiver.spans()}
    # What could not be delivered while it was down is counted, not lost silently.
    assert len(down_ids - received) <= dropped


def test_sigterm_under_load_delivers_every_answered_request() -> None:
    with OtlpReceiver() as receiver:
        env = _env(
            receiver.grpc_endpoint,
            OTEL_BSP_SCHEDULE_DELAY="5000",
            OTEL_BSP_MAX_QUEUE_SIZE="8192",
            OTEL_METRIC_EXPORT_INTERVAL="60000",
        )
        with serve(uvicorn(), env=env) as server:
            answered: list[str] = []
            stop = threading.Event()

            def load() -> None:
                with httpx.Client(base_url=server.url, timeout=5) as client:
                    while not stop.is_set():
                        try:
                            response = client.get("/api/v1/projects")
                        except httpx.HTTPError:
                            return  # the server is going away
                        if response.status_code == 200:
                            answered.append(response.headers["x-request-id"])

            workers = [threading.Thread(target=load) for _ in range(4)]
            for worker in workers:
                worker.start()
            time.sleep(1.5)
            elapsed = _stop_timed(server)
            stop.set()
            for worker in workers:
                worker.join(10)
    assert len(answered) > 50
    assert elapsed < 5.0
    received = {s.trace_id for s in receiver.spans("GET /api/v1/projects")}
    missing = set(answered) - received
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no span"
    exported = max(
        (
            p.value
            for p in receiver.metrics("http_requests")
            if p.attributes.get("endpoint") == "/api/v1/projects"
        ),
        default=0,
    )
    assert exported >= len(answered)


BAD_CONFIGURATION = {
    "LOG_LEVEL": ("loud", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    "OTEL_TRACES_SAMPLER_ARG": ("half", "a number from 0 to 1"),
    "OTEL_EXPORTER_OTLP_HEADERS": ("api-key", "key=value pairs"),
    "OTEL_TRACES_EXPORTER": ("jaeger", "otlp, console, none"),
}


@pytest.mark.parametrize("variable", sorted(BAD_CONFIGURATION))
def test_bad_configuration_fails_at_start_up_with_one_clear_message(variable: str) -> None:
    value, accepted = BAD_CONFIGURATION[variable]
    env = {variable: value}
    if variable == "OTEL_TRACES_SAMPLER_ARG":
        env["OTEL_TRACES_SAMPLER"] = "traceidratio"
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "examples.modelling.app:app", "--port", str(free_port())],
        env=base_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    messages = [line for line in output.splitlines() if "otelkit: invalid" in line]
    assert len(messages) == 1, output
    assert variable in messages[0]
    assert repr(value) in messages[0]
    assert accepted in messages[0]
