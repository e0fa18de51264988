"""The multi-worker merge, in process: dead workers' totals stay, their gauges go."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from opentelemetry.sdk.metrics import MeterProvider

from otelkit._multiprocess import ARCHIVE, PREFIX, WorkerSnapshots
from otelkit.prometheus import PrometheusReader


def _dead_pid() -> int:
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(process.stdout)


def _snapshot(directory: Path, pid: int, requests: float, in_progress: float) -> None:
    families = [
        {
            "name": "http_requests",
            "kind": "counter",
            "help": "",
            "additive": True,
            "samples": [[{"endpoint": "/x"}, requests, [], [], 0.0, []]],
        },
        {
            "name": "http_requests_in_progress",
            "kind": "gauge",
            "help": "",
            "additive": True,
            "samples": [[{"endpoint": "/x"}, in_progress, [], [], 0.0, []]],
        },
        {
            "name": "http_request_duration_seconds",
            "kind": "histogram",
            "help": "",
            "additive": True,
            "samples": [
                [
                    {"endpoint": "/x"},
                    requests,
                    [0.1, 1.0],
                    [int(requests), 0, 0],
                    requests * 0.05,
                    [],
                ]
            ],
        },
    ]
    path = directory / f"{PREFIX}{pid}-dead.json"
    path.write_text(json.dumps({"pid": pid, "written": 1.0, "families": families}))


def _values(snapshots: WorkerSnapshots) -> dict[str, float]:
    _, families = snapshots.merged()
    return {fam.name: sum(s.value for s in fam.samples) for fam in families}


def test_dead_workers_count_in_totals_not_in_gauges_and_compaction_keeps_totals(
    tmp_path: Path,
) -> None:
    provider = MeterProvider()
    reader = PrometheusReader()
    provider.add_metric_reader(reader)
    counter = provider.get_meter("t").create_counter("http_requests")
    counter.add(3, {"endpoint": "/x"})
    snapshots = WorkerSnapshots(tmp_path, reader)
    try:
        _snapshot(tmp_path, _dead_pid(), requests=10, in_progress=2)
        _snapshot(tmp_path, _dead_pid(), requests=5, in_progress=1)
        before = _values(snapshots)
        assert before["http_requests"] == 18  # 3 live + 10 + 5 dead
        assert "http_requests_in_progress" not in before  # dead workers' gauges are gone
        assert before["http_request_duration_seconds"] == 15
        snapshots.compact()
        files = sorted(p.name for p in tmp_path.glob(f"{PREFIX}*.json"))
        assert ARCHIVE in files
        assert len(files) == 2  # the archive and this worker's own file
        assert _values(snapshots) == before
        text = snapshots.render(openmetrics=False)
        assert 'http_requests_total{endpoint="/x"} 18' in text
    finally:
        snapshots.close()
        provider.shutdown()


def test_a_corrupt_or_vanishing_file_does_not_break_the_scrape(tmp_path: Path) -> None:
    provider = MeterProvider()
    reader = PrometheusReader()
    provider.add_metric_reader(reader)
    provider.get_meter("t").create_counter("jobs").add(1)
    snapshots = WorkerSnapshots(tmp_path, reader)
    try:
        (tmp_path / f"{PREFIX}1-broken.json").write_text("{not json")
        assert "jobs_total 1" in snapshots.render(openmetrics=False)
    finally:
        snapshots.close()
        provider.shutdown()
