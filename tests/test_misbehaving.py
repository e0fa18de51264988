"""A misbehaving application: each case gets the right status and duration, one span,
and leaks no context into the next request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi import BackgroundTasks, FastAPI, WebSocket
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

import otelkit
from otelkit.testing import CapturedTelemetry, capture
from tests.support.asgi import call, http_scope, run

leaks: list[object] = []


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/stream-fails")
    async def stream_fails() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first chunk,"
            raise RuntimeError("generator broke")

        return StreamingResponse(body())

    @app.get("/slow-stream")
    async def slow_stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"chunk"
                await asyncio.sleep(0.01)

        return StreamingResponse(body())

    @app.post("/upload")
    async def upload(payload: dict[str, str]) -> dict[str, str]:
        await asyncio.sleep(0.05)
        return payload

    @app.get("/background-fails")
    async def background_fails(tasks: BackgroundTasks) -> dict[str, str]:
        def task() -> None:
            raise ValueError("task broke")

        tasks.add_task(task)
        return {"ok": "yes"}

    @app.get("/context")
    async def context() -> dict[str, object]:
        # What a request sees of the previous one: nothing.
        leaks.append(trace.get_current_span().get_span_context())
        return {"request_id": otelkit.get_request_id()}

    @app.websocket("/ws/{room}")
    async def chat(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(f"{room}:{text}:{otelkit.get_request_id()}")
        await websocket.close(code=1000)

    @app.websocket("/ws-fails")
    async def ws_fails(websocket: WebSocket) -> None:
        await websocket.accept()
        raise RuntimeError("socket handler broke")

    return app


@pytest.fixture
def app_telemetry() -> Iterator[tuple[FastAPI, CapturedTelemetry]]:
    app = make_app()
    with capture(app) as telemetry:
        yield app, telemetry


def _no_leak(app: FastAPI) -> None:
    """The next request starts clean, and nothing is left in the caller's context."""
    assert otelkit.get_request_id() is None
    assert not trace.get_current_span().get_span_context().is_valid
    leaks.clear()
    response = run(app, http_scope("/context"))
    assert response.status == 200
    own_trace = response.header(b"x-request-id")[0].decode()
    (seen,) = leaks
    assert format(seen.trace_id, "032x") == own_trace  # its own span, not a leftover


def test_exception_inside_a_streaming_response(app_telemetry: tuple) -> None:
    app, telemetry = app_telemetry
    with pytest.raises(RuntimeError, match="generator broke"):
        run(app, http_scope("/stream-fails"))
    (span,) = [s for s in telemetry.spans() if s.kind == SpanKind.SERVER]
    assert span.attributes["http.response.status_code"] == 200  # what the client got
    assert span.attributes["error.type"] == "RuntimeError"
    assert span.status.status_code == StatusCode.ERROR
    (line,) = telemetry.logs(event="http_request_completed")
    assert line["level"] == "error"
    assert "generator broke" in line["exception"]
    assert telemetry.metric_value("exceptions", exception_type="RuntimeError") == 1
    _no_leak(app)


def test_client_disconnecting_mid_body(app_telemetry: tuple) -> None:
    app, telemetry = app_telemetry
    started = time.perf_counter()
    response = run(app, http_scope("/slow-stream"), fail_send_after=2)
    elapsed = time.perf_counter() - started
    assert response.status == 200  # headers went out, then the connection broke
    (span,) = [s for s in telemetry.spans() if s.kind == SpanKind.SERVER]
    assert span.attributes["http.response.status_code"] == 499
    assert span.status.status_code == StatusCode.UNSET  # the client's doing, not ours
    (line,) = telemetry.logs(event="http_request_completed")
    assert line["status_code"] == 499
    assert line["level"] == "warning"
    assert "exception" not in line
    assert 0 < line["duration_ms"] <= elapsed * 1000 + 1
    assert telemetry.metric_value("exceptions", exception_type="OSError") is None
    _no_leak(app)


def test_client_gone_before_the_response(app_telemetry: tuple) -> None:
    app, telemetry = app_telemetry
    response = run(
        app,
        http_scope("/upload", method="POST", headers=[(b"content-type", b"application/json")]),
        disconnect_before_body=True,
    )
    # FastAPI answers 400 (it could not read the body) to a client that is gone.
    assert response.status == 400
    (span,) = [s for s in telemetry.spans() if s.kind == SpanKind.SERVER]
    assert span.attributes["http.response.status_code"] == 499
    assert (
        telemetry.metric_value("http_requests", method="POST", endpoint="/upload", status="499")
        == 1
    )
    _no_leak(app)


def test_exception_in_a_background_task(app_telemetry: tuple) -> None:
    app, telemetry = app_telemetry
    response = run(app, http_scope("/background-fails"))
    assert response.status == 200
    request_id = response.header(b"x-request-id")[0].decode()
    (span,) = [s for s in telemetry.spans() if s.kind == SpanKind.SERVER]
    assert span.attributes["http.response.status_code"] == 200
    assert span.status.status_code == StatusCode.UNSET  # the client got its answer
    (completed,) = telemetry.logs(event="http_request_completed")
    assert completed["status_code"] == 200
    (failure,) = telemetry.logs(event="exception_after_response")
    assert failure["request_id"] == request_id
    assert "task broke" in failure["exception"]
    assert telemetry.metric_value("exceptions", exception_type="ValueError") == 1
    assert "\n".join(telemetry.log_lines()).count("ValueError: task broke") == 1
    _no_leak(app)


def test_websocket_gets_one_span_and_the_request_id(app_telemetry: tuple) -> None:
    app, telemetry = app_telemetry
    with (
        TestClient(app) as client,
        client.websocket_connect("/ws/lobby", headers={"X-Request-ID": "ws-client-1"}) as websocket,
    ):
        websocket.send_text("hi")
        assert websocket.receive_text() == "lobby:hi:ws-client-1"
    (span,) = [s for s in telemetry.spans() if s.kind == SpanKind.SERVER]
    assert span.name == "WS /ws/{room}"
    assert span.attributes["request.id"] == "ws-client-1"
    assert span.attributes["websocket.close.code"] == 1000
    (line,) = telemetry.logs(event="websocket_closed")
    assert line["route"] == "/ws/{room}"
    assert line["accepted"] is True
    assert line["duration_ms"] >= 0
    assert telemetry.metric_points("http_requests") == []  # HTTP metrics are for HTTP
    _no_leak(app)


def test_websocket_handler_exception(app_telemetry: tuple) -> None:
    app, telemetry = app_telemetry
    with (
        TestClient(app) as client,
        pytest.raises(RuntimeError, match="socket handler broke"),
        client.websocket_connect("/ws-fails") as websocket,
    ):
        websocket.receive_text()
    (span,) = [s for s in telemetry.spans() if s.kind == SpanKind.SERVER]
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "RuntimeError"
    (line,) = telemetry.logs(event="websocket_closed")
    assert line["level"] == "error"
    _no_leak(app)


def test_concurrent_requests_do_not_share_context(app_telemetry: tuple) -> None:
    app, _ = app_telemetry

    async def many() -> list[str]:
        scopes = [
            http_scope("/context", headers=[(b"x-request-id", f"req-{i}".encode())])
            for i in range(50)
        ]
        responses = await asyncio.gather(*(call(app, scope) for scope in scopes))
        return [r.body.decode() for r in responses]

    bodies = asyncio.run(many())
    assert bodies == [f'{{"request_id":"req-{i}"}}' for i in range(50)]
    assert otelkit.get_request_id() is None
