"""Exact Prometheus totals across pre-fork workers (gunicorn -w N, uvicorn --workers N).

A scrape of ``/metrics`` reaches one worker, which alone knows only its own
requests. With ``PROMETHEUS_MULTIPROC_DIR`` set, every worker writes a
snapshot of its cumulative metrics to a file of its own in that directory,
once a second, at shutdown, and when it serves a scrape. The worker serving a
scrape merges every file:

- counters and histograms are summed over all workers, dead ones included,
  so totals survive a worker restart and never go backwards;
- up-down counters (``http_requests_in_progress``) are summed over live
  workers only, and gauges take the newest live worker's value.

Files of dead workers are folded into one archive file now and then (under
an exclusive ``flock``, while readers take a shared one), so the directory
does not grow with every restart. This is the model of prometheus_client's
multiprocess mode, applied to OpenTelemetry's cumulative state, so that every
instrument on the meter provider (semantic-convention metrics, exemplars,
other libraries' instruments) is merged, not only otelkit's own.

Limits: a worker killed with SIGKILL loses what it recorded since its last
snapshot (at most one interval); the newest snapshot of other workers is up
to one interval old when a scrape is served.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from otelkit.prometheus import Family, PrometheusReader, Sample, families_from, render_families

__all__ = ["WorkerSnapshots"]

PREFIX = "otelkit-"
ARCHIVE = "otelkit-archive.json"
_LOCK = ".otelkit.lock"
INTERVAL = 1.0
_COMPACT_EVERY = 30.0
# A worker's own identity differs per process and would make target_info
# flap between scrapes served by different workers.
_PER_PROCESS_RESOURCE = ("service.instance.id", "process.pid")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _encode(families: Iterable[Family]) -> list[dict[str, Any]]:
    return [
        {
            "name": fam.name,
            "kind": fam.kind,
            "help": fam.help,
            "additive": fam.additive,
            "samples": [
                [s.labels, s.value, list(s.bounds), s.buckets, s.total, s.exemplars]
                for s in fam.samples
            ],
        }
        for fam in families
    ]


def _decode(raw: list[dict[str, Any]]) -> list[Family]:
    families = []
    for item in raw:
        fam = Family(item["name"], item["kind"], item["help"], additive=item["additive"])
        for labels, value, bounds, buckets, total, exemplars in item["samples"]:
            fam.samples.append(
                Sample(labels, value, tuple(bounds), buckets, total, [tuple(e) for e in exemplars])
            )
        families.append(fam)
    return families


def _key(labels: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


class _Merger:
    """Adds worker snapshots together family by family, series by series."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}
        self._series: dict[str, dict[tuple[tuple[str, str], ...], tuple[Sample, float]]] = {}

    def add(self, families: Iterable[Family], *, live: bool, written: float) -> None:
        for fam in families:
            cumulative = fam.kind in {"counter", "histogram"}
            if not cumulative and not live:
                continue  # a dead worker's gauges describe nothing current
            merged = self.families.get(fam.name)
            if merged is None:
                merged = self.families[fam.name] = Family(
                    fam.name, fam.kind, fam.help, additive=fam.additive
                )
                self._series[fam.name] = {}
            elif merged.kind != fam.kind:
                continue
            series = self._series[fam.name]
            for sample in fam.samples:
                key = _key(sample.labels)
                existing = series.get(key)
                if existing is None:
                    copy = Sample(
                        dict(sample.labels),
                        sample.value,
                        sample.bounds,
                        list(sample.buckets),
                        sample.total,
                        list(sample.exemplars),
                    )
                    series[key] = (copy, written)
                    merged.samples.append(copy)
                    continue
                target, target_written = existing
                if fam.kind == "histogram":
                    if target.bounds != sample.bounds:
                        continue  # boundaries changed between deploys: keep the first
                    target.buckets = [
                        a + b for a, b in zip(target.buckets, sample.buckets, strict=True)
                    ]
                    target.total += sample.total
                    target.value += sample.value
                    target.exemplars.extend(sample.exemplars)
                elif fam.kind == "counter" or fam.additive:
                    target.value += sample.value
                elif written > target_written:
                    target.value = sample.value
                    series[key] = (target, written)


class WorkerSnapshots:
    """This worker's snapshot file, and the merged view of all workers' files."""

    def __init__(self, directory: str | os.PathLike[str], reader: PrometheusReader) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._reader = reader
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._last_compaction = 0.0
        self._start_process()
        self_ref = weakref.ref(self)

        def after_fork() -> None:
            snapshots = self_ref()
            if snapshots is not None:
                snapshots._start_process()

        # A pre-fork server (gunicorn --preload) forks after instrument():
        # each child needs its own file and its own writer thread.
        os.register_at_fork(after_in_child=after_fork)
        atexit.register(self.close)

    def _start_process(self) -> None:
        self._pid = os.getpid()
        self._path = self.directory / f"{PREFIX}{self._pid}-{uuid.uuid4().hex[:12]}.json"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otelkit-multiprocess", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(INTERVAL):
            try:
                self.write()
                if time.monotonic() - self._last_compaction > _COMPACT_EVERY:
                    self._last_compaction = time.monotonic()
                    self.compact()
            except Exception as exc:  # keep the worker serving whatever the disk does
                from otelkit.metrics import warn_once_per_minute

                warn_once_per_minute(
                    "multiprocess",
                    "metrics_snapshot_failed",
                    error=str(exc),
                    directory=str(self.directory),
                )

    def write(self) -> None:
        """Write this worker's cumulative metrics to its file (atomically)."""
        resource, families = families_from(self._reader.snapshot())
        payload = orjson.dumps(
            {
                "pid": self._pid,
                "written": time.time(),
                "resource": {k: v for k, v in resource.items() if k not in _PER_PROCESS_RESOURCE},
                "families": _encode(families),
            }
        )
        with self._write_lock:
            temporary = self._path.with_name(f".{self._path.name}.tmp")
            temporary.write_bytes(payload)
            os.replace(temporary, self._path)

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        # fcntl is POSIX-only; importing it here keeps otelkit importable on
        # Windows, where pre-fork servers (and this mode) do not exist.
        import fcntl

        with (self.directory / _LOCK).open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _snapshots(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        for path in sorted(self.directory.glob(f"{PREFIX}*.json")):
            try:
                yield path, orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue  # removed or being replaced right now: the next scrape has it

    def merged(self) -> tuple[dict[str, Any], list[Family]]:
        """All workers' metrics, merged (this worker's written fresh first)."""
        self.write()
        merger = _Merger()
        resource: dict[str, Any] = {}
        with self._locked(exclusive=False):
            for path, snapshot in self._snapshots():
                pid = int(snapshot.get("pid", 0))
                live = path.name != ARCHIVE and _alive(pid)
                if pid == self._pid and path != self._path:
                    live = False  # an earlier process with this pid
                if path == self._path:
                    resource = snapshot.get("resource", {})
                merger.add(
                    _decode(snapshot.get("families", [])),
                    live=live,
                    written=float(snapshot.get("written", 0.0)),
                )
        return resource, list(merger.families.values())

    def render(self, *, openmetrics: bool) -> str:
        """The merged exposition, as one worker answers a scrape."""
        resource, families = self.merged()
        return render_families(resource, families, openmetrics=openmetrics)

    def compact(self) -> None:
        """Fold dead workers' files into the archive, so the directory stays small."""
        with self._locked(exclusive=True):
            dead: list[Path] = []
            merger = _Merger()
            for path, snapshot in self._snapshots():
                pid = int(snapshot.get("pid", 0))
                is_archive = path.name == ARCHIVE
                if is_archive or not _alive(pid) or (pid == self._pid and path != self._path):
                    merger.add(_decode(snapshot.get("families", [])), live=False, written=0.0)
                    if not is_archive:
                        dead.append(path)
            if not dead:
                return
            archive = self.directory / ARCHIVE
            temporary = archive.with_name(f".{ARCHIVE}.tmp")
            temporary.write_bytes(
                orjson.dumps(
                    {"pid": 0, "written": 0.0, "families": _encode(merger.families.values())}
                )
            )
            os.replace(temporary, archive)
            for path in dead:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the writer and write a last snapshot (at shutdown)."""
        self._stop.set()
        if os.getpid() == self._pid:
            with contextlib.suppress(Exception):
                self.write()
