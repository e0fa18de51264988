"""Several workers: what Prometheus sees sums to the true totals, across restarts too."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.prometheus import PrometheusServer
from tests.support.servers import Server, serve, uvicorn

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKERS = 4


def _children(pid: int) -> list[int]:
    """The worker processes of a server (not multiprocessing's resource tracker)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    workers = []
    for child in map(int, text.split()):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            workers.append(child)
    return workers


def _servers() -> dict[str, list[str]]:
    gunicorn = [
        sys.executable,
        "-m",
        "gunicorn",
        "examples.modelling.app:app",
        "-w",
        str(WORKERS),
        "-k",
        "uvicorn.workers.UvicornWorker",
        "-b",
        "127.0.0.1:{port}",
        "--graceful-timeout",
        "5",
    ]
    return {
        "uvicorn": uvicorn("examples.modelling.app:app", "--workers", str(WORKERS)),
        "gunicorn": gunicorn,
    }


@pytest.fixture(params=["uvicorn", "gunicorn"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    directory = tmp_path / "multiproc"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "LOG_LEVEL": "WARNING"}
    with serve(_servers()[request.param], env=env, timeout=60) as running:
        # Every worker must be up before the traffic, or a few would get it all.
        deadline = time.monotonic() + 30
        while len(_children(running.process.pid)) < WORKERS and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_children(running.process.pid)) >= WORKERS
        yield running


def _send(server: Server, count: int) -> None:
    """Send ``count`` requests, each on a fresh connection, so workers share them."""
    for _ in range(count):
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/api/v1/projects").status_code == 200


def test_totals_are_exact_across_workers_and_restarts(server: Server) -> None:
    target = f"127.0.0.1:{server.port}"
    with PrometheusServer([target], scrape_interval="1s") as prometheus:
        prometheus.wait_for_scrape()
        _send(server, 120)

        def total() -> float | None:
            return prometheus.query_scalar('sum(http_requests_total{endpoint="/api/v1/projects"})')

        prometheus.wait_until(lambda: total() == 120, 20, message="120 requests in Prometheus")
        count = prometheus.query_scalar(
            'sum(http_request_duration_seconds_count{endpoint="/api/v1/projects"})'
        )
        assert count == 120
        plus_inf = prometheus.query_scalar(
            'sum(http_request_duration_seconds_bucket{endpoint="/api/v1/projects",le="+Inf"})'
        )
        assert plus_inf == 120

        # Restart a worker: its requests must still count, and no counter may
        # go backwards (a reset would make rate() lie).
        victim = _children(server.process.pid)[0]
        os.kill(victim, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while victim in _children(server.process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        while len(_children(server.process.pid)) < WORKERS and time.monotonic() < deadline:
            time.sleep(0.2)
        assert victim not in _children(server.process.pid)
        _send(server, 80)
        prometheus.wait_until(lambda: total() == 200, 20, message="200 requests in Prometheus")
        resets = prometheus.query_scalar("sum(resets(http_requests_total[5m]))")
        assert resets == 0
        in_progress = prometheus.query_scalar("sum(http_requests_in_progress)")
        assert in_progress == 0
