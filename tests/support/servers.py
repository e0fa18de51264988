"""Run the app under a real server (uvicorn, gunicorn, the launcher) in a subprocess.

Servers bind 127.0.0.1 on a free port, their output goes to a file the test
reads, and they are always stopped: SIGTERM first (a graceful shutdown is
often what is being tested), SIGKILL if they do not exit in time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server subprocess and what it printed."""

    process: subprocess.Popen[bytes]
    port: int
    output_path: Path
    _output: IO[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything printed so far (stdout and stderr together)."""
        self._output.flush()
        return self.output_path.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        """The output lines that are JSON objects."""
        records = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the server, wait for it to exit, return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return int(self.process.returncode)


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers; fail early if the process died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before answering")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"server did not answer {url} within {timeout}s: {last}")


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a server: this one minus OTEL_* noise, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "OTELKIT_", "LOG_", "PROMETHEUS_MULTIPROC"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@contextmanager
def serve(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    ready_path: str = "/health",
    timeout: float = 30.0,
) -> Iterator[Server]:
    """Start ``argv`` (``{port}`` in it is replaced) and yield once it answers."""
    port = port or free_port()
    args = [arg.replace("{port}", str(port)) for arg in argv]
    with tempfile.TemporaryDirectory(prefix="otelkit-server-") as tmp:
        output_path = Path(tmp) / "output.log"
        with output_path.open("wb") as output:
            process = subprocess.Popen(
                args,
                cwd=REPO,
                env=base_env(env),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            server = Server(process, port, output_path, output)
            try:
                wait_until_up(server.url + ready_path, process, timeout)
                yield server
            finally:
                server.stop()


def uvicorn(app: str = "examples.modelling.app:app", *extra: str) -> list[str]:
    """The argv that serves ``app`` with uvicorn on 127.0.0.1:{port}."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        *extra,
    ]
