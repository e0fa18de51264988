"""otelkit's overhead benchmark: one command, one run, every variant interleaved.

    python bench/run.py [--quick] [--rounds N] [--requests N] [--out bench/results]

Why it is built this way (see bench/README.md for how to read the output):

* **Interleaved rounds.** This machine is shared and noisy. Every round runs
  every variant once, in an order rotated from round to round, so a burst of
  noise lands on all variants alike instead of on whichever ran at that moment;
  overheads are paired differences *within* a round.
* **Two measures.** In-process (an ASGI driver calls the app directly) isolates
  the instrumentation's CPU cost per request; end to end (uvicorn + wrk over
  loopback) shows what a client sees and what the server's CPU pays, socket and
  HTTP parsing included.
* **Same app, same exporters.** Every variant is the same one-route FastAPI app
  (``bench/apps.py``); every traced variant uses the same counting
  BatchSpanProcessor, every metered one a never-scraped pull reader, each with
  providers of its own. A second table repeats otelkit and contrib with a real
  OTLP/gRPC exporter into a receiver running in another process.
* **Ratios, not absolutes.** Absolute microseconds move between runs and
  machines; ratios taken within one run are what this benchmark is for.
"""

from __future__ import annotations

import os
import sys

# Settings from the environment would change what the variants do (otelkit and
# the OpenTelemetry SDK read these); clear them before anything reads them, and
# keep them out of the servers' environment too.
_SCRUBBED_PREFIXES = ("OTEL_", "OTELKIT_", "LOG_LEVEL", "LOG_FORMAT", "PROMETHEUS_")
for _key in [key for key in os.environ if key.startswith(_SCRUBBED_PREFIXES)]:
    del os.environ[_key]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import gc  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Final  # noqa: E402

REPO: Final = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import apps  # noqa: E402
from bench.driver import Driver  # noqa: E402

PEERS: Final = (
    "otel-contrib",
    "fastapi-native",
    "prom-instrumentator",
    "starlette-exporter",
    "correlation-id-structlog",
)
"""Third-party setups otelkit full is compared with, in the ratio table."""

PACKAGES: Final = (
    "otelkit",
    "fastapi",
    "starlette",
    "pydantic",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-fastapi",
    "opentelemetry-instrumentation-asgi",
    "opentelemetry-exporter-otlp-proto-grpc",
    "grpcio",
    "protobuf",
    "structlog",
    "orjson",
    "uvicorn",
    "h11",
    "uvloop",
    "httptools",
    "prometheus-client",
    "prometheus-fastapi-instrumentator",
    "starlette-exporter",
    "asgi-correlation-id",
    "matplotlib",
)


def _progress(message: str) -> None:
    """Progress goes to stderr: stdout carries only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _rotated(items: Sequence[str], by: int) -> list[str]:
    """``items`` starting at position ``by``: round r runs variant r first."""
    if not items:
        return []
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the command line decides."""

    rounds: int
    requests: int
    warmup: int
    variants: tuple[str, ...]
    out: Path
    otlp: bool
    e2e: bool
    e2e_rounds: int
    e2e_seconds: int
    e2e_warmup_seconds: int
    threads: int
    connections: int
    command: str


def parse_args(argv: Sequence[str]) -> Config:
    """Defaults fit the whole run in about five minutes on two cores."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    parser.add_argument("--rounds", type=int, help="in-process rounds (default 9; quick 5)")
    parser.add_argument(
        "--requests", type=int, help="in-process requests per variant per round (default 5000)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--variants",
        help="comma-separated subset of: " + ", ".join(apps.VARIANTS),
    )
    parser.add_argument("--no-otlp", action="store_true", help="skip the real-OTLP table")
    parser.add_argument("--no-e2e", action="store_true", help="skip uvicorn + wrk")
    parser.add_argument("--e2e-rounds", type=int, help="end-to-end rounds (default 4; quick 2)")
    parser.add_argument("--e2e-seconds", type=int, help="wrk seconds per variant per round")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    args = parser.parse_args(argv)
    quick: bool = args.quick
    variants = tuple(apps.VARIANTS)
    if args.variants:
        wanted = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in apps.VARIANTS]
        if unknown:
            parser.error(f"unknown variants: {', '.join(unknown)}")
        variants = tuple(name for name in apps.VARIANTS if name in {"bare", *wanted})
    rounds = args.rounds or (5 if quick else 9)
    if rounds < 2:
        parser.error("--rounds must be at least 2 (5 or more for a real run)")
    requests = args.requests or (1000 if quick else 5000)
    e2e_rounds = args.e2e_rounds or (2 if quick else 4)
    return Config(
        rounds=rounds,
        requests=requests,
        warmup=min(requests, 1000),
        variants=variants,
        out=args.out.resolve(),
        otlp=not args.no_otlp,
        e2e=not args.no_e2e and shutil.which("wrk") is not None,
        e2e_rounds=e2e_rounds,
        e2e_seconds=args.e2e_seconds or (1 if quick else 3),
        e2e_warmup_seconds=1,
        threads=args.threads,
        connections=args.connections,
        command=" ".join(["python", "bench/run.py", *argv]),
    )


# --------------------------------------------------------------------------- in-process


@dataclass(slots=True)
class InProcess:
    """µs per request of each variant in each round (round order), and span counts."""

    variants: list[str]
    requests: int
    rounds: int
    samples: dict[str, list[float]] = field(default_factory=dict)
    total_requests: dict[str, int] = field(default_factory=dict)
    spans: dict[str, apps.SpanStats | None] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)

    def paired_overheads(self, variant: str) -> list[float]:
        """Per round: variant - bare, both measured in that same round."""
        return [v - b for v, b in zip(self.samples[variant], self.samples["bare"], strict=True)]

    def overhead(self, variant: str) -> float:
        """The median of the paired per-round overheads, in µs."""
        return statistics.median(self.paired_overheads(variant))

    def overhead_of_minima(self, variant: str) -> float:
        """Fastest round of the variant minus fastest round of bare, in µs."""
        return min(self.samples[variant]) - min(self.samples["bare"])


async def _measure(
    variants: Sequence[str],
    build: Callable[[str], apps.Built],
    *,
    rounds: int,
    requests: int,
    warmup: int,
    label: str,
) -> tuple[InProcess, dict[str, apps.Built]]:
    """Build every variant, warm each up, then run interleaved rounds.

    The timed block of a variant is its ``requests`` requests followed by a
    flush of its span processor: the export work those requests caused is
    theirs, and none of it spills into the next variant's block.
    """
    result = InProcess(list(variants), requests, rounds)
    built = {name: build(name) for name in variants}
    drivers = {name: Driver(built[name].app, apps.ITEM_PATH) for name in variants}
    for name in variants:
        await drivers[name].startup()
        await drivers[name].run(warmup)
        built[name].flush()
        result.samples[name] = []
        result.total_requests[name] = warmup
    for round_index in range(rounds):
        for name in _rotated(variants, round_index):
            gc.collect()
            elapsed = await drivers[name].run(requests)
            flush_start = time.perf_counter()
            built[name].flush()
            elapsed += time.perf_counter() - flush_start
            result.samples[name].append(elapsed / requests * 1e6)
            result.total_requests[name] += requests
        _progress(f"{label}: round {round_index + 1}/{rounds} done")
    for name in variants:
        await drivers[name].shutdown()
        built[name].flush()
        result.spans[name] = built[name].span_stats()
    return result, built


def run_in_process(config: Config) -> InProcess:
    """The main table: every variant, counting exporters only."""
    result, built = asyncio.run(
        _measure(
            config.variants,
            apps.build,
            rounds=config.rounds,
            requests=config.requests,
            warmup=config.warmup,
            label="in-process",
        )
    )
    for variant in built.values():
        variant.shutdown()
    return result


class _ReceiverProcess:
    """bench/receiver.py in a subprocess: OTLP/gRPC endpoints, span counts at the end."""

    def __init__(self, count: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "receiver.py"), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the OTLP receiver process did not start")
        self.endpoints: list[str] = json.loads(line)["endpoints"]

    def finish(self) -> list[int]:
        """Close its stdin; it answers with the spans each receiver accepted."""
        out, _ = self.process.communicate(timeout=60)
        return list(json.loads(out.strip().splitlines()[-1])["spans"])


def run_otlp(config: Config) -> InProcess | None:
    """The second table: otelkit full and contrib exporting over OTLP/gRPC for real."""
    variants = [name for name in apps.OTLP_VARIANTS if name in config.variants]
    traced = [name for name in variants if name != "bare"]
    if not traced or "bare" not in variants:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    receiver = _ReceiverProcess(len(traced))
    endpoints: dict[str, str] = dict(zip(traced, receiver.endpoints, strict=True))

    def build(name: str) -> apps.Built:
        if name == "bare":
            return apps.build(name)
        return apps.build(name, OTLPSpanExporter(endpoint=endpoints[name], insecure=True))

    try:
        result, built = asyncio.run(
            _measure(
                variants,
                build,
                rounds=config.rounds,
                requests=config.requests,
                warmup=config.warmup,
                label="in-process, OTLP/gRPC",
            )
        )
        for variant in built.values():
            variant.shutdown()
    except BaseException:
        receiver.process.kill()
        receiver.process.wait()
        raise
    counts = receiver.finish()
    result.delivered = dict(zip(traced, counts, strict=True))
    return result


# --------------------------------------------------------------------------- end to end


@dataclass(frozen=True, slots=True)
class WrkRun:
    """What one wrk run reported, plus the server CPU it cost."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_seconds: float

    @property
    def cpu_us_per_request(self) -> float:
        """Server CPU (user + system, all threads) per completed request, in µs."""
        return self.cpu_seconds / self.requests * 1e6 if self.requests else float("nan")


_DURATION_UNITS: Final = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_wrk(output: str, cpu_seconds: float = 0.0) -> WrkRun:
    """Read the numbers out of ``wrk --latency`` output."""
    totals = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if not (totals and rps and p50 and p99):
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(value) for value in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return WrkRun(
        requests=int(totals.group(1)),
        seconds=_ms(totals.group(2) + totals.group(3)) / 1e3,
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        errors=errors,
        cpu_seconds=cpu_seconds,
    )


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (every thread), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # Fields 14 and 15 of stat(5); the slice above starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(slots=True)
class _Server:
    """One uvicorn process serving one variant."""

    variant: str
    port: int
    process: subprocess.Popen[bytes]
    stats_file: Path
    stderr_file: Path
    requests: int = 0
    runs: list[WrkRun] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{apps.ITEM_PATH}"

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Poll until the app answers 200 (its startup includes every import)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", apps.ITEM_PATH)
                status = connection.getresponse().status
                connection.close()
            except OSError:
                time.sleep(0.2)
                continue
            self.requests += 1
            if status == 200:
                return
            raise RuntimeError(f"{self.variant} answered {status}")
        tail = self.stderr_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"uvicorn for {self.variant} did not start:\n{tail}")


def _start_server(variant: str, workdir: Path) -> _Server:
    port = _free_port()
    stats_file = workdir / f"stats-{variant}.json"
    stderr_file = workdir / f"uvicorn-{variant}.err"
    env = dict(os.environ)
    env.update(
        BENCH_VARIANT=variant,
        BENCH_STATS_FILE=str(stats_file),
        BENCH_LOG_DIR=str(workdir / "logs"),
        PYTHONUNBUFFERED="1",
    )
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "bench.apps:create_app",
        "--app-dir",
        str(REPO),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with stderr_file.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    return _Server(variant, port, process, stats_file, stderr_file)


def _wrk(server: _Server, seconds: int, config: Config) -> WrkRun:
    before = _cpu_seconds(server.process.pid)
    completed = subprocess.run(
        [
            "wrk",
            f"-t{config.threads}",
            f"-c{config.connections}",
            f"-d{seconds}s",
            "--latency",
            server.url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    after = _cpu_seconds(server.process.pid)
    run = parse_wrk(completed.stdout, after - before)
    server.requests += run.requests
    return run


def _stop_server(server: _Server) -> dict[str, Any] | None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)  # graceful: lifespan shutdown, atexit
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        return None
    if not server.stats_file.exists():
        return None
    stats: dict[str, Any] = json.loads(server.stats_file.read_text())
    return stats


def _access_lines(log_dir: Path, pid: int) -> tuple[int, int]:
    """Access lines a server wrote: otelkit's own, and uvicorn's routed through otelkit.

    Counted because they cost CPU per request: a server writing uvicorn's
    access line too pays for two log lines, whatever its flags asked for.
    """
    ours = theirs = 0
    for path in log_dir.glob(f"*-{pid}.log"):
        data = path.read_bytes()
        ours += data.count(b'"event":"http_request_completed"')
        theirs += data.count(b'"logger":"uvicorn.access"')
    return ours, theirs


@dataclass(slots=True)
class EndToEnd:
    """wrk runs per variant (round order), and the servers' span counts."""

    variants: list[str]
    rounds: int
    seconds: int
    threads: int
    connections: int
    runs: dict[str, list[WrkRun]] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    spans: dict[str, dict[str, int] | None] = field(default_factory=dict)
    log_lines: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per variant: (otelkit access lines, uvicorn access lines) the server wrote."""

    def paired_cpu_overheads(self, variant: str) -> list[float]:
        """Per round: server CPU µs/request of variant - bare's in that round."""
        return [
            v.cpu_us_per_request - b.cpu_us_per_request
            for v, b in zip(self.runs[variant], self.runs["bare"], strict=True)
        ]


def run_end_to_end(config: Config) -> EndToEnd:
    """Every variant behind its own uvicorn, all started at once, loaded in rotated order."""
    result = EndToEnd(
        list(config.variants),
        config.e2e_rounds,
        config.e2e_seconds,
        config.threads,
        config.connections,
    )
    workdir = Path(tempfile.mkdtemp(prefix="otelkit-bench-e2e-"))
    servers: dict[str, _Server] = {}
    try:
        for name in config.variants:
            servers[name] = _start_server(name, workdir)
        for server in servers.values():
            server.wait_ready()
        _progress(f"end to end: {len(servers)} servers up; warming up")
        for name in config.variants:
            _wrk(servers[name], config.e2e_warmup_seconds, config)
        for round_index in range(config.e2e_rounds):
            for name in _rotated(config.variants, round_index):
                servers[name].runs.append(_wrk(servers[name], config.e2e_seconds, config))
            _progress(f"end to end: round {round_index + 1}/{config.e2e_rounds} done")
    finally:
        for server in servers.values():
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGINT)
        for name, server in servers.items():
            stats = _stop_server(server)
            result.spans[name] = stats.get("spans") if stats else None
            result.runs[name] = server.runs
            result.requests[name] = server.requests
            result.log_lines[name] = _access_lines(workdir / "logs", server.process.pid)
        shutil.rmtree(workdir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- report


def _fmt(value: float, digits: int = 1) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(numerator: float, denominator: float) -> str:
    if denominator <= 0 or math.isnan(numerator) or math.isnan(denominator):
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def _round_ratio_range(numerators: list[float], denominators: list[float]) -> str:
    ratios = [n / d for n, d in zip(numerators, denominators, strict=True) if d > 0]
    if not ratios:
        return "n/a"
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def _in_process_table(result: InProcess, delivered: bool = False) -> list[str]:
    header = (
        "| variant | what | min µs/req | median µs/req | overhead µs (median of paired) "
        "| overhead µs (min - min) | paired overhead range µs | x bare |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    bare_median = statistics.median(result.samples["bare"])
    for name in result.variants:
        samples = result.samples[name]
        median = statistics.median(samples)
        if name == "bare":
            overhead = overhead_min = "—"
            spread = "—"
        else:
            paired = result.paired_overheads(name)
            overhead = _fmt(result.overhead(name))
            overhead_min = _fmt(result.overhead_of_minima(name))
            spread = f"{_fmt(min(paired))} … {_fmt(max(paired))}"
        lines.append(
            f"| {name} | {apps.VARIANTS[name]} | {_fmt(min(samples))} | {_fmt(median)} "
            f"| {overhead} | {overhead_min} | {spread} | {median / bare_median:.2f} |"
        )
    if delivered:
        lines.append("")
        lines.append(
            "| variant | requests | spans ended | handed to exporter | received by collector "
            "| dropped in processor | lost after processor |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for name, count in result.delivered.items():
            stats = result.spans.get(name)
            if stats is None:
                continue
            lines.append(
                f"| {name} | {result.total_requests[name]:,} | {stats.ended:,} "
                f"| {stats.exported:,} | {count:,} | {stats.dropped:,} "
                f"| {stats.exported - count:,} |"
            )
    return lines


def _ratio_lines(result: InProcess) -> list[str]:
    full = "otelkit-full"
    if full not in result.samples:
        return []
    lines = [
        "| comparison | overhead µs | vs overhead µs | ratio (medians of paired) "
        "| ratio (min - min) | per-round ratio range |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    full_paired = result.paired_overheads(full)
    for peer in PEERS:
        if peer not in result.samples:
            continue
        lines.append(
            f"| otelkit full ÷ {peer} | {_fmt(result.overhead(full))} "
            f"| {_fmt(result.overhead(peer))} "
            f"| {_ratio(result.overhead(full), result.overhead(peer))} "
            f"| {_ratio(result.overhead_of_minima(full), result.overhead_of_minima(peer))} "
            f"| {_round_ratio_range(full_paired, result.paired_overheads(peer))} |"
        )
    lines.append("")
    if "otelkit-sampled-out" in result.samples:
        sampled_out = result.overhead("otelkit-sampled-out")
        lines.append(
            f"- **Sampled-out overhead** (otelkit full, `ALWAYS_OFF`): "
            f"**{_fmt(sampled_out)} µs**/request (median of paired; min - min: "
            f"{_fmt(result.overhead_of_minima('otelkit-sampled-out'))} µs); sampling out saves "
            f"{_fmt(result.overhead(full) - sampled_out)} µs of the "
            f"{_fmt(result.overhead(full))} µs."
        )
    singles = [
        name
        for name in (
            "otelkit-request-id",
            "otelkit-tracing",
            "otelkit-metrics",
            "otelkit-access-log",
        )
        if name in result.samples
    ]
    if singles:
        parts = ", ".join(f"{name[8:]} {_fmt(result.overhead(name))}" for name in singles)
        lines.append(
            f"- **Features alone** (µs, each includes the middleware's base cost, i.e. "
            f"request-id only): {parts}."
        )
    return lines


def _e2e_table(result: EndToEnd) -> list[str]:
    lines = [
        "| variant | req/s (median) | p50 ms | p99 ms | server CPU µs/req (median) "
        "| CPU overhead µs/req (median of paired) | req/s ÷ bare | errors "
        "| access lines per request (app / uvicorn) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bare_rps = statistics.median(run.rps for run in result.runs["bare"])
    for name in result.variants:
        runs = result.runs.get(name) or []
        if not runs:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        rps = statistics.median(run.rps for run in runs)
        cpu = statistics.median(run.cpu_us_per_request for run in runs)
        overhead = (
            "—" if name == "bare" else _fmt(statistics.median(result.paired_cpu_overheads(name)))
        )
        ours, theirs = result.log_lines.get(name, (0, 0))
        served = max(result.requests.get(name, 0), 1)
        lines.append(
            f"| {name} | {_fmt(rps, 0)} | {_fmt(statistics.median(r.p50_ms for r in runs), 2)} "
            f"| {_fmt(statistics.median(r.p99_ms for r in runs), 2)} | {_fmt(cpu)} "
            f"| {overhead} | {rps / bare_rps:.2f} | {sum(r.errors for r in runs)} "
            f"| {ours / served:.2f} / {theirs / served:.2f} |"
        )
    return lines


def _dropped_table(
    in_process: InProcess, otlp: InProcess | None, e2e: EndToEnd | None
) -> list[str]:
    lines = [
        "| measure | variant | requests | spans ended | spans exported | server spans exported "
        "| **dropped** (ended - exported) | requests - server spans |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    sources: list[tuple[str, dict[str, int], dict[str, dict[str, int] | None]]] = [
        (
            "in-process",
            in_process.total_requests,
            {k: v.as_dict() if v else None for k, v in in_process.spans.items()},
        )
    ]
    if otlp is not None:
        sources.append(
            (
                "in-process OTLP",
                otlp.total_requests,
                {k: v.as_dict() if v else None for k, v in otlp.spans.items()},
            )
        )
    if e2e is not None:
        sources.append(("end to end", e2e.requests, e2e.spans))
    for measure, requests, spans in sources:
        for name, stats in spans.items():
            if stats is None:
                continue
            lines.append(
                f"| {measure} | {name} | {requests[name]:,} | {stats['ended']:,} "
                f"| {stats['exported']:,} | {stats['server_spans']:,} | **{stats['dropped']:,}** "
                f"| {requests[name] - stats['server_spans']:,} |"
            )
    return lines


def _command_output(command: list[str]) -> str:
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=10, cwd=REPO, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    return (completed.stdout or completed.stderr).strip().splitlines()[0] if completed else "n/a"


def environment() -> dict[str, Any]:
    """What the numbers depend on: interpreter, packages, CPU, server stack, tree state."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        changed = "unknown"
    else:
        # Other people edit src/ while this runs: say which files differed.
        files = [line[3:] for line in status]
        changed = f"{len(files)} uncommitted change(s) under src/" + (
            f" ({', '.join(files)})" if files else ""
        )
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "packages": versions,
        "wrk": _command_output(["wrk", "-v"]).split(" Copyright")[0],
        "uvicorn_stack": "uvicorn --workers 1, loop/http: "
        + ("uvloop" if versions["uvloop"] != "not installed" else "asyncio")
        + " / "
        + ("httptools" if versions["httptools"] != "not installed" else "h11"),
        "git_commit": _command_output(["git", "rev-parse", "--short", "HEAD"]),
        "src_changes": changed,
    }


def render_report(
    config: Config,
    env: dict[str, Any],
    in_process: InProcess,
    otlp: InProcess | None,
    e2e: EndToEnd | None,
    timing: dict[str, Any],
) -> str:
    """The Markdown report (also printed to stdout)."""
    lines = [
        "# otelkit overhead benchmark",
        "",
        f"Run {timing['started']} for {timing['seconds']:.0f} s: `{config.command}`. "
        f"Load average before {timing['load_before']}, after {timing['load_after']} "
        f"({env['usable_cpus']} usable CPUs). Compare **ratios within this run**; absolute "
        "times move from run to run (see bench/README.md).",
        "",
        "## In-process (ASGI driver, no server)",
        "",
        f"{config.requests:,} sequential requests per variant per round, {config.rounds} rounds, "
        "variant order rotated every round; one block = the requests + a flush of the "
        "variant's span processor. Overhead = variant - bare in the same round (paired), "
        "median over rounds; the range column shows its spread.",
        "",
        *_in_process_table(in_process),
        "",
        "### Ratios",
        "",
        *_ratio_lines(in_process),
        "",
    ]
    if otlp is not None:
        lines += [
            "## In-process with real OTLP/gRPC export",
            "",
            "Same driver and rounds; spans go through `OTLPSpanExporter` (gRPC, insecure) "
            "into an OTLP receiver (`tests.support.otlp.OtlpReceiver`) running in another "
            "process on 127.0.0.1, one receiver per variant. The flush at the end of each "
            "block is timed, so serialization and the gRPC calls are paid by the variant "
            "that caused them.",
            "",
            *_in_process_table(otlp, delivered=True),
            "",
        ]
        if "otelkit-full" in otlp.samples and "otel-contrib" in otlp.samples:
            full, contrib = otlp.overhead("otelkit-full"), otlp.overhead("otel-contrib")
            spread = _round_ratio_range(
                otlp.paired_overheads("otelkit-full"), otlp.paired_overheads("otel-contrib")
            )
            lines.append(
                f"- otelkit full ÷ otel-contrib with OTLP export: **{_ratio(full, contrib)}** "
                f"(per-round range {spread})."
            )
            lines.append("")
    if e2e is not None:
        lines += [
            "## End to end (uvicorn + wrk over loopback)",
            "",
            f"One uvicorn process per variant ({env['uvicorn_stack']}), all started at once; "
            f"`wrk -t{e2e.threads} -c{e2e.connections} -d{e2e.seconds}s --latency` per variant "
            f"per round, {e2e.rounds} rounds, order rotated each round, after a "
            f"{config.e2e_warmup_seconds} s warm-up each. Server CPU = utime + stime of the "
            "uvicorn process (all threads) from /proc during the wrk run, ÷ completed requests. "
            "wrk and the server share the machine's CPUs, so req/s and latency are bounded by "
            "both; CPU µs/request is the cleaner number. Servers run with `--no-access-log`; "
            "the last column counts the access lines each server actually wrote, per "
            "completed request: app = `http_request_completed` (otelkit's, or the structlog "
            "variant's), uvicorn = `uvicorn.access` lines that reached otelkit's log stream.",
            "",
            *_e2e_table(e2e),
            "",
        ]
    lines += [
        "## Spans dropped by the BatchSpanProcessor",
        "",
        "Default BatchSpanProcessor settings (queue 2048, batch 512, 5 s delay). "
        "`ended` counts spans handed to the processor, `exported` spans it handed to the "
        "exporter after the final flush: the difference is what the processor dropped "
        "because its queue was full. Some instrumentations make several spans per request "
        "(contrib: server + send spans; FastAPI native: operation spans), hence the "
        "server-span column. End to end, `requests` counts what wrk completed; requests in "
        "flight when wrk stops are served (and traced) but not counted, so the last column "
        "can be slightly negative.",
        "",
        *_dropped_table(in_process, otlp, e2e),
        "",
        "## Environment",
        "",
        f"- Python: {env['python']} on {env['platform']}",
        f"- CPU: {env['cpu_model']}; nproc {env['nproc']} ({env['usable_cpus']} usable)",
        f"- Server: {env['uvicorn_stack']}; load generator: {env['wrk']}",
        f"- otelkit tree: commit {env['git_commit']}, {env['src_changes']} when the run started",
        "- Packages: "
        + ", ".join(f"{name} {version}" for name, version in env["packages"].items()),
        "",
        "![per-request overhead](overhead.png)",
        "",
    ]
    return "\n".join(lines)


def render_chart(in_process: InProcess, e2e: EndToEnd | None, path: Path) -> None:
    """Bar chart of per-request overhead by variant (in-process; end-to-end CPU beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in in_process.variants if name != "bare"]
    panels: list[tuple[str, list[float], list[tuple[float, float]]]] = []
    medians = [in_process.overhead(name) for name in names]
    spreads = [
        (min(in_process.paired_overheads(n)), max(in_process.paired_overheads(n))) for n in names
    ]
    panels.append(("In-process: overhead µs/request vs bare", medians, spreads))
    if e2e is not None and all(e2e.runs.get(name) for name in ["bare", *names]):
        e2e_medians = [statistics.median(e2e.paired_cpu_overheads(n)) for n in names]
        e2e_spreads = [
            (min(e2e.paired_cpu_overheads(n)), max(e2e.paired_cpu_overheads(n))) for n in names
        ]
        panels.append(("End to end: server CPU µs/request vs bare", e2e_medians, e2e_spreads))
    figure, axes = plt.subplots(
        1, len(panels), figsize=(7 * len(panels), 0.45 * len(names) + 1.8), squeeze=False
    )
    colors = ["#1f77b4" if name.startswith("otelkit") else "#999999" for name in names]
    for axis, (title, values, spread) in zip(axes[0], panels, strict=True):
        positions = list(range(len(names)))
        errors = [
            [max(0.0, v - low) for v, (low, _) in zip(values, spread, strict=True)],
            [max(0.0, high - v) for v, (_, high) in zip(values, spread, strict=True)],
        ]
        axis.barh(positions, values, color=colors, xerr=errors, capsize=3)
        axis.set_yticks(positions, names)
        axis.invert_yaxis()
        axis.set_title(title)
        axis.set_xlabel("µs (median of per-round paired differences; whiskers: min-max)")
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_xlim(right=max(high for _, high in spread) * 1.12)  # room for the labels
        for position, value, (_, high) in zip(positions, values, spread, strict=True):
            axis.annotate(
                f"{value:.0f}",
                (max(value, high, 0), position),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything, write report.md, overhead.png and results.json, print the report."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    timing: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": _load(),
    }
    env = environment()
    log_dir = Path(tempfile.mkdtemp(prefix="otelkit-bench-logs-"))
    os.environ["BENCH_LOG_DIR"] = str(log_dir)
    try:
        _progress(f"in-process: {len(config.variants)} variants")
        in_process = run_in_process(config)
        otlp = run_otlp(config) if config.otlp else None
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    del os.environ["BENCH_LOG_DIR"]
    e2e = run_end_to_end(config) if config.e2e else None
    if e2e is None:
        _progress("end to end skipped (--no-e2e, or wrk is not installed)")
    timing["seconds"] = time.monotonic() - started
    timing["load_after"] = _load()
    report = render_report(config, env, in_process, otlp, e2e, timing)
    (config.out / "report.md").write_text(report)
    render_chart(in_process, e2e, config.out / "overhead.png")
    raw = {
        "config": asdict(config),
        "environment": env,
        "timing": timing,
        "in_process": {
            "samples_us": in_process.samples,
            "spans": {k: v.as_dict() if v else None for k, v in in_process.spans.items()},
        },
        "otlp": None
        if otlp is None
        else {
            "samples_us": otlp.samples,
            "spans": {k: v.as_dict() if v else None for k, v in otlp.spans.items()},
            "delivered": otlp.delivered,
        },
        "end_to_end": None
        if e2e is None
        else {
            "runs": {k: [asdict(run) for run in v] for k, v in e2e.runs.items()},
            "spans": e2e.spans,
            "requests": e2e.requests,
        },
    }
    (config.out / "results.json").write_text(json.dumps(raw, indent=2, default=str))
    print(report)
    _progress(f"done in {timing['seconds']:.0f} s; wrote {config.out}/report.md and overhead.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
