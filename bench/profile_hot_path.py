"""Where otelkit-full's per-request time goes: cProfile over the in-process driver.

    python bench/profile_hot_path.py [--requests 20000] [--variant otelkit-full] [--top 25]

Why a separate script: profiling multiplies the cost of every Python call, so
its numbers must never mix with the benchmark's. Use it to see *what*
dominates (sorted by tottime: time spent in the function itself), then check
any change with ``bench/run.py``. The same app and driver as the benchmark are
used, so the profile is of exactly what the benchmark measures. Only the main
thread is profiled: the BatchSpanProcessor's worker thread is not in the table.

(Not named ``profile.py``: that would shadow the standard library module that
``cProfile`` imports.)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import site
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import os  # noqa: E402
import shutil  # noqa: E402

_LOG_DIR = tempfile.mkdtemp(prefix="otelkit-bench-profile-")
os.environ["BENCH_LOG_DIR"] = _LOG_DIR  # the access log's file, removed at the end

from bench import apps  # noqa: E402
from bench.driver import Driver  # noqa: E402


def _short(path: str) -> str:
    """A file name a reader can place: repo-relative, site-packages-relative or stdlib/."""
    prefixes = [(str(REPO) + "/", "")]
    prefixes += [(p + "/", "") for p in site.getsitepackages()]
    prefixes.append((sysconfig.get_paths()["stdlib"] + "/", "stdlib/"))
    for prefix, replacement in prefixes:
        if path.startswith(prefix):
            return replacement + path[len(prefix) :]
    return path


def _area(path: str) -> str:
    """The package (or otelkit module) a file belongs to, to add time up by area."""
    short = _short(path)
    parts = short.split("/")
    if parts[0] == "src":
        return short.removeprefix("src/")
    if parts[0] == "opentelemetry" and len(parts) > 2:
        return "/".join(parts[:3] if parts[1] == "sdk" and len(parts) > 3 else parts[:2])
    if parts[0] == "stdlib" and len(parts) > 1:
        return "stdlib/" + parts[1].removesuffix(".py")
    return parts[0].removesuffix(".py")


def _by_area(raw: dict[Any, Any]) -> dict[str, float]:
    """tottime per area; built-ins (no file) are charged to the areas that called them."""
    totals: dict[str, float] = {}
    for (filename, _, _), entry in raw.items():
        if filename == "~" or filename.startswith("<frozen"):
            callers: dict[Any, Any] = entry[4]
            for (caller_file, _, _), caller_entry in callers.items():
                area = _area(caller_file) if caller_file != "~" else "builtins"
                totals[area] = totals.get(area, 0.0) + caller_entry[2]
        else:
            area = _area(filename)
            totals[area] = totals.get(area, 0.0) + entry[2]
    return totals


async def _profile(variant: str, requests: int) -> tuple[cProfile.Profile, float]:
    built = apps.build(variant)
    driver = Driver(built.app, apps.ITEM_PATH)
    await driver.startup()
    await driver.run(2000)  # warm: first-request caches, lazy imports
    built.flush()
    profiler = cProfile.Profile()
    profiler.enable()
    elapsed = await driver.run(requests)
    built.flush()
    profiler.disable()
    await driver.shutdown()
    built.shutdown()
    return profiler, elapsed


def main(argv: Sequence[str] | None = None) -> int:
    """Profile, then print the top functions by tottime as a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--variant", default="otelkit-full", choices=list(apps.VARIANTS))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--save", type=Path, help="also write the raw pstats file here")
    args = parser.parse_args(argv)
    try:
        profiler, elapsed = asyncio.run(_profile(args.variant, args.requests))
    finally:
        shutil.rmtree(_LOG_DIR, ignore_errors=True)
    stats = pstats.Stats(profiler)
    if args.save:
        stats.dump_stats(args.save)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values())
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[: args.top]
    print(
        f"{args.variant}: {args.requests:,} requests, "
        f"{elapsed / args.requests * 1e6:.1f} µs/request under cProfile; "
        f"total tottime {total:.2f} s\n"
    )
    print(
        "| # | function | file:line | calls | tottime s | % of tottime | µs/request | cumtime s |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for rank, ((filename, line, name), entry) in enumerate(rows, start=1):
        calls, tottime, cumtime = entry[1], entry[2], entry[3]
        where = _short(filename) + (f":{line}" if line else "")
        print(
            f"| {rank} | `{name}` | {where} | {calls:,} | {tottime:.3f} "
            f"| {tottime / total * 100:.1f} | {tottime / args.requests * 1e6:.2f} "
            f"| {cumtime:.3f} |"
        )
    print("\nOwn time by area (built-ins charged to their callers):\n")
    print("| area | tottime s | % of tottime |")
    print("|---|---:|---:|")
    for area, seconds in sorted(_by_area(raw).items(), key=lambda item: -item[1])[: args.top]:
        print(f"| {area} | {seconds:.3f} | {seconds / total * 100:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
