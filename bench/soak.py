"""Soak: memory stays flat over a million requests, series stay flat over 100k paths.

Run by hand (about three minutes on two cores)::

    python bench/soak.py [--requests 1000000] [--paths 100000] [--out bench/results]

It drives otelkit-full (spans into a counting exporter through otelkit's own
span pipeline, both metric sets, JSON access log to /dev/null) in process,
samples the resident set size every tenth of the run, then sends one request
to each of ``--paths`` distinct unmatched paths and counts the series of a
Prometheus scrape before and after. It writes ``soak.md`` and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.apps import _new_app  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: E402

import otelkit  # noqa: E402
from otelkit._pipeline import DROPPED, SpanPipeline  # noqa: E402


class _Count(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Any) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"soak"), (b"user-agent", b"soak")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


class _Sink:
    """Receives responses; keeps the body only when asked (a scrape)."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.body = b""

    async def __call__(self, message: dict[str, Any]) -> None:
        if self.keep and message["type"] == "http.response.body":
            self.body += message.get("body", b"")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--paths", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    exporter = _Count()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SpanPipeline(exporter))
    meter_provider = MeterProvider(shutdown_on_exit=False)
    app = _new_app()
    with open("/dev/null", "w") as devnull:
        otelkit.instrument(
            app,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            log_stream=devnull,
        )
        samples: list[tuple[int, float]] = []
        step = max(1, args.requests // 10)

        async def soak() -> None:
            send = _Sink()
            for i in range(args.requests):
                await app(_scope(f"/items/{i % 1000}"), _receive, send)
                if i % step == 0 or i == args.requests - 1:
                    # Sample with the span queue drained, so that the number
                    # shows what is kept, not how full the queue happens to be.
                    tracer_provider.force_flush()
                    gc.collect()
                    samples.append((i + 1, _rss_mib()))

        started = time.perf_counter()
        asyncio.run(soak())
        elapsed = time.perf_counter() - started

        async def scrape() -> str:
            sink = _Sink(keep=True)
            await app(_scope("/metrics"), _receive, sink)
            return sink.body.decode()

        def series(text: str) -> int:
            return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

        before = asyncio.run(scrape())

        async def paths(start: int, stop: int) -> None:
            send = _Sink()
            for i in range(start, stop):
                await app(_scope(f"/no/such/{i}/{'x' * (i % 64)}"), _receive, send)

        first = min(1000, args.paths)
        asyncio.run(paths(0, first))
        after_first = asyncio.run(scrape())
        asyncio.run(paths(first, args.paths))
        after = asyncio.run(scrape())
        tracer_provider.force_flush()

    unmatched = re.findall(r'^http_requests_total\{endpoint="<unmatched>".*\} (\S+)$', after, re.M)
    first_rss = samples[1][1] if len(samples) > 1 else samples[0][1]
    lines = [
        "# Soak",
        "",
        f"{args.requests:,} requests in {elapsed:.0f} s ({elapsed / args.requests * 1e6:.1f} µs"
        " each, otelkit-full, in process); resident set size after each tenth:",
        "",
        "| requests | RSS MiB |",
        "|---:|---:|",
        *(f"| {n:,} | {rss:.1f} |" for n, rss in samples),
        "",
        f"- RSS growth from the first tenth to the end: {samples[-1][1] - first_rss:+.1f} MiB",
        f"- spans exported: {exporter.spans:,} of {args.requests + args.paths:,}"
        f" (dropped and counted: {DROPPED['traces']:,})",
        f"- sample lines on /metrics before any unmatched path: {series(before)}; after"
        f" {first:,} distinct unmatched paths: {series(after_first)}; after {args.paths:,}:"
        f" {series(after)}",
        f"- unmatched requests counted: {', '.join(unmatched) or 'none'}",
    ]
    report = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
