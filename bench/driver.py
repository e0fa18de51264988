"""An in-process ASGI driver: requests straight into the app, no server, no socket.

Why: a socket, an HTTP parser and a client cost far more than a middleware,
and their noise hides it. Calling the ASGI app directly leaves only the
application and its instrumentation on the clock, so the difference between
two variants is what the instrumentation costs per request.

What it keeps from a real server, because instrumentation depends on it:
lifespan startup (once per app, with its ``state`` copied into each request,
as uvicorn does), one asyncio task per request (context variables are per task,
and otelkit attaches its context to the current one), a ``receive`` that
reports ``http.disconnect`` only once the response is complete, and the
headers a client sends (host, user-agent, accept).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Final

from starlette.types import ASGIApp, Message

__all__ = ["Driver", "RequestFailedError"]

_REQUEST: Final[Message] = {"type": "http.request", "body": b"", "more_body": False}
_DISCONNECT: Final[Message] = {"type": "http.disconnect"}
_HEADERS: Final = (
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"otelkit-bench/1.0"),
    (b"accept", b"*/*"),
)


class RequestFailedError(RuntimeError):
    """A request did not answer 200: the benchmark would time the wrong thing."""


class _Exchange:
    """The receive/send pair of one request."""

    __slots__ = ("complete", "received", "status", "waiter")

    def __init__(self) -> None:
        self.status = 0
        self.received = False
        self.complete = False
        self.waiter: asyncio.Future[None] | None = None

    async def receive(self) -> Message:
        if not self.received:
            self.received = True
            return _REQUEST
        if not self.complete:  # like a server: wait until the client goes away
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.complete = True
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)


@dataclass(slots=True)
class Driver:
    """Drives one app: ``await startup()``, then ``await run(n)``, then ``await shutdown()``."""

    app: ASGIApp
    path: str
    state: dict[str, Any] = field(default_factory=dict)
    _lifespan_task: asyncio.Task[None] | None = None
    _to_app: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    _from_app: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)

    async def startup(self) -> None:
        """Run the lifespan protocol's startup, as a server does once."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        scope["state"] = self.state
        self._lifespan_task = asyncio.ensure_future(
            self.app(scope, self._to_app.get, self._from_app.put)
        )
        await self._to_app.put({"type": "lifespan.startup"})
        reply = await self._from_app.get()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"lifespan startup failed: {reply}")

    async def shutdown(self) -> None:
        """Run the lifespan shutdown (otelkit flushes its providers there)."""
        if self._lifespan_task is None:
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._from_app.get()
        await self._lifespan_task
        self._lifespan_task = None

    def _scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": list(_HEADERS),
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": dict(self.state),
        }

    async def request(self) -> int:
        """One request, in a task of its own as a server runs it; returns the status."""
        exchange = _Exchange()
        await asyncio.ensure_future(self.app(self._scope(), exchange.receive, exchange.send))
        return exchange.status

    async def run(self, count: int) -> float:
        """``count`` requests one after the other; returns the seconds they took.

        Raises:
            RequestFailedError: a response was not a 200.
        """
        app = self.app
        spawn = asyncio.ensure_future
        scope = self._scope
        failures = 0
        start = time.perf_counter()
        for _ in range(count):
            exchange = _Exchange()
            await spawn(app(scope(), exchange.receive, exchange.send))
            if exchange.status != 200:
                failures += 1
        elapsed = time.perf_counter() - start
        if failures:
            raise RequestFailedError(f"{failures} of {count} requests did not answer 200")
        return elapsed
