"""The ``otelkit`` command: ``otelkit demo`` runs the instrumented example service."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import IO

__all__ = ["main"]


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


def _banner(host: str, port: int, out: IO[str]) -> None:
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
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
        "Ctrl+C stops it.",
    ]
    print("\n".join(lines), file=out, flush=True)


def _demo(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("otelkit demo needs uvicorn: pip install 'otelkit[demo]'", file=sys.stderr)
        return 2
    if "LOG_FORMAT" not in os.environ and sys.stdout.isatty():
        os.environ["LOG_FORMAT"] = "console"
    module = _load_example()
    _banner(args.host, args.port, sys.stderr)
    # log_config=None: otelkit has configured logging; uvicorn must not redo it.
    uvicorn.run(module.app, host=args.host, port=args.port, log_config=None)
    return 0


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
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``otelkit`` command line; returns the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
