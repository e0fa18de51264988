"""A real Prometheus server scrapes the example service; the users' queries must work.

The queries are the ones the first user's dashboards and habits rely on:
``rate(http_requests_total[5m])``, the p95 from the duration histogram, the
5xx rate and ``increase(models_created_total[1h])``.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from otelkit.metrics import DURATION_BUCKETS
from tests.support.otlp import OtlpReceiver
from tests.support.prometheus import PrometheusServer
from tests.support.servers import Server, serve, uvicorn

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    app: Server
    prometheus: PrometheusServer
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with OtlpReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "LOG_LEVEL": "INFO",
        }
        with serve(uvicorn(), env=env) as app:
            target = f"127.0.0.1:{app.port}"
            with PrometheusServer([target], scrape_interval="1s", exemplars=True) as prometheus:
                prometheus.wait_for_scrape()
                yield Stack(app, prometheus, receiver)


REQUESTS = {
    # kind: (method, path, body, expected status, how many)
    "projects": ("GET", "/api/v1/projects", None, 200, 30),
    "project": ("GET", "/api/v1/projects/1", None, 200, 10),
    "not_found": ("GET", "/api/v1/projects/999", None, 404, 5),
    "modeling": ("POST", "/api/v1/modeling", {"project_id": 1, "name": "a"}, 201, 5),
    "boom": ("GET", "/api/v1/boom", None, 500, 3),
    "sims": ("POST", "/api/v1/simulations", {"model_id": 1}, 200, 40),
}


def _drive(stack: Stack) -> dict[str, int]:
    """A known mix of requests; returns how many of each kind were sent.

    One request of each kind goes first, then a scrape: Prometheus cannot
    see a series being born, so rate() and increase() need a sample of
    every series before the rest of the traffic arrives.
    """
    sent = dict.fromkeys(REQUESTS, 0)
    with httpx.Client(base_url=stack.app.url, timeout=10) as client:

        def send(kind: str) -> None:
            method, path, body, status, _ = REQUESTS[kind]
            assert client.request(method, path, json=body).status_code == status
            sent[kind] += 1

        for kind in REQUESTS:
            send(kind)
        stack.prometheus.wait_until(
            lambda: (
                stack.prometheus.query_scalar("count(http_requests_total)") == len(REQUESTS)
                and stack.prometheus.query_scalar("sum(models_created_total)") == 1
            ),
            15,
            message="a scrape with every series",
        )
        for kind, (*_, count) in REQUESTS.items():
            for _ in range(count - 1):
                send(kind)
    return sent


@pytest.fixture(scope="module")
def driven(stack: Stack) -> dict[str, int]:
    sent = _drive(stack)
    total = sum(sent.values())
    stack.prometheus.wait_until(
        lambda: stack.prometheus.query_scalar("sum(http_requests_total)") == total,
        20,
        message=f"Prometheus to see {total} requests",
    )
    return sent


def _by(results: list[dict], label: str) -> dict[str, float]:
    return {item["metric"].get(label, ""): float(item["value"][1]) for item in results}


def test_counts_are_exact(stack: Stack, driven: dict[str, int]) -> None:
    counts = _by(
        stack.prometheus.query("sum by (endpoint, status) (http_requests_total)"), "endpoint"
    )
    assert counts["/api/v1/projects"] == driven["projects"]
    assert counts["/api/v1/boom"] == driven["boom"]
    assert counts["/api/v1/modeling"] == driven["modeling"]
    assert counts["/api/v1/simulations"] == driven["sims"]
    project = stack.prometheus.query(
        'http_requests_total{endpoint="/api/v1/projects/{project_id}"}'
    )
    assert {item["metric"]["status"]: float(item["value"][1]) for item in project} == {
        "200": driven["project"],
        "404": driven["not_found"],
    }


def test_request_rate_query(stack: Stack, driven: dict[str, int]) -> None:
    rates = stack.prometheus.query("rate(http_requests_total[5m])")
    endpoints = {item["metric"]["endpoint"] for item in rates}
    assert endpoints == {
        "/api/v1/projects",
        "/api/v1/projects/{project_id}",
        "/api/v1/modeling",
        "/api/v1/boom",
        "/api/v1/simulations",
    }
    assert all(
        float(item["value"][1]) > 0
        for item in rates
        if item["metric"]["endpoint"] != "/api/v1/modeling"
    )


def test_5xx_rate_query(stack: Stack, driven: dict[str, int]) -> None:
    errors = stack.prometheus.query('rate(http_requests_total{status=~"5.."}[5m])')
    assert [(item["metric"]["endpoint"], item["metric"]["status"]) for item in errors] == [
        ("/api/v1/boom", "500")
    ]
    assert float(errors[0]["value"][1]) > 0


def test_models_created_increase_query(stack: Stack, driven: dict[str, int]) -> None:
    increase = stack.prometheus.query_scalar("sum(increase(models_created_total[1h]))")
    assert increase is not None
    # Every model was created within the hour, so the true answer is all of
    # them. increase() extrapolates to the window's edges (and towards zero
    # for a young series) by design, so it lands near, not on, that number;
    # the raw counter, which the rate is made from, is exact.
    assert abs(increase - driven["modeling"]) < 1, increase
    assert stack.prometheus.query_scalar("sum(models_created_total)") == driven["modeling"]


def test_p95_is_within_one_bucket_of_the_truth(stack: Stack, driven: dict[str, int]) -> None:
    durations = sorted(
        line["duration_ms"] / 1000
        for line in stack.app.json_lines()
        if line.get("event") == "http_request_completed"
        and line.get("route") == "/api/v1/simulations"
    )
    assert len(durations) == driven["sims"]
    true_p95 = durations[math.ceil(0.95 * len(durations)) - 1]
    results = stack.prometheus.query(
        "histogram_quantile(0.95, rate(http_request_duration_seconds_bucket[5m]))"
    )
    estimate = _by(results, "endpoint")["/api/v1/simulations"]
    bounds = list(DURATION_BUCKETS)
    true_bucket = bisect.bisect_left(bounds, true_p95)
    estimated_bucket = bisect.bisect_left(bounds, estimate)
    assert abs(true_bucket - estimated_bucket) <= 1, (true_p95, estimate)


def test_exemplars_link_to_exported_traces(stack: Stack, driven: dict[str, int]) -> None:
    def exemplar_trace_ids() -> set[str]:
        found = stack.prometheus.query_exemplars(
            'http_request_duration_seconds_bucket{endpoint="/api/v1/simulations"}',
            start=time.time() - 600,
        )
        return {e["labels"]["trace_id"] for series in found for e in series["exemplars"]}

    trace_ids = stack.prometheus.wait_until(exemplar_trace_ids, 15, message="exemplars")
    received = stack.receiver.wait_for(
        lambda: {s.trace_id for s in stack.receiver.spans("POST /api/v1/simulations")} & trace_ids,
        15,
    )
    assert received


def test_scrape_has_no_scope_label_noise_but_target_info(
    stack: Stack, driven: dict[str, int]
) -> None:
    assert stack.prometheus.query('count({otel_scope_name!=""})') == []
    info = stack.prometheus.query("target_info")
    assert info[0]["metric"]["service_name"] == "modelling-backend"
    assert info[0]["metric"]["deployment_environment_name"] == "production"
