"""HTTP and business metrics as Prometheus shows them, in process."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient

import otelkit
from otelkit.testing import CapturedTelemetry, capture
from tests.apps import make_app

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` in an exposition, or None."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(
            re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(3) or "")
        )
        if found == labels:
            return float(match.group(4))
    return None


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = make_app()
    with capture(app), TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_http_metric_names_and_labels_are_the_dashboards(client: TestClient) -> None:
    for _ in range(3):
        client.get("/items/1")
    client.get("/items/2")
    client.get("/missing")
    client.get("/boom")
    text = client.get("/metrics").text
    assert (
        sample(text, "http_requests_total", method="GET", endpoint="/items/{item_id}", status="200")
        == 4
    )
    assert sample(text, "http_requests_total", method="GET", endpoint="/missing", status="404") == 1
    assert sample(text, "http_requests_total", method="GET", endpoint="/boom", status="500") == 1
    assert (
        sample(
            text, "http_request_duration_seconds_count", method="GET", endpoint="/items/{item_id}"
        )
        == 4
    )
    assert (
        sample(
            text,
            "http_request_duration_seconds_bucket",
            method="GET",
            endpoint="/items/{item_id}",
            le="10.0",
        )
        == 4
    )
    assert (
        sample(
            text,
            "http_request_duration_seconds_bucket",
            method="GET",
            endpoint="/items/{item_id}",
            le="+Inf",
        )
        == 4
    )
    assert sample(text, "errors_total", error_type="client_error", endpoint="/missing") == 1
    assert sample(text, "errors_total", error_type="exception", endpoint="/boom") == 1
    assert sample(text, "exceptions_total", exception_type="RuntimeError") == 1
    assert sample(text, "http_requests_in_progress", method="GET", endpoint="/items/{item_id}") == 0
    assert "# TYPE http_requests_total counter" in text
    assert "# TYPE http_request_duration_seconds histogram" in text
    assert "otel_scope" not in text
    assert re.search(r'^target_info\{.*service_name="test".*\} 1$', text, re.M)


def test_duration_buckets_are_seconds_for_web_latencies(client: TestClient) -> None:
    client.get("/items/1")
    text = client.get("/metrics").text
    bounds = re.findall(r'^http_request_duration_seconds_bucket\{.*le="([^"]+)"\}', text, re.M)
    assert bounds[:3] == ["0.005", "0.01", "0.025"]
    assert bounds[-2:] == ["10.0", "+Inf"]


def test_server_errors_are_counted_by_type() -> None:
    from fastapi import HTTPException

    app = FastAPI()

    @app.get("/unavailable")
    async def unavailable() -> None:
        raise HTTPException(503, "down")

    with capture(app), TestClient(app) as client:
        client.get("/unavailable")
        text = client.get("/metrics").text
    assert sample(text, "errors_total", error_type="server_error", endpoint="/unavailable") == 1
    assert sample(text, "exceptions_total", exception_type="RuntimeError") is None


def test_unmatched_paths_collapse_to_one_series(client: TestClient) -> None:
    for i in range(200):
        client.get(f"/random/{i}/path")
    text = client.get("/metrics").text
    assert (
        sample(text, "http_requests_total", method="GET", endpoint="<unmatched>", status="404")
        == 200
    )
    assert "/random/" not in text


def test_unknown_methods_collapse_to_other(client: TestClient) -> None:
    for method in ("FOO", "BAR", "PROPFIND"):
        client.request(method, "/items/1")
    text = client.get("/metrics").text
    counts = [
        line
        for line in text.splitlines()
        if line.startswith("http_requests_total") and 'method="_OTHER"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counts) == 3
    assert "FOO" not in text


def test_excluded_and_metrics_paths_are_not_counted(client: TestClient) -> None:
    client.get("/health")
    client.get("/metrics")
    client.get("/items/1")
    text = client.get("/metrics").text
    assert 'endpoint="/health"' not in text
    assert 'endpoint="/metrics"' not in text
    assert "<unmatched>" not in text


def test_metrics_path_is_configurable_and_never_counted() -> None:
    app = make_app()
    with (
        capture(app, metrics_path="/internal/prom", excluded_paths="/health"),
        TestClient(app) as client,
    ):
        client.get("/items/1")
        response = client.get("/internal/prom")
        assert response.status_code == 200
        assert client.get("/metrics").status_code == 404
        text = client.get("/internal/prom").text
    assert "/internal/prom" not in text
    assert (
        sample(text, "http_requests_total", method="GET", endpoint="<unmatched>", status="404") == 1
    )


def test_background_tasks_do_not_count_in_the_duration() -> None:
    app = FastAPI()

    @app.get("/slow-background")
    async def slow_background(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(time.sleep, 0.3)
        return {}

    with capture(app), TestClient(app) as client:
        client.get("/slow-background")
        text = client.get("/metrics").text
    total = sample(
        text, "http_request_duration_seconds_sum", method="GET", endpoint="/slow-background"
    )
    assert total is not None
    assert total < 0.2


def test_in_progress_counts_requests_being_served() -> None:
    app = FastAPI()
    entered = asyncio.Event()
    release = asyncio.Event()

    @app.get("/wait/{name}")
    async def wait(name: str) -> dict[str, str]:
        entered.set()
        await release.wait()
        return {}

    async def scenario() -> tuple[str, str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            pending = [asyncio.create_task(client.get(f"/wait/{i}")) for i in range(3)]
            await entered.wait()
            await asyncio.sleep(0.01)
            during = (await client.get("/metrics")).text
            release.set()
            await asyncio.gather(*pending)
            after = (await client.get("/metrics")).text
        return during, after

    with capture(app):
        during, after = asyncio.run(scenario())
    labels = {"method": "GET", "endpoint": "/wait/{name}"}
    assert sample(during, "http_requests_in_progress", **labels) == 3
    assert sample(after, "http_requests_in_progress", **labels) == 0
    assert (
        sample(during, "http_server_active_requests", http_request_method="GET", url_scheme="http")
        == 3
    )


def test_semantic_convention_metrics_on_by_default_and_optional() -> None:
    app = make_app()
    with capture(app), TestClient(app) as client:
        client.get("/items/1")
        text = client.get("/metrics").text
    assert (
        sample(
            text,
            "http_server_request_duration_seconds_count",
            http_request_method="GET",
            http_route="/items/{item_id}",
            http_response_status_code="200",
            url_scheme="http",
        )
        == 1
    )
    app = make_app()
    with capture(app, semconv_metrics=False), TestClient(app) as client:
        client.get("/items/1")
        text = client.get("/metrics").text
    assert "http_server_request_duration" not in text
    assert "http_requests_total" in text


def test_openmetrics_with_exemplars_carrying_the_trace_id(client: TestClient) -> None:
    response = client.get("/items/1")
    trace_id = response.headers["x-request-id"]
    scrape = client.get("/metrics", headers={"Accept": OPENMETRICS})
    assert scrape.headers["content-type"].startswith("application/openmetrics-text")
    text = scrape.text
    assert text.endswith("# EOF\n")
    assert "# TYPE http_requests counter" in text
    exemplar = re.search(
        r'^http_request_duration_seconds_bucket\{endpoint="/items/\{item_id\}",method="GET",'
        r'le="[^"]+"\} \d+ # \{trace_id="([0-9a-f]{32})",span_id="([0-9a-f]{16})"\} \S+ \S+$',
        text,
        re.M,
    )
    assert exemplar is not None
    assert exemplar.group(1) == trace_id
    plain = client.get("/metrics").text
    assert "trace_id" not in plain
    assert "# EOF" not in plain


def test_sampled_out_requests_carry_no_exemplar() -> None:
    app = make_app()
    not_sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    with capture(app), TestClient(app) as client:
        client.get("/items/1", headers={"traceparent": not_sampled})
        text = client.get("/metrics", headers={"Accept": OPENMETRICS}).text
    assert "trace_id" not in text
    assert "http_request_duration_seconds_bucket" in text


# --- business metrics -----------------------------------------------------


def test_business_metrics_are_declared_once_and_recorded_anywhere(client: TestClient) -> None:
    models = otelkit.counter("models_created", "Total 3D models created", labels=("model_type",))
    assert (
        otelkit.counter("models_created", "Total 3D models created", labels=("model_type",))
        is models
    )
    budgets = otelkit.counter("budget_calculations", "Total budget calculations")
    queue = otelkit.up_down_counter("render_queue", "Jobs waiting", labels=("kind",))
    temperature = otelkit.gauge("printer_temperature", "Nozzle", unit="Cel", labels=("printer",))
    solve = otelkit.histogram(
        "solve_time", "Solver", unit="s", labels=("simulation_type",), buckets=(0.1, 1, 10)
    )
    models.add(1, model_type="cadquery")
    models.add(2, model_type="cadquery")
    budgets.add()
    queue.add(3, kind="stl")
    queue.add(-1, kind="stl")
    temperature.set(210.5, printer="p1")
    solve.record(0.5, simulation_type="structural")
    text = client.get("/metrics").text
    assert sample(text, "models_created_total", model_type="cadquery") == 3
    assert sample(text, "budget_calculations_total") == 1
    assert sample(text, "render_queue", kind="stl") == 2
    assert sample(text, "printer_temperature_celsius", printer="p1") == 210.5
    assert sample(text, "solve_time_seconds_bucket", simulation_type="structural", le="1.0") == 1
    assert sample(text, "solve_time_seconds_bucket", simulation_type="structural", le="0.1") == 0


def test_undeclared_label_is_an_error_in_development(client: TestClient) -> None:
    models = otelkit.counter("models_created", labels=("model_type",))
    with pytest.raises(ValueError, match=r"undeclared label\(s\) user_id"):
        models.add(1, model_type="cadquery", user_id="42")


def test_undeclared_label_is_dropped_in_production_without_new_series() -> None:
    app = make_app()
    with capture(app, environment="production") as telemetry, TestClient(app) as client:
        models = otelkit.counter("models_created", labels=("model_type",))
        for user in range(50):
            models.add(1, model_type="mesh", user_id=str(user))
        text = client.get("/metrics").text
    assert sample(text, "models_created_total", model_type="mesh") == 50
    assert "user_id" not in text
    warnings = telemetry.logs(event="metric_label_dropped")
    assert len(warnings) == 1
    assert warnings[0]["labels"] == ["user_id"]


def test_conflicting_declarations_and_bad_names_are_refused() -> None:
    otelkit.counter("jobs", labels=("kind",))
    with pytest.raises(ValueError, match="already declared"):
        otelkit.histogram("jobs", labels=("kind",))
    with pytest.raises(ValueError, match="already declared"):
        otelkit.counter("jobs", labels=("other",))
    with pytest.raises(ValueError, match="invalid"):
        otelkit.counter("bad name!")
    with pytest.raises(ValueError, match="invalid"):
        otelkit.counter("ok", labels=("bad-label",))
    with pytest.raises(ValueError, match="cannot decrease"):
        otelkit.counter("jobs", labels=("kind",)).add(-1, kind="x")


def test_metrics_declared_before_instrument_follow_the_provider() -> None:
    early = otelkit.counter("declared_early", "Declared at import time")
    app = make_app()
    with capture(app) as telemetry, TestClient(app) as client:
        early.add(5)
        text = client.get("/metrics").text
    assert sample(text, "declared_early_total") == 5
    assert telemetry.metric_value("declared_early") == 5


def test_prometheus_on_its_own_port() -> None:
    from tests.support.servers import free_port

    port = free_port()
    app = make_app()
    try:
        with (
            capture(app, prometheus_port=port, prometheus_host="127.0.0.1"),
            TestClient(app) as client,
        ):
            client.get("/items/1")
            assert client.get("/metrics").status_code == 404
            response = httpx.get(f"http://127.0.0.1:{port}/metrics")
            om = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS})
    finally:
        otelkit.shutdown()
    assert response.status_code == 200
    assert (
        sample(
            response.text,
            "http_requests_total",
            method="GET",
            endpoint="/items/{item_id}",
            status="200",
        )
        == 1
    )
    assert om.text.endswith("# EOF\n")
    assert 'endpoint="/metrics"' not in response.text


def test_metrics_off_removes_the_endpoint() -> None:
    app = make_app()
    with capture(app, metrics_exporter="none"), TestClient(app) as client:
        assert client.get("/metrics").status_code == 404


def test_capture_exposes_values(client: TestClient) -> None:
    telemetry: CapturedTelemetry
    app = make_app()
    with capture(app) as telemetry, TestClient(app) as other:
        other.get("/items/1")
    assert (
        telemetry.metric_value(
            "http_requests", method="GET", endpoint="/items/{item_id}", status="200"
        )
        == 1
    )
