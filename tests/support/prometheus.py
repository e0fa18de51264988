"""A real Prometheus server for tests.

otelkit's promise is about what Prometheus sees: counters that add up,
histograms ``histogram_quantile`` can read, exemplars that carry the trace
id. A parser of our own would only agree with our own renderer, so the tests
that matter run the real ``prometheus`` binary against the app and query it
the way a user would.

Typical use::

    with PrometheusServer([f"127.0.0.1:{port}"]) as prom:
        prom.wait_for_scrape("test")
        assert prom.query_scalar('sum(http_requests_total{status="200"})') == 3

The server listens on 127.0.0.1 on a free port, keeps its configuration and
TSDB in a temporary directory, and is always stopped on exit (terminated,
then killed if it does not go within a few seconds), so a failing test
cannot leak a process or a port.

When the binary is missing the tests that need it are skipped with the
reason, except in CI (``CI`` set), where a missing tool is a broken
environment and must fail loudly instead of turning the suite green by
skipping it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self, TypeVar

import httpx
import pytest

__all__ = [
    "PrometheusError",
    "PrometheusServer",
    "in_ci",
    "prometheus_binary",
    "promtool_binary",
    "require_tool",
    "wait_until",
]

T = TypeVar("T")

#: How long to wait for ``/-/ready``: a cold start with an empty TSDB takes
#: well under a second here; the margin is for a loaded CI machine.
DEFAULT_READY_TIMEOUT = 30.0
#: How long to wait for a process that was sent SIGTERM before killing it.
DEFAULT_STOP_TIMEOUT = 5.0
#: The first scrape of a new target happens about 6 s after start (the
#: discovery manager batches target updates every 5 s), so waits for a scrape
#: need comfortably more than that.
DEFAULT_SCRAPE_TIMEOUT = 30.0

_FALSE_VALUES = frozenset({"", "0", "false", "no", "off"})


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its HTTP API answered with an error."""


def in_ci() -> bool:
    """Whether the tests run in CI, where a missing tool is a failure, not a skip.

    CI systems set ``CI`` (``CI=true`` on GitHub Actions and in this project's
    ``.ci/run``); an explicit ``CI=false`` or ``CI=0`` counts as not set.
    """
    return os.environ.get("CI", "").strip().lower() not in _FALSE_VALUES


def _missing(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason}; CI is set, so this is a broken environment, not a skip")
    pytest.skip(reason)


def require_tool(name: str, env_var: str | None = None) -> str:
    """The absolute path of the executable ``name``, or skip (fail in CI) without it.

    Args:
        name: the executable to look up on ``PATH``.
        env_var: an environment variable that may name the executable
            explicitly (for a binary outside ``PATH``); it wins when set, and
            a value that is not an executable file is reported, not ignored.
    """
    explicit = os.environ.get(env_var, "") if env_var else ""
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.resolve())
        _missing(f"{env_var}={explicit!r} is not an executable file")
    found = shutil.which(name)
    if found is None:
        hint = f" (or set {env_var})" if env_var else ""
        _missing(f"{name!r} is not installed: apt-get install -y prometheus{hint}")
    return found


def prometheus_binary() -> str:
    """The ``prometheus`` server binary (``$PROMETHEUS_BIN`` or ``PATH``)."""
    return require_tool("prometheus", "PROMETHEUS_BIN")


def promtool_binary() -> str:
    """The ``promtool`` binary (``$PROMTOOL_BIN`` or ``PATH``)."""
    return require_tool("promtool", "PROMTOOL_BIN")


def wait_until(
    fn: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Call ``fn`` until it returns a truthy value, and return that value.

    Polling instead of sleeping a fixed time keeps the fast case fast and
    the slow case correct. An exception raised by ``fn`` counts as "not yet"
    (a query against a server that is still loading may fail); if time runs
    out, the last value and the last exception are in the error.

    Raises:
        TimeoutError: ``fn`` gave nothing truthy within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_value: object = None
    last_error: Exception | None = None
    while True:
        try:
            value = fn()
        except Exception as exc:  # retried until the deadline, then reported
            last_error = exc
        else:
            if value:
                return value
            last_value = value
            last_error = None
        if time.monotonic() >= deadline:
            detail = f"last error: {last_error!r}" if last_error else f"last value: {last_value!r}"
            raise TimeoutError(f"{message} not met within {timeout:g}s; {detail}") from last_error
        time.sleep(interval)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _check_loopback(target: str) -> None:
    # Tests talk to servers on this machine only; a typo that points
    # Prometheus at another host should fail here, not send traffic there.
    host = target.rsplit(":", 1)[0].strip("[]") if ":" in target else target
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"scrape target {target!r} is not a loopback address")


def _scrape_configs(
    targets: Sequence[str] | Sequence[Mapping[str, Any]],
    *,
    job_name: str,
    metrics_path: str,
) -> list[dict[str, Any]]:
    if isinstance(targets, str | bytes):
        raise TypeError("targets must be a list of 'host:port' strings or of scrape configs")
    items = list(targets)
    if all(isinstance(item, str) for item in items):
        strings = [str(item) for item in items]
        for target in strings:
            _check_loopback(target)
        if not strings:
            return []
        return [
            {
                "job_name": job_name,
                "metrics_path": metrics_path,
                "static_configs": [{"targets": strings}],
            }
        ]
    if all(isinstance(item, Mapping) for item in items):
        configs = [dict(item) for item in items if isinstance(item, Mapping)]
        for config in configs:
            for static in config.get("static_configs", ()):
                for target in static.get("targets", ()):
                    _check_loopback(str(target))
        return configs
    raise TypeError("targets mixes 'host:port' strings and scrape configs")


class PrometheusServer:
    """A ``prometheus`` process for one test, used as a context manager.

    Args:
        targets: ``"127.0.0.1:PORT"`` strings, scraped as one job named
            ``job_name`` at ``metrics_path``; or complete scrape configs
            (dicts as in ``prometheus.yml``) for anything more specific.
        scrape_interval: also used as the rule evaluation interval, so that
            recording rules and alerts keep up with the scrapes.
        exemplars: start with ``--enable-feature=exemplar-storage`` (without
            it Prometheus drops exemplars at scrape time).
        rule_files: rule files to load, referenced by absolute path.
        metrics_path: path scraped on string targets.
        job_name: job label of string targets.
        ready_timeout: seconds to wait for ``/-/ready``.
        extra_args: more command-line flags for the server.
    """

    def __init__(
        self,
        targets: Sequence[str] | Sequence[Mapping[str, Any]],
        scrape_interval: str = "1s",
        exemplars: bool = True,
        rule_files: Iterable[str | os.PathLike[str]] = (),
        metrics_path: str = "/metrics",
        *,
        job_name: str = "test",
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.scrape_interval = scrape_interval
        self.exemplars = exemplars
        self.job_name = job_name
        self.ready_timeout = ready_timeout
        self.extra_args = tuple(extra_args)
        self.rule_files = [Path(path).resolve() for path in rule_files]
        for path in self.rule_files:
            if not path.is_file():
                raise FileNotFoundError(f"rule file {path} does not exist")
        self.config: dict[str, Any] = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": scrape_interval,
            },
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": _scrape_configs(
                targets, job_name=job_name, metrics_path=metrics_path
            ),
        }
        self.port: int | None = None
        self.workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._client = httpx.Client(timeout=10.0, trust_env=False)

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:40123``."""
        if self.port is None:
            raise PrometheusError("the server is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path | None:
        """Where the server's own log goes (for a failing test to read)."""
        return self.workdir / "prometheus.log" if self.workdir else None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log, for error messages."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        text = path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Write the config, start the process and wait until it is ready.

        A free port is picked by binding port 0 and releasing it; another
        process may take it in between, so an "address already in use" start
        is retried on a new port a few times.
        """
        if self._process is not None:
            raise PrometheusError("already started")
        binary = prometheus_binary()
        if self._client.is_closed:  # started again after a stop()
            self._client = httpx.Client(timeout=10.0, trust_env=False)
        self.workdir = Path(tempfile.mkdtemp(prefix="otelkit-prometheus-"))
        config_path = self.workdir / "prometheus.yml"
        # JSON is YAML, and keeps this module free of a YAML dependency.
        config_path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        for _attempt in range(3):
            self.port = _free_port()
            args = [
                binary,
                f"--config.file={config_path}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=info",
            ]
            if self.exemplars:
                args.append("--enable-feature=exemplar-storage")
            args.extend(self.extra_args)
            assert self.log_path is not None
            self._log = self.log_path.open("ab")
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
            if self._wait_ready():
                return
            self._stop_process()
            if "address already in use" not in self.log_tail():
                break
        message = f"prometheus exited during start-up; log:\n{self.log_tail()}"
        self.stop()
        raise PrometheusError(message)

    def _wait_ready(self) -> bool:
        """True once ``/-/ready`` answers 200; False if the process died first."""
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if self._client.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return True
            time.sleep(0.05)
        message = f"prometheus not ready within {self.ready_timeout:g}s; log:\n{self.log_tail()}"
        self.stop()
        raise TimeoutError(message)

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=DEFAULT_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=DEFAULT_STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and delete its files. Idempotent."""
        try:
            self._stop_process()
        finally:
            self._client.close()
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None
            self.port = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The running process (None before start and after stop)."""
        return self._process

    # -- HTTP API --------------------------------------------------------------

    def api(self, path: str, params: Mapping[str, str | float] | None = None) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``.

        Raises:
            PrometheusError: the API answered with ``status: error`` (a bad
                query, for instance), with Prometheus's own message.
        """
        response = self._client.get(f"{self.url}/api/v1/{path}", params=params)
        try:
            body = response.json()
        except ValueError as exc:
            raise PrometheusError(
                f"{path}: HTTP {response.status_code}, not JSON: {response.text[:200]!r}"
            ) from exc
        if body.get("status") != "success":
            raise PrometheusError(
                f"{path} {dict(params or {})}: {body.get('errorType')}: {body.get('error')}"
            )
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the result list (``{"metric": ..., "value": [ts, "v"]}``).

        A scalar or string result is returned as one element with empty
        ``metric``, so callers handle a single shape.
        """
        params: dict[str, str | float] = {"query": promql}
        if at is not None:
            params["time"] = at
        data = self.api("query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_scalar(self, promql: str, at: float | None = None) -> float | None:
        """The single value of an instant query; None when it returns nothing.

        Raises:
            ValueError: the query returned more than one series (aggregate
                it, e.g. with ``sum(...)``, to get one number).
        """
        result = self.query(promql, at)
        if not result:
            return None
        if len(result) > 1:
            series = [item.get("metric") for item in result]
            raise ValueError(f"{promql!r} returned {len(result)} series, not one: {series}")
        return float(result[0]["value"][1])

    def query_exemplars(
        self, promql: str, start: float | None = None, end: float | None = None
    ) -> list[dict[str, Any]]:
        """Exemplars of the series selected by ``promql`` between ``start`` and ``end``.

        Returns Prometheus's list of ``{"seriesLabels": ..., "exemplars":
        [{"labels": {"trace_id": ...}, "value": "...", "timestamp": ...}]}``.
        ``end`` defaults to now and ``start`` to an hour before ``end``.
        """
        end = time.time() if end is None else end
        start = end - 3600 if start is None else start
        result: list[dict[str, Any]] = self.api(
            "query_exemplars", {"query": promql, "start": start, "end": end}
        )
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, with ``health``, ``lastError`` and ``labels``."""
        active: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return active

    def _matching_targets(self, target: str) -> list[dict[str, Any]]:
        return [
            item
            for item in self.targets()
            if target
            in (
                item["labels"].get("job"),
                item["labels"].get("instance"),
                item.get("scrapeUrl"),
                item.get("scrapePool"),
            )
        ]

    def wait_for_scrape(
        self, target: str | None = None, timeout: float = DEFAULT_SCRAPE_TIMEOUT
    ) -> dict[str, Any]:
        """Wait until ``target`` has been scraped successfully; return the target.

        ``target`` is matched against the job name, the instance
        (``host:port``) and the scrape URL; it defaults to ``job_name``. The
        wait ends when the target reports health ``up`` *and* its ``up``
        sample is queryable: health is set just before the scrape's samples
        are committed, and a query made in between would see nothing.

        Raises:
            TimeoutError: with the target's state and last scrape error.
        """
        wanted = self.job_name if target is None else target
        seen: list[dict[str, Any]] = []

        def scraped() -> dict[str, Any] | None:
            nonlocal seen
            seen = self._matching_targets(wanted)
            for item in seen:
                if item.get("health") != "up":
                    continue
                labels = item["labels"]
                selector = f'up{{job="{labels["job"]}",instance="{labels["instance"]}"}}'
                if self.query_scalar(selector) == 1.0:
                    return item
            return None

        try:
            return wait_until(scraped, timeout, interval=0.2, message=f"a scrape of {wanted!r}")
        except TimeoutError as exc:
            states = [
                {k: item.get(k) for k in ("scrapeUrl", "health", "lastError")} for item in seen
            ]
            raise TimeoutError(
                f"{wanted!r} not scraped within {timeout:g}s; matching targets: {states}"
            ) from exc

    def wait_until(
        self, fn: Callable[[], T | None], timeout: float = 10.0, *, message: str = "condition"
    ) -> T:
        """:func:`wait_until`, for the tests that hold only the server."""
        return wait_until(fn, timeout, message=message)
