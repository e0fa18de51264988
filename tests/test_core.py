"""The core behaviour of otelkit.instrument, seen as a user sees it, in process."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from opentelemetry.trace import SpanKind, StatusCode

import otelkit
from otelkit.testing import CapturedTelemetry, capture
from tests.apps import make_app, seen

HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def app_and_telemetry() -> Iterator[tuple[TestClient, CapturedTelemetry]]:
    seen.clear()
    app = make_app()
    with capture(app) as telemetry, TestClient(app, raise_server_exceptions=False) as client:
        yield client, telemetry


@pytest.fixture
def client(app_and_telemetry: tuple[TestClient, CapturedTelemetry]) -> TestClient:
    return app_and_telemetry[0]


@pytest.fixture
def telemetry(app_and_telemetry: tuple[TestClient, CapturedTelemetry]) -> CapturedTelemetry:
    return app_and_telemetry[1]


def server_spans(telemetry: CapturedTelemetry) -> list:
    return [s for s in telemetry.spans() if s.kind == SpanKind.SERVER]


# --- request id -----------------------------------------------------------


def test_request_id_is_the_trace_id_of_the_server_span(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    response = client.get("/items/7")
    request_id = response.headers["x-request-id"]
    assert HEX32.fullmatch(request_id)
    (span,) = server_spans(telemetry)
    assert format(span.context.trace_id, "032x") == request_id
    assert span.attributes["request.id"] == request_id
    assert seen["handler_request_id"] == request_id


def test_valid_incoming_request_id_is_kept(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    incoming = "a1b2c3d4-e5f6-7890-abcd-ef1234567890"
    response = client.get("/items/7", headers={"X-Request-ID": incoming})
    assert response.headers["x-request-id"] == incoming
    (span,) = server_spans(telemetry)
    assert span.attributes["request.id"] == incoming
    (line,) = telemetry.logs(event="http_request_completed")
    assert line["request_id"] == incoming
    assert line["trace_id"] == format(span.context.trace_id, "032x")


@pytest.mark.parametrize(
    "bad",
    [
        "x" * 129,
        "-starts-with-dash",
        "=cmd|'/c calc'!A1",
        "has space",
        'quote"d',
        "semi;colon",
        "ünïcode",
        "<script>",
    ],
)
def test_invalid_incoming_request_id_is_replaced_and_logged_without_echo(
    client: TestClient, telemetry: CapturedTelemetry, bad: str
) -> None:
    response = client.get("/items/7", headers={"X-Request-ID": bad.encode()})
    request_id = response.headers["x-request-id"]
    assert request_id != bad
    assert HEX32.fullmatch(request_id)
    (warning,) = telemetry.logs(event="invalid_request_id_replaced")
    assert warning["level"] == "warning"
    assert warning["request_id"] == request_id
    assert warning["length"] == len(bad.encode())
    text = "\n".join(telemetry.log_lines())
    assert bad not in text
    assert bad.encode().decode("latin-1") not in text


def test_request_id_on_500_and_in_body(client: TestClient, telemetry: CapturedTelemetry) -> None:
    response = client.get("/boom")
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert response.json() == {"detail": "Internal Server Error", "request_id": request_id}
    (span,) = server_spans(telemetry)
    assert format(span.context.trace_id, "032x") == request_id


def test_request_id_in_exception_handler_and_background_task(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    response = client.get("/custom-error")
    assert response.status_code == 400
    assert seen["exception_handler_request_id"] == response.headers["x-request-id"]
    response = client.get("/background")
    assert seen["background_request_id"] == response.headers["x-request-id"]
    (line,) = telemetry.logs(event="background_done")
    assert line["request_id"] == response.headers["x-request-id"]


def test_request_id_is_none_outside_a_request(client: TestClient) -> None:
    client.get("/items/1")
    assert otelkit.get_request_id() is None


def test_app_setting_its_own_request_id_header_does_not_duplicate_it() -> None:
    from fastapi import FastAPI, Response

    app = FastAPI()

    @app.get("/")
    async def root(response: Response) -> dict[str, str]:
        response.headers["X-Request-ID"] = "from-the-app"
        return {}

    with capture(app), TestClient(app) as client:
        response = client.get("/")
    assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]
    assert response.headers["x-request-id"] != "from-the-app"


# --- tracing --------------------------------------------------------------


def test_one_server_span_with_semantic_attributes(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    client.get("/items/42?q=secret-value", headers={"User-Agent": "pytest-agent"})
    (span,) = server_spans(telemetry)
    assert span.name == "GET /items/{item_id}"
    attrs = dict(span.attributes)
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.route"] == "/items/{item_id}"
    assert attrs["http.response.status_code"] == 200
    assert attrs["url.path"] == "/items/42"
    assert attrs["url.scheme"] == "http"
    assert attrs["client.address"] == "testclient"
    assert attrs["server.address"] == "testserver"
    assert attrs["user_agent.original"] == "pytest-agent"
    assert attrs["url.query"] == "q=[REDACTED]"
    assert "error.type" not in attrs
    assert span.status.status_code == StatusCode.UNSET


def test_server_port_comes_from_the_host_header(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    client.get("/items/1", headers={"Host": "api.example.com:8443"})
    (span,) = server_spans(telemetry)
    assert span.attributes["server.address"] == "api.example.com"
    assert span.attributes["server.port"] == 8443


def test_traceparent_tracestate_and_baggage_are_honoured(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    response = client.get(
        "/items/1",
        headers={
            "traceparent": f"00-{trace_id}-{parent}-01",
            "tracestate": "vendor=value",
            "baggage": "tenant=acme",
        },
    )
    (span,) = server_spans(telemetry)
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == parent
    assert span.context.trace_state.get("vendor") == "value"
    assert response.headers["x-request-id"] == trace_id
    assert seen["baggage"] == "acme"
    assert response.headers["traceresponse"].startswith(f"00-{trace_id}-")


def test_unhandled_exception_sets_error_status_and_event(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    client.get("/boom")
    (span,) = server_spans(telemetry)
    assert span.name == "GET /boom"
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "RuntimeError"
    assert span.attributes["http.response.status_code"] == 500
    (event,) = [e for e in span.events if e.name == "exception"]
    assert event.attributes["exception.type"] == "RuntimeError"
    assert event.attributes["exception.message"] == "kaboom"


def test_4xx_is_not_a_server_span_error(client: TestClient, telemetry: CapturedTelemetry) -> None:
    client.get("/missing")
    (span,) = server_spans(telemetry)
    assert span.status.status_code == StatusCode.UNSET
    assert span.attributes["http.response.status_code"] == 404


def test_unmatched_path_span_is_named_by_method_only(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    client.get("/no/such/path")
    (span,) = server_spans(telemetry)
    assert span.name == "GET"
    assert "http.route" not in span.attributes


def test_unknown_method_is_other(client: TestClient, telemetry: CapturedTelemetry) -> None:
    client.request("FOOBAR", "/items/1")
    (span,) = server_spans(telemetry)
    assert span.name.startswith("HTTP")
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "FOOBAR"


def test_traced_makes_child_spans_sync_and_async() -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @otelkit.traced("sync_step", step=1)
    def sync_step() -> int:
        return 1

    @otelkit.traced()
    async def async_step() -> int:
        return 2

    @app.get("/work")
    async def work() -> dict[str, int]:
        with otelkit.traced("block") as span:
            span.set_attribute("inside", True)
            total = sync_step()
        async with otelkit.traced("async_block"):
            total += await async_step()
        return {"total": total}

    with capture(app) as telemetry, TestClient(app) as client:
        assert client.get("/work").json() == {"total": 3}
    spans = {s.name: s for s in telemetry.spans()}
    server = spans["GET /work"]
    assert set(spans) == {"GET /work", "block", "sync_step", "async_block", _qualname(async_step)}
    assert spans["block"].parent.span_id == server.context.span_id
    assert spans["sync_step"].parent.span_id == spans["block"].context.span_id
    assert spans["sync_step"].attributes["step"] == 1
    assert spans["block"].attributes["inside"] is True
    assert all(s.context.trace_id == server.context.trace_id for s in spans.values())


def _qualname(func: object) -> str:
    return func.__wrapped__.__qualname__  # type: ignore[attr-defined]


def test_traced_records_exceptions() -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/fail")
    async def fail() -> None:
        with otelkit.traced("failing"):
            raise KeyError("missing")

    with capture(app) as telemetry, TestClient(app, raise_server_exceptions=False) as client:
        client.get("/fail")
    (child,) = telemetry.spans("failing")
    assert child.status.status_code == StatusCode.ERROR
    assert [e.name for e in child.events] == ["exception"]


def test_second_instrument_call_warns_and_changes_nothing() -> None:
    app = make_app()
    with capture(app) as telemetry:
        with pytest.warns(UserWarning, match="already called"):
            otelkit.instrument(app, log_format="console")
        with TestClient(app) as client:
            client.get("/items/1")
        assert len(server_spans(telemetry)) == 1
        assert len(telemetry.logs(event="http_request_completed")) == 1


# --- logging --------------------------------------------------------------


def test_json_lines_carry_the_standard_fields(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    response = client.get("/items/5")
    (line,) = telemetry.logs(event="item_read")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"])
    assert line["level"] == "info"
    assert line["logger"] == "tests.app"
    assert line["service"] == "test-app"
    assert line["version"] == "1.2.3"
    assert line["environment"] == "test"
    assert line["request_id"] == response.headers["x-request-id"]
    (span,) = server_spans(telemetry)
    assert line["trace_id"] == format(span.context.trace_id, "032x")
    assert line["span_id"] == format(span.context.span_id, "016x")
    assert line["item_id"] == 5


def test_stdlib_logging_goes_through_the_same_pipeline(telemetry: CapturedTelemetry) -> None:
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 123)
    logging.getLogger("some.library").warning("disk %s", "full", extra={"device": "sda"})
    (uvicorn_line,) = telemetry.logs(logger="uvicorn.error")
    assert uvicorn_line["event"] == "Started server process [123]"
    assert uvicorn_line["level"] == "info"
    assert uvicorn_line["service"] == "test-app"
    (library_line,) = telemetry.logs(logger="some.library")
    assert library_line["level"] == "warning"
    assert library_line["device"] == "sda"


def test_log_level_filters_structlog_and_stdlib() -> None:
    app = make_app()
    with capture(app, log_level="WARNING") as telemetry, TestClient(app) as client:
        client.get("/items/1")
        logging.getLogger("lib").info("hidden")
        logging.getLogger("lib").warning("shown")
        otelkit.get_logger("x").info("hidden too")
    events = [json.loads(line)["event"] for line in telemetry.log_lines()]
    assert events == ["shown"]


def test_console_format_is_readable_and_has_no_raw_control_characters() -> None:
    app = make_app()
    with capture(app, log_format="console") as telemetry, TestClient(app) as client:
        client.get("/items/1")
        otelkit.get_logger("x").info("evil", value="line\r\nbreak\x1b[31m")
    text = "\n".join(telemetry.log_lines())
    assert "http_request_completed" in text
    assert "item_read" in text
    assert "\x1b" not in text
    assert "\r" not in text
    (evil,) = [line for line in telemetry.log_lines() if "evil" in line]
    assert "break" in evil  # the value's line break did not start a new line


def test_log_format_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_FORMAT", "console")
    app = make_app()
    with capture(app) as telemetry, TestClient(app) as client:
        client.get("/items/1")
    assert telemetry.log_lines()
    assert not telemetry.logs()  # nothing parses as JSON


# --- access log -----------------------------------------------------------


def test_one_access_line_per_request_with_its_fields(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    response = client.get("/items/9")
    (line,) = telemetry.logs(event="http_request_completed")
    assert line["level"] == "info"
    assert line["logger"] == "otelkit.access"
    assert line["method"] == "GET"
    assert line["route"] == "/items/{item_id}"
    assert line["path"] == "/items/9"
    assert line["status_code"] == 200
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= 0
    assert line["client"] == "testclient"
    assert line["request_id"] == response.headers["x-request-id"]


def test_access_line_levels(client: TestClient, telemetry: CapturedTelemetry) -> None:
    client.get("/items/1")
    client.get("/missing")
    client.get("/boom")
    levels = {
        line["status_code"]: line["level"]
        for line in telemetry.logs(event="http_request_completed")
    }
    assert levels == {200: "info", 404: "warning", 500: "error"}


def test_unhandled_exception_logged_once_with_stack_trace(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    response = client.get("/boom")
    text = "\n".join(telemetry.log_lines())
    assert text.count("RuntimeError: kaboom") == 1
    (line,) = telemetry.logs(event="http_request_completed", status_code=500)
    assert line["level"] == "error"
    assert "Traceback (most recent call last)" in line["exception"]
    assert "RuntimeError: kaboom" in line["exception"]
    assert line["request_id"] == response.headers["x-request-id"]


def test_request_started_only_at_debug() -> None:
    app = make_app()
    with capture(app) as telemetry, TestClient(app) as client:
        client.get("/items/1")
    assert not telemetry.logs(event="http_request_started")
    app = make_app()
    with capture(app, log_level="DEBUG") as telemetry, TestClient(app) as client:
        client.get("/items/1")
    (started,) = telemetry.logs(event="http_request_started")
    assert started["level"] == "debug"
    assert started["path"] == "/items/1"


def test_excluded_paths_get_the_header_but_no_span_line_or_metric(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    response = client.get("/health", headers={"X-Request-ID": "probe-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "probe-1"
    response = client.get("/health")
    assert HEX32.fullmatch(response.headers["x-request-id"])
    assert not telemetry.spans()
    assert not telemetry.logs(event="http_request_completed")
    assert telemetry.metric_points("http_requests") == []


def test_excluded_paths_are_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTELKIT_EXCLUDED_PATHS", "/items/1")
    app = make_app()
    with capture(app) as telemetry, TestClient(app) as client:
        client.get("/items/1")
        client.get("/health")
    assert [s.name for s in telemetry.spans()] == ["GET /health"]


def test_access_log_can_be_turned_off() -> None:
    app = make_app()
    with capture(app, access_log=False) as telemetry, TestClient(app) as client:
        client.get("/items/1")
    assert not telemetry.logs(event="http_request_completed")
    assert telemetry.logs(event="item_read")


# --- errors ---------------------------------------------------------------


def test_http_exception_and_validation_keep_fastapi_bodies(client: TestClient) -> None:
    response = client.get("/missing")
    assert response.status_code == 404
    assert response.json() == {"detail": "nothing here"}
    assert HEX32.fullmatch(response.headers["x-request-id"])
    response = client.post("/items", json={"name": "x"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "price"]
    assert HEX32.fullmatch(response.headers["x-request-id"])


def test_user_exception_handler_for_exception_wins() -> None:
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse

    app = FastAPI()

    @app.exception_handler(Exception)
    async def mine(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("mine", status_code=500)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("x")

    with capture(app) as telemetry, TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.text == "mine"
    assert response.headers["x-request-id"]
    (span,) = telemetry.spans()
    assert span.attributes["error.type"] == "RuntimeError"


# --- redaction ------------------------------------------------------------


SECRET = "s3cr3t-VALUE-42"


def test_secrets_never_reach_logs_or_spans(
    client: TestClient, telemetry: CapturedTelemetry
) -> None:
    client.get(
        f"/items/1?api_key={SECRET}&page=2",
        headers={
            "Authorization": f"Bearer {SECRET}",
            "Cookie": f"session={SECRET}",
            "Proxy-Authorization": f"Basic {SECRET}",
        },
    )
    log = otelkit.get_logger("auth")
    log.info(
        "login",
        password=SECRET,
        user_token=SECRET,
        apikey=SECRET,
        client_secret=SECRET,
        headers={"Authorization": SECRET, "Set-Cookie": SECRET, "accept": "json"},
    )
    logging.getLogger("httpx").info("GET https://api.example.com/x?token=%s", SECRET)
    text = "\n".join(telemetry.log_lines())
    assert SECRET not in text
    (login,) = telemetry.logs(event="login")
    assert login["password"] == "[REDACTED]"
    assert login["user_token"] == "[REDACTED]"
    assert login["headers"] == {
        "Authorization": "[REDACTED]",
        "Set-Cookie": "[REDACTED]",
        "accept": "json",
    }
    for span in telemetry.spans():
        for value in span.attributes.values():
            assert SECRET not in str(value)
    (span,) = server_spans(telemetry)
    assert span.attributes["url.query"] == "api_key=[REDACTED]&page=[REDACTED]"
    for accept in ("text/plain", "application/openmetrics-text"):
        scrape = client.get("/metrics", headers={"Accept": accept}).text
        assert SECRET not in scrape
        assert "/items/{item_id}" in scrape  # the request is there, by its route


def test_redacted_field_list_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTELKIT_REDACT_FIELDS", "ssn,pin")
    app = make_app()
    with capture(app) as telemetry:
        otelkit.get_logger("x").info("person", ssn="123-45", pin="0000", name="Ana")
    (line,) = telemetry.logs(event="person")
    assert line["ssn"] == line["pin"] == "[REDACTED]"
    assert line["name"] == "Ana"


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_sdk_disabled_keeps_request_ids_and_logs(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/x")
    async def x() -> dict[str, str | None]:
        return {"request_id": otelkit.get_request_id()}

    overrides = {"sdk_disabled": True} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    import io

    stream = io.StringIO()
    otelkit.instrument(app, log_stream=stream, **overrides)
    try:
        with TestClient(app) as client:
            response = client.get("/x")
            assert client.get("/metrics").status_code == 404
    finally:
        otelkit.uninstrument(app)
    request_id = response.headers["x-request-id"]
    assert HEX32.fullmatch(request_id)
    assert response.json() == {"request_id": request_id}
    assert "traceresponse" not in response.headers
    (line,) = [
        json.loads(text)
        for text in stream.getvalue().splitlines()
        if "http_request_completed" in text
    ]
    assert line["request_id"] == request_id
    assert "trace_id" not in line
