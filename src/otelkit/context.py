"""The per-request context: one contextvar that holds the request id.

The middleware sets it when a request starts and resets it, with the token
the set returned, when the request's ASGI call returns, so it is visible in
handlers, dependencies, exception handlers and background tasks, and never
leaks into the next request.
"""

from __future__ import annotations

import re
from contextvars import ContextVar, Token

__all__ = ["bind_request_id", "get_request_id", "is_valid_request_id", "reset_request_id"]

_request_id: ContextVar[str | None] = ContextVar("otelkit_request_id", default=None)

# A request id a client may choose: 1 to 128 characters from a set that is
# safe in headers, log lines, URLs and shells; the first one alphanumeric so
# that an id can never start a spreadsheet formula (=, +, -, @) or an option.
REQUEST_ID_MAX_LENGTH = 128
_VALID_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:+=/-]{0,%d}" % (REQUEST_ID_MAX_LENGTH - 1))


def is_valid_request_id(value: bytes) -> bool:
    """Whether a client-sent request id (raw header bytes) may be kept.

    Example:
        >>> is_valid_request_id(b"a1b2c3d4-e5f6-7890-abcd-ef1234567890")
        True
        >>> is_valid_request_id(b"x\\r\\nSet-Cookie: a=b")
        False
    """
    return _VALID_ID.fullmatch(value) is not None


def get_request_id() -> str | None:
    """Return the current request's id, or ``None`` outside a request.

    The id is the incoming ``X-Request-ID`` when it was valid, otherwise the
    server span's trace id (32 lower-case hex digits). It is available in
    route handlers, dependencies, exception handlers and background tasks.

    Example:
        >>> import otelkit
        >>> otelkit.get_request_id() is None   # not inside a request
        True
    """
    return _request_id.get()


def bind_request_id(request_id: str | None) -> Token[str | None]:
    """Make ``request_id`` current; return the token that undoes it."""
    return _request_id.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    """Undo :func:`bind_request_id`."""
    _request_id.reset(token)
