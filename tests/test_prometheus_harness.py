"""Tests of the Prometheus test harness itself (tests/support/prometheus.py).

The harness is what the integration tests trust to say "Prometheus saw
this", so it is checked here against a target whose exposition is written
by hand: no otelkit and no prometheus_client, so a bug in either cannot hide
a bug in the harness, and the expected values are known exactly.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.prometheus import (
    PrometheusError,
    PrometheusServer,
    prometheus_binary,
    require_tool,
    wait_until,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"

# The same samples in both formats Prometheus may ask for. OpenMetrics is the
# one that carries exemplars; the counter family is named without `_total`
# there, as the OpenMetrics specification requires.
TEXT_EXPOSITION = """\
# HELP harness_requests_total Requests served, written by hand.
# TYPE harness_requests_total counter
harness_requests_total{path="/a"} 42
harness_requests_total{path="/b"} 7
# HELP harness_in_progress Requests being served.
# TYPE harness_in_progress gauge
harness_in_progress 3
"""
OPENMETRICS_EXPOSITION = f"""\
# HELP harness_requests Requests served, written by hand.
# TYPE harness_requests counter
harness_requests_total{{path="/a"}} 42 # {{trace_id="{TRACE_ID}",span_id="{SPAN_ID}"}} 1.0
harness_requests_total{{path="/b"}} 7
# HELP harness_in_progress Requests being served.
# TYPE harness_in_progress gauge
harness_in_progress 3
# EOF
"""

RULES = """\
groups:
  - name: harness
    rules:
      - record: job:harness_requests:sum
        expr: sum by (job) (harness_requests_total)
"""


@dataclass
class ExpositionServer:
    """A hand-written /metrics endpoint on 127.0.0.1, and what it was asked."""

    port: int
    accept_headers: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def exposition() -> Iterator[ExpositionServer]:
    """Serve the fixed exposition, in the format the scraper negotiates."""
    record = ExpositionServer(port=0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            record.paths.append(self.path)
            accept = self.headers.get("Accept", "")
            record.accept_headers.append(accept)
            if self.path != "/metrics":
                self.send_error(404)
                return
            if "application/openmetrics-text" in accept:
                body = OPENMETRICS_EXPOSITION.encode()
                content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"
            else:
                body = TEXT_EXPOSITION.encode()
                content_type = "text/plain; version=0.0.4; charset=utf-8"
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Keep scrapes out of the test output."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, released, not reused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.integration
def test_harness_scrapes_queries_and_stops(exposition: ExpositionServer, tmp_path: Path) -> None:
    """One real Prometheus run exercises the whole API, start to stop.

    A single run keeps the test well inside its time budget: starting
    Prometheus is fast, but the first scrape of a target comes about 6 s
    after start whatever the scrape interval.
    """
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES, encoding="utf-8")
    dead = f"127.0.0.1:{_closed_port()}"
    scrape_configs = [
        {
            "job_name": "hand-written",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [exposition.target]}],
        },
        {"job_name": "dead", "static_configs": [{"targets": [dead]}]},
    ]
    started = time.monotonic()
    with PrometheusServer(scrape_configs, rule_files=[rules]) as prom:
        process = prom.process
        assert process is not None
        assert process.poll() is None
        assert prom.url.startswith("http://127.0.0.1:")

        target = prom.wait_for_scrape("hand-written", timeout=25)
        assert target["health"] == "up"
        assert target["labels"]["instance"] == exposition.target
        assert exposition.paths[0] == "/metrics"
        # Exemplars need OpenMetrics; the harness must leave Prometheus
        # asking for it, or no exemplar test could ever pass.
        assert "application/openmetrics-text" in exposition.accept_headers[0]

        # The values served are the values queried.
        assert prom.query_scalar('harness_requests_total{path="/a"}') == 42.0
        assert prom.query_scalar("sum(harness_requests_total)") == 49.0
        assert prom.query_scalar("harness_in_progress") == 3.0
        result = prom.query('harness_requests_total{path="/b"}')
        assert len(result) == 1
        assert result[0]["metric"]["job"] == "hand-written"
        assert result[0]["value"][1] == "7"
        assert prom.query_scalar("absent_metric_name_xyz") is None
        assert prom.query("scalar(vector(5))")[0]["value"][1] == "5"
        with pytest.raises(ValueError, match="2 series"):
            prom.query_scalar("harness_requests_total")
        with pytest.raises(PrometheusError, match="bad_data"):
            prom.query("sum(")

        # The exemplar on /a arrived with its trace and span ids.
        exemplars = prom.query_exemplars(
            'harness_requests_total{path="/a"}', time.time() - 600, time.time() + 60
        )
        labels = [ex["labels"] for series in exemplars for ex in series["exemplars"]]
        assert {"trace_id": TRACE_ID, "span_id": SPAN_ID} in labels

        # Rule files are loaded and evaluated at the scrape interval.
        recorded = prom.wait_until(
            lambda: prom.query_scalar('job:harness_requests:sum{job="hand-written"}'),
            timeout=10,
            message="the recording rule",
        )
        assert recorded == 49.0

        by_job = {item["labels"]["job"]: item for item in prom.targets()}
        assert set(by_job) == {"hand-written", "dead"}

        # A target that refuses connections never counts as scraped, and the
        # error says why.
        with pytest.raises(TimeoutError, match="connection refused"):
            prom.wait_for_scrape(dead, timeout=3)

    assert prom.process is None
    assert process.poll() is not None, "prometheus still running after the with block"
    assert time.monotonic() - started < 30


@pytest.mark.integration
def test_start_up_failure_reports_prometheus_log_and_cleans_up() -> None:
    """A config Prometheus rejects fails at once, in Prometheus's own words, leaving nothing."""
    bad_job = {
        "job_name": "bad",
        "scrape_interval": "not-a-duration",
        "static_configs": [{"targets": ["127.0.0.1:9"]}],
    }
    prom = PrometheusServer([bad_job])
    started = time.monotonic()
    with pytest.raises(PrometheusError, match="not-a-duration"), prom:
        pytest.fail("the server must not start")
    assert time.monotonic() - started < 10
    assert prom.process is None
    assert prom.workdir is None


def test_string_targets_make_one_job_and_refuse_non_loopback() -> None:
    """The short form is one static job; an address off this machine is refused."""
    prom = PrometheusServer(["127.0.0.1:9", "localhost:10"], job_name="app", metrics_path="/m")
    try:
        (job,) = prom.config["scrape_configs"]
        assert job == {
            "job_name": "app",
            "metrics_path": "/m",
            "static_configs": [{"targets": ["127.0.0.1:9", "localhost:10"]}],
        }
        assert prom.config["global"]["evaluation_interval"] == "1s"
    finally:
        prom.stop()
    with pytest.raises(ValueError, match="not a loopback"):
        PrometheusServer(["10.0.0.1:9090"])
    with pytest.raises(ValueError, match="not a loopback"):
        PrometheusServer([{"job_name": "x", "static_configs": [{"targets": ["example.com:80"]}]}])
    with pytest.raises(TypeError):
        PrometheusServer(["127.0.0.1:9", {"job_name": "x"}])  # type: ignore[arg-type]


def test_missing_binary_skips_locally_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the binary a developer gets a skip; CI gets a failure, never a green skip."""
    monkeypatch.delenv("PROMETHEUS_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        prometheus_binary()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        prometheus_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        prometheus_binary()
    # An explicit path that is not an executable is reported, not ignored.
    not_executable = tmp_path / "prometheus"
    not_executable.write_text("", encoding="utf-8")
    monkeypatch.setenv("PROMETHEUS_BIN", str(not_executable))
    with pytest.raises(pytest.fail.Exception, match="not an executable"):
        prometheus_binary()


def test_explicit_binary_wins_over_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``$PROMETHEUS_BIN`` selects a binary outside ``PATH``."""
    fake = tmp_path / "my-prometheus"
    fake.write_text("#!/bin/sh\n", encoding="utf-8")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("PROMETHEUS_BIN", str(fake))
    assert prometheus_binary() == str(fake.resolve())
    monkeypatch.delenv("PROMETHEUS_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert require_tool("my-prometheus") == str(fake)


def test_wait_until_returns_first_truthy_value_and_times_out() -> None:
    """Polling returns as soon as the condition holds, and reports the last failure."""
    calls = iter([0, None, "", 7, 8])
    assert wait_until(lambda: next(calls), timeout=5, interval=0.001) == 7

    def failing() -> int:
        raise LookupError("still loading")

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="still loading"):
        wait_until(failing, timeout=0.2, interval=0.01, message="loading")
    assert time.monotonic() - started < 2
    with pytest.raises(TimeoutError, match="last value: 0"):
        wait_until(lambda: 0, timeout=0.05, interval=0.01)
