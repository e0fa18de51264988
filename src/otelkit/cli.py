"""The ``otelkit`` command.

- ``otelkit demo``: run the instrumented example service (``--traffic`` drives
  a realistic request mix against it, so metrics and traces fill by themselves);
- ``otelkit check``: the effective configuration, where each value came from,
  and whether the OTLP endpoint and the Prometheus port are usable;
- ``otelkit logs REQUEST_ID [FILE ...]``: the timeline of one request from
  JSON log lines (standard input when no file is given).

Output is a table for people (colour only on a terminal) or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import random
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import IO, Any
from urllib.parse import urlsplit

from otelkit.exporters import otlp_endpoint
from otelkit.settings import Settings, inspect_settings, resolve_settings

__all__ = ["main"]

_RESET = "\x1b[0m"
_COLOURS = {
    "red": "\x1b[31m",
    "yellow": "\x1b[33m",
    "green": "\x1b[32m",
    "dim": "\x1b[2m",
    "bold": "\x1b[1m",
    "cyan": "\x1b[36m",
}


class _Out:
    """Writes to a stream, with colour only when it is a terminal."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.colour = _isatty(stream) and "NO_COLOR" not in os.environ

    def paint(self, text: str, colour: str) -> str:
        return f"{_COLOURS[colour]}{text}{_RESET}" if self.colour else text

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def table(
        self,
        headers: Sequence[str],
        rows: Iterable[Sequence[str]],
        colours: Sequence[str | None] | None = None,
    ) -> None:
        rows = [list(row) for row in rows]
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)
        ]
        self.line(
            self.paint("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), "bold")
        )
        for index, row in enumerate(rows):
            text = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            colour = colours[index] if colours else None
            self.line(self.paint(text, colour) if colour else text)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --- demo -----------------------------------------------------------------


def _load_example() -> ModuleType:
    """Import the example service, from the wheel or from a source checkout."""
    try:
        return importlib.import_module("otelkit._examples.modelling.app")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("otelkit._examples"):
            raise
    # An editable install: the example lives in the checkout's examples/.
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "examples" / "modelling" / "app.py").is_file():
        raise SystemExit("otelkit demo: the example service is not installed with this otelkit")
    sys.path.insert(0, str(checkout))
    return importlib.import_module("examples.modelling.app")


def _banner(base: str, traffic: bool, out: IO[str]) -> None:
    collector = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    lines = [
        "otelkit demo: the modelling backend, instrumented with otelkit",
        f"  API docs        {base}/docs",
        f"  try             curl -i {base}/api/v1/projects",
        f"  a failure       curl -i {base}/api/v1/boom",
        f"  metrics         {base}/metrics",
        f"  recent traces   {base}/debug/traces",
        f"  traces to       {collector}"
        if collector
        else "  traces to       (no collector: set OTEL_EXPORTER_OTLP_ENDPOINT to export)",
        "  logs            this terminal (LOG_FORMAT=json|console)",
        "  one request     otelkit logs <X-Request-ID> < the saved log",
    ]
    if traffic:
        lines.append("  traffic         a request mix is being sent to the service")
    lines.append("Ctrl+C stops it.")
    print("\n".join(lines), file=out, flush=True)


# A realistic mix: mostly reads, some writes, a few client errors and crashes.
_TRAFFIC: list[tuple[int, str, str, dict[str, Any] | None]] = [
    (30, "GET", "/api/v1/projects", None),
    (20, "GET", "/api/v1/projects/{id}", None),
    (4, "GET", "/api/v1/projects/404", None),
    (10, "POST", "/api/v1/modeling", {"project_id": 1, "name": "bracket"}),
    (3, "POST", "/api/v1/modeling", {"project_id": 1, "name": "invalid"}),
    (8, "POST", "/api/v1/simulations", {"model_id": 7, "simulation_type": "thermal"}),
    (6, "POST", "/api/v1/budgets", {"material": "petg", "volume_cm3": 42.5}),
    (1, "GET", "/api/v1/boom", None),
    (5, "GET", "/health", None),
]


def drive_traffic(base: str, stop: threading.Event, rate: float = 10.0) -> int:
    """Send the demo's request mix to ``base`` until ``stop`` is set; return the count."""
    weights = [weight for weight, *_ in _TRAFFIC]
    rng = random.Random()  # noqa: S311 - picks demo requests, nothing secret
    sent = 0
    while not stop.is_set():
        _, method, path, body = rng.choices(_TRAFFIC, weights)[0]
        path = path.replace("{id}", str(rng.randint(1, 3)))
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - a fixed http:// URL we serve
            base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "User-Agent": "otelkit-demo-traffic"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5):  # noqa: S310
                pass
        except urllib.error.HTTPError:
            pass  # 4xx and 5xx are part of the mix
        except (urllib.error.URLError, OSError):
            stop.wait(0.5)  # the server is starting or stopping
            continue
        sent += 1
        stop.wait(rng.expovariate(rate))
    return sent


def _wait_until_listening(host: str, port: int, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            stop.wait(0.1)
    return False


def _demo(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("otelkit demo needs uvicorn: pip install 'otelkit[demo]'", file=sys.stderr)
        return 2
    if "LOG_FORMAT" not in os.environ and sys.stdout.isatty():
        os.environ["LOG_FORMAT"] = "console"
    module = _load_example()
    shown = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{shown}:{args.port}"
    _banner(base, args.traffic, sys.stderr)
    stop = threading.Event()
    if args.traffic:
        connect_host = "127.0.0.1" if args.host in {"0.0.0.0", ""} else args.host  # noqa: S104

        def traffic() -> None:
            if _wait_until_listening(connect_host, args.port, stop):
                drive_traffic(
                    base.replace(
                        shown, connect_host if ":" not in connect_host else f"[{connect_host}]"
                    ),
                    stop,
                    args.rate,
                )

        threading.Thread(target=traffic, name="otelkit-demo-traffic", daemon=True).start()
    try:
        # log_config=None: otelkit has configured logging; uvicorn must not redo it.
        uvicorn.run(module.app, host=args.host, port=args.port, log_config=None)
    finally:
        stop.set()
    return 0


# --- check ----------------------------------------------------------------


def _display(name: str, value: Any) -> str:
    if name == "otlp_headers" and value:
        return ",".join(f"{key}=[REDACTED]" for key in value)
    if name == "log_level" and isinstance(value, int):
        return logging.getLevelName(value)
    if value is None:
        return "(unset)"
    if isinstance(value, frozenset | set):
        value = sorted(value)
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, tuple | list):
        return ",".join(map(str, value)) or "(none)"
    return str(value)


def _probe_tcp(url: str, timeout: float) -> str | None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot connect to {parts.hostname}:{port} ({exc.strerror or exc})"


def _probe_port_free(host: str, port: int) -> str | None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port} ({exc.strerror or exc})"
    return None


def _check(args: argparse.Namespace) -> int:
    out = _Out(sys.stdout)
    resolutions = inspect_settings()
    problems = [
        {"setting": r.setting.name, "problem": str(r.error)}
        for r in resolutions
        if r.error is not None
    ]
    rows = [
        {
            "setting": r.setting.name,
            "env": r.setting.env or "",
            "value": "(invalid)" if r.error else _display(r.setting.name, r.value),
            "source": r.source,
        }
        for r in resolutions
    ]
    if not problems:
        problems.extend(_probes(resolve_settings(), args.timeout))
    if args.json:
        json.dump(
            {"ok": not problems, "settings": rows, "problems": problems}, sys.stdout, indent=2
        )
        sys.stdout.write("\n")
        return 1 if problems else 0
    invalid = {p["setting"] for p in problems}
    colours = [
        "red" if row["setting"] in invalid else "cyan" if row["source"] != "default" else None
        for row in rows
    ]
    out.table(
        ["SETTING", "ENVIRONMENT VARIABLE", "VALUE", "SOURCE"],
        [[r["setting"], r["env"], r["value"], r["source"]] for r in rows],
        colours,
    )
    out.line()
    for problem in problems:
        out.line(out.paint(f"✗ {problem['setting']}: {problem['problem']}", "red"))
    if not problems:
        probed = [
            r
            for r in resolutions
            if r.setting.name.startswith("otlp_")
            and r.setting.name.endswith("endpoint")
            and r.value
        ]
        detail = "; the configured endpoints answer" if probed else ""
        out.line(out.paint(f"✓ configuration is valid{detail}", "green"))
    return 1 if problems else 0


def _probes(settings: Settings, timeout: float) -> list[dict[str, str]]:
    problems = []
    exporting = [
        signal
        for signal, names in (
            ("traces", settings.traces_exporter),
            ("metrics", settings.metrics_exporter),
            ("logs", settings.logs_exporter),
        )
        if "otlp" in names
    ]
    for signal in exporting:
        endpoint = otlp_endpoint(settings, signal)  # type: ignore[arg-type]
        if endpoint is None:
            if signal != "traces":  # traces default to otlp: no endpoint just means off
                problems.append(
                    {
                        "setting": f"otlp_{signal}_endpoint",
                        "problem": f"OTEL_{signal.upper()}_EXPORTER asks for otlp "
                        "but no OTLP endpoint is configured",
                    }
                )
            continue
        failure = _probe_tcp(endpoint, timeout)
        if failure:
            problems.append({"setting": f"otlp_{signal}_endpoint", "problem": failure})
    if "prometheus" in settings.metrics_exporter and settings.prometheus_port is not None:
        failure = _probe_port_free(settings.prometheus_host, settings.prometheus_port)
        if failure:
            problems.append({"setting": "prometheus_port", "problem": failure})
    return problems


# --- logs -----------------------------------------------------------------

_LEVEL_COLOURS = {"warning": "yellow", "error": "red", "critical": "red", "debug": "dim"}
_SHOWN_ELSEWHERE = {
    "timestamp",
    "level",
    "logger",
    "event",
    "service",
    "version",
    "environment",
    "request_id",
    "trace_id",
    "span_id",
    "exception",
}


def _records(paths: Sequence[str], request_id: str) -> list[dict[str, Any]]:
    streams: list[Iterable[str]] = []
    opened: list[Any] = []
    try:
        if not paths:
            streams.append(sys.stdin)
        for path in paths:
            handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
            opened.append(handle)
            streams.append(handle)
        found = []
        for stream in streams:
            for raw in stream:
                text = raw.strip()
                if not text.startswith("{"):
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and request_id in (
                    record.get("request_id"),
                    record.get("trace_id"),
                ):
                    found.append(record)
        found.sort(key=lambda r: str(r.get("timestamp", "")))
        return found
    finally:
        for handle in opened:
            handle.close()


def _logs(args: argparse.Namespace) -> int:
    try:
        records = _records(args.files, args.request_id)
    except OSError as exc:
        print(f"otelkit logs: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for record in records:
            sys.stdout.write(json.dumps(record) + "\n")
        return 0 if records else 1
    out = _Out(sys.stdout)
    if not records:
        out.line(f"no log line carries request id {args.request_id}")
        return 1
    first = records[0]
    out.line(
        out.paint(f"request {args.request_id}", "bold")
        + f"  trace {first.get('trace_id', '?')}  service {first.get('service', '?')}"
    )
    rows, colours = [], []
    for record in records:
        fields = " ".join(f"{key}={record[key]}" for key in record if key not in _SHOWN_ELSEWHERE)
        level = str(record.get("level", ""))
        rows.append(
            [
                str(record.get("timestamp", "")),
                level,
                str(record.get("logger", "")),
                str(record.get("event", "")),
                fields,
            ]
        )
        colours.append(_LEVEL_COLOURS.get(level))
    out.table(["TIME", "LEVEL", "LOGGER", "EVENT", "FIELDS"], rows, colours)
    for record in records:
        if record.get("exception"):
            out.line()
            out.line(out.paint(str(record["exception"]), "red"))
    return 0


# --- entry point ----------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otelkit", description="OpenTelemetry for FastAPI, in one call."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="run the instrumented example service (the modelling backend)"
    )
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    demo.add_argument(
        "--traffic",
        action="store_true",
        help="send a realistic request mix to the service while it runs",
    )
    demo.add_argument(
        "--rate", type=float, default=10.0, help="requests per second of --traffic (default 10)"
    )
    demo.set_defaults(handler=_demo)

    check = commands.add_parser(
        "check", help="show the effective configuration and probe the exporters' endpoints"
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for each probe (default 2)"
    )
    check.set_defaults(handler=_check)

    logs = commands.add_parser("logs", help="the timeline of one request from JSON log lines")
    logs.add_argument("request_id", help="an X-Request-ID (or trace id)")
    logs.add_argument("files", nargs="*", help="log files (default: standard input)")
    logs.add_argument("--json", action="store_true", help="print the matching lines as JSON")
    logs.set_defaults(handler=_logs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``otelkit`` command line; returns the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
