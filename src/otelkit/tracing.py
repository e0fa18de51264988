"""Tracing: the tracer provider otelkit builds, and ``traced`` for child spans."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, overload

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.util.types import AttributeValue

from otelkit.settings import Settings

__all__ = ["build_sampler", "build_tracer_provider", "traced"]

P = ParamSpec("P")
R = TypeVar("R")

INSTRUMENTATION_NAME = "otelkit"


_provider: trace.TracerProvider | None = None


def use_provider(provider: trace.TracerProvider | None) -> None:
    """Make :class:`traced` spans with ``provider`` (``None``: the global one)."""
    global _provider
    _provider = provider


def build_sampler(settings: Settings) -> Sampler:
    """The head sampler named by OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG."""
    name: str = settings.traces_sampler
    ratio = 1.0 if settings.traces_sampler_arg is None else float(settings.traces_sampler_arg)
    root: Sampler
    if name.endswith("always_on"):
        root = ALWAYS_ON
    elif name.endswith("always_off"):
        root = ALWAYS_OFF
    else:
        root = TraceIdRatioBased(ratio)
    return ParentBased(root) if name.startswith("parentbased_") else root


def build_tracer_provider(settings: Settings, resource: Resource) -> TracerProvider:
    """A tracer provider with otelkit's sampler and attribute limits, no processors yet."""
    # Span limits stay the SDK's (OTEL_SPAN_ATTRIBUTE_*): the middleware bounds
    # the client-controlled values it sets itself, and a global length limit
    # would truncate exception stack traces with a warning each time.
    # otelkit shuts its providers down itself, within OTELKIT_SHUTDOWN_TIMEOUT.
    return TracerProvider(
        resource=resource, sampler=build_sampler(settings), shutdown_on_exit=False
    )


class traced(AbstractContextManager["trace.Span"]):
    """Make a child span, as a decorator or as a context manager.

    The span is a child of whatever span is current (the request's server
    span inside a request). An exception escaping it is recorded on the span,
    whose status becomes ERROR, and is re-raised.

    Example:
        >>> from otelkit import traced
        >>> @traced("validate_geometry", model_type="cadquery")
        ... def validate(model): ...
        >>> async def simulate():
        ...     async with traced("run_solver") as span:
        ...         span.set_attribute("solver.iterations", 40)

    Args:
        name: The span name; for a decorator, defaults to the function's
            qualified name.
        **attributes: Attributes set on the span when it starts.
    """

    __slots__ = ("_attributes", "_cm", "_name")

    def __init__(self, name: str | None = None, **attributes: AttributeValue) -> None:
        self._name = name
        self._attributes: Mapping[str, AttributeValue] = attributes
        self._cm: list[AbstractContextManager[trace.Span]] = []

    def _start(self) -> AbstractContextManager[trace.Span]:
        provider = _provider if _provider is not None else trace.get_tracer_provider()
        tracer = provider.get_tracer(INSTRUMENTATION_NAME)
        return tracer.start_as_current_span(
            self._name or "traced", attributes=dict(self._attributes) or None
        )

    def __enter__(self) -> trace.Span:
        cm = self._start()
        self._cm.append(cm)
        return cm.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return self._cm.pop().__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> trace.Span:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return self.__exit__(exc_type, exc, tb)

    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...

    @overload
    def __call__(self, func: Any) -> Any: ...

    def __call__(self, func: Any) -> Any:
        name = self._name or getattr(func, "__qualname__", repr(func))
        attributes = dict(self._attributes)

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with traced(name, **attributes):
                    return await func(*args, **kwargs)

            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with traced(name, **attributes):
                return func(*args, **kwargs)

        return wrapper
