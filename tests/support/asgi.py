"""Call an ASGI app directly, with any bytes a hostile client could put on the wire.

HTTP clients refuse to send malformed headers or paths; ASGI servers pass
through much of what arrives. Building the scope by hand lets the tests
send exactly the bytes they mean to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]


@dataclass
class Response:
    """What the app sent back."""

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    messages: list[Message] = field(default_factory=list)

    def header(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower-case bytes)."""
        return [value for key, value in self.headers if key.lower() == name]


def http_scope(
    path: str = "/",
    *,
    method: str = "GET",
    headers: Sequence[tuple[bytes, bytes]] = (),
    query_string: bytes = b"",
    raw_path: bytes | None = None,
    client: tuple[str, int] | None = ("127.0.0.1", 50000),
) -> dict[str, Any]:
    """A scope as uvicorn would build it (servers decode the path as latin-1/utf-8)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode("utf-8", "surrogateescape"),
        "root_path": "",
        "query_string": query_string,
        "headers": [(b"host", b"testserver"), *headers],
        "client": client,
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def call(
    app: Callable[..., Awaitable[None]],
    scope: dict[str, Any],
    *,
    body: bytes = b"",
    disconnect_before_body: bool = False,
    fail_send_after: int | None = None,
) -> Response:
    """Run one request through ``app``; exceptions escaping the app propagate.

    Args:
        disconnect_before_body: ``receive`` reports the client gone at once.
        fail_send_after: ``send`` raises ``OSError`` (a broken connection)
            once this many messages went through.
    """
    response = Response()
    sent = 0
    received = False

    async def receive() -> Message:
        nonlocal received
        if disconnect_before_body or received:
            await asyncio.sleep(0 if disconnect_before_body else 3600)
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        nonlocal sent
        if fail_send_after is not None and sent >= fail_send_after:
            raise OSError("connection reset by peer")
        sent += 1
        response.messages.append(message)
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            response.body += message.get("body", b"")

    await app(scope, receive, send)
    return response


def run(app: Callable[..., Awaitable[None]], scope: dict[str, Any], **kwargs: Any) -> Response:
    """:func:`call`, from synchronous test code."""
    return asyncio.run(call(app, scope, **kwargs))
