"""Hostile input: whatever a client sends, otelkit causes no 5xx, injects no header,
writes no raw control character to a log line, bounds span attributes and keeps the
Prometheus series count bounded."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import string
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otelkit.context import is_valid_request_id
from otelkit.logs import render_json
from otelkit.middleware import _redacted_query, _server
from otelkit.prometheus import Family, Sample, render_families
from otelkit.settings import SETTINGS
from otelkit.testing import CapturedTelemetry, capture
from tests.support.asgi import http_scope, run
from tests.support.servers import serve, uvicorn

RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
SAFE_HEADER_VALUE = re.compile(rb"[\x20-\x7e]*")
MAX_ATTRIBUTE = 1024


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, int]:
        return {"length": len(item_id)}

    return app


BARE = make_app()


@pytest.fixture(scope="module")
def instrumented() -> Iterator[tuple[FastAPI, CapturedTelemetry]]:
    app = make_app()
    with capture(app) as telemetry:
        yield app, telemetry


def check_outcome(app: FastAPI, telemetry: CapturedTelemetry, scope: dict) -> None:
    """The invariants every hostile request must leave true.

    The oracle for "no 5xx caused by otelkit" is the same app without otelkit:
    the instrumented one must answer with the same status.
    """
    bare = run(BARE, dict(scope, headers=list(scope["headers"])))
    response = run(app, scope)
    assert response.status == bare.status, response.body
    assert response.status is not None
    assert response.status < 500, response.body
    for name, value in response.headers:
        assert SAFE_HEADER_VALUE.fullmatch(name)
        assert SAFE_HEADER_VALUE.fullmatch(value)
    (request_id,) = response.header(b"x-request-id")
    assert is_valid_request_id(request_id)
    for line in telemetry.log_lines():
        assert not RAW_CONTROL.search(line), line
        json.loads(line)
    for span in telemetry.spans():
        for value in span.attributes.values():
            if isinstance(value, str):
                assert len(value) <= MAX_ATTRIBUTE


# --- the corpus -----------------------------------------------------------

REQUEST_IDS = [
    b"x" * 129,
    b"x" * 100_000,
    b"abc\r\nSet-Cookie: admin=1",
    b"abc\nX-Injected: 1",
    b"abc\x00def",
    "caf\u00e9".encode(),
    b"\xff\xfe\xfd",
    b'"quoted"',
    b"' OR 1=1 --",
    b'{"event":"forged","level":"critical"}',
    b"\x1b[31mred\x1b[0m",
    b"-rf",
    b"",
    b" ",
]

TRACE_CONTEXT = [
    (b"traceparent", b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
    (b"traceparent", b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"),
    (b"traceparent", b"00-XYZ92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    (b"traceparent", b"00-" + b"a" * 10_000),
    (b"traceparent", b"\xff\xfe"),
    (b"tracestate", b"=" * 5000),
    (b"tracestate", b",".join(b"k%d=v" % i for i in range(1000))),
    (b"tracestate", b"\x00\x01\x02"),
    (b"baggage", b"k=" + b"v" * 100_000),
    (b"baggage", b",".join(b"k%d=v" % i for i in range(5000))),
    (b"baggage", b"%%%;;;===,,,"),
    (b"baggage", b"\xff=\xfe"),
]

PATHS = [
    "/" + "a" * 100_000,
    "/items/" + "x" * 50_000,
    "/items/\udcff\udcfe",  # undecodable bytes, as servers pass them on
    "/\x00/\r\n/\x1b[2J",
    "/../../etc/passwd",
    "/items/%0d%0aSet-Cookie:%20x=1",
    "/items/\u2028\u2029",
    "//////",
]

METHODS = ["FOO", "G E T", "get", "\x00", "A" * 10_000, "PROPFIND", "TRACE"]


@pytest.mark.parametrize("value", REQUEST_IDS, ids=lambda v: repr(v[:20]))
def test_hostile_request_ids(instrumented: tuple, value: bytes) -> None:
    app, telemetry = instrumented
    check_outcome(app, telemetry, http_scope("/items/1", headers=[(b"x-request-id", value)]))


@pytest.mark.parametrize("header", TRACE_CONTEXT, ids=lambda h: repr(h[1][:20]))
def test_hostile_trace_context(instrumented: tuple, header: tuple[bytes, bytes]) -> None:
    app, telemetry = instrumented
    check_outcome(app, telemetry, http_scope("/items/1", headers=[header]))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: repr(p[:20]))
def test_hostile_paths(instrumented: tuple, path: str) -> None:
    app, telemetry = instrumented
    check_outcome(app, telemetry, http_scope(path))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: repr(m[:10]))
def test_hostile_methods(instrumented: tuple, method: str) -> None:
    app, telemetry = instrumented
    check_outcome(app, telemetry, http_scope("/items/1", method=method))


def test_thousands_of_headers(instrumented: tuple) -> None:
    app, telemetry = instrumented
    headers = [(f"x-h{i}".encode(), b"v" * 100) for i in range(5000)]
    headers += [(b"x-request-id", b"a" * 200)] * 50 + [(b"user-agent", b"u" * 100_000)]
    check_outcome(app, telemetry, http_scope("/items/1", headers=headers))


def test_hostile_query_strings(instrumented: tuple) -> None:
    app, telemetry = instrumented
    for query in (b"a=" + b"x" * 100_000, b"&&&===", b"\xff\xfe=\x00", b"k=%0d%0a"):
        check_outcome(app, telemetry, http_scope("/items/1", query_string=query))


def test_series_stay_bounded_whatever_the_paths_and_methods() -> None:
    app = make_app()
    with capture(app) as telemetry:
        for i in range(2000):
            run(app, http_scope(f"/random/{i}/{'x' * (i % 50)}", method=f"M{i % 300}"))
            run(app, http_scope(f"/items/{i}"))
        points = telemetry.metric_points("http_requests")
    labels = {tuple(sorted(p.attributes.items())) for p in points}
    assert len(labels) <= 3  # GET item, _OTHER unmatched, (GET unmatched never happens here)
    endpoints = {dict(label)["endpoint"] for label in labels}
    assert endpoints <= {"/items/{item_id}", "<unmatched>"}


# --- fuzzing the parsers --------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_request_id_validation(value: bytes) -> None:
    if is_valid_request_id(value):
        assert 1 <= len(value) <= 128
        text = value.decode("ascii")
        assert text[0].isalnum()
        assert set(text) <= set(string.ascii_letters + string.digits + "._:+=/-")


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_host_header(host: bytes) -> None:
    _, port = _server({"server": ("127.0.0.1", 80)}, host)
    assert port is None or 0 <= port <= 99999


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_query_redaction_keeps_no_values(query: bytes) -> None:
    redacted = _redacted_query(query)
    for part in redacted.split("&"):
        if "=" in part:
            assert part.endswith("=[REDACTED]")


@FUZZ
@given(
    st.dictionaries(
        st.text(max_size=20),
        st.one_of(st.text(), st.integers(), st.binary(), st.floats(), st.none()),
        max_size=8,
    )
)
def test_fuzz_json_renderer_one_safe_line(fields: dict) -> None:
    line = render_json(None, "info", {"event": "fuzz", **fields})
    assert "\n" not in line
    assert not RAW_CONTROL.search(line)
    json.loads(line)


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=50), max_size=5))
def test_fuzz_prometheus_labels_cannot_break_the_exposition(labels: dict) -> None:
    family = Family("fuzzed", "counter", "help\nwith newline", [Sample(labels, 1)])
    text = render_families({}, [family], openmetrics=True)
    lines = text.rstrip("\n").split("\n")  # the format's only line separator
    assert lines[-1] == "# EOF"
    assert len(lines) == 4  # HELP, TYPE, the sample, EOF: nothing a value could split
    assert lines[2].startswith("fuzzed_total")


@FUZZ
@given(st.sampled_from(SETTINGS), st.text(max_size=50))
def test_fuzz_settings_parsers_raise_only_value_errors(setting, raw: str) -> None:
    with contextlib.suppress(ValueError):
        setting.parse(raw)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [b"x-request-id", b"traceparent", b"tracestate", b"baggage", b"user-agent", b"host"]
            ),
            st.binary(max_size=200),
        ),
        max_size=6,
    ),
    st.text(max_size=100),
)
def test_fuzz_the_middleware(instrumented: tuple, headers: list, path: str) -> None:
    app, telemetry = instrumented
    check_outcome(app, telemetry, http_scope("/" + path, headers=headers))


# --- on the wire, against a real server ------------------------------------


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


@pytest.mark.integration
def test_raw_hostile_requests_against_uvicorn() -> None:
    requests = [
        b"GET /api/v1/projects/%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /api/v1/%00%0d%0a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"BREW /api/v1/projects HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /api/v1/projects HTTP/1.1\r\nHost: x\r\nX-Request-ID: \xff\xfe\x01\r\n"
        b"traceparent: 00-zz-zz-zz\r\nbaggage: \xff\r\nConnection: close\r\n\r\n",
        b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /api/v1/projects HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(500))
        + b"Connection: close\r\n\r\n",
    ]
    with serve(uvicorn(), env={"LOG_LEVEL": "INFO"}) as server:
        for request in requests:
            answer = _raw(server.port, request)
            status_line = answer.split(b"\r\n", 1)[0]
            assert status_line.startswith(b"HTTP/1.1 "), answer[:200]
            status = int(status_line.split()[1])
            assert status < 500, answer[:300]
            assert b"\r\nset-cookie" not in answer.lower()
        healthy = _raw(
            server.port, b"GET /api/v1/projects HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert healthy.startswith(b"HTTP/1.1 200")
        server.stop()
        output = server.output()
    for line in output.splitlines():
        assert not RAW_CONTROL.search(line), line
