"""otelkit under ``opentelemetry-instrument``: zero-code telemetry for FastAPI apps.

With otelkit installed, ``opentelemetry-instrument uvicorn app:app`` gives an
app that never imports otelkit the same telemetry as ``otelkit.instrument(app)``.
Four entry points plug otelkit into the launcher, all named ``otelkit``:

- ``opentelemetry_distro``: :class:`OtelkitDistro` pins the configurator to
  otelkit's and turns off opentelemetry-instrumentation-fastapi, whose server
  span would duplicate otelkit's;
- ``opentelemetry_configurator``: :class:`OtelkitConfigurator` validates the
  settings (a bad value stops the program at start-up, with a message naming
  the variable) and sets up logging before the server logs its first line;
- ``opentelemetry_instrumentor``: :class:`OtelkitInstrumentor` instruments
  every FastAPI app when it is created;
- ``opentelemetry_environment_variables``: this module's ``OTEL_*`` names
  become the launcher's ``--flags`` (``--otelkit_log_format console``).

Providers and exporters are created when the app is, in the process that
serves it: under a pre-fork server each worker has its own export threads.
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=otelkit`` turns all of this off.

The launcher picks the first distro and configurator it finds when several
packages provide one; set ``OTEL_PYTHON_DISTRO=otelkit`` (and, with
opentelemetry-distro installed, ``OTEL_PYTHON_CONFIGURATOR=otelkit``) to make
the choice explicit.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.distro import BaseDistro  # type: ignore[attr-defined]
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)
from opentelemetry.sdk._configuration import _BaseConfigurator

from otelkit import _instrument, logs
from otelkit.settings import SETTINGS, ConfigurationError, resolve_settings

__all__ = ["OtelkitConfigurator", "OtelkitDistro", "OtelkitInstrumentor"]

NAME = "otelkit"

# The launcher turns each OTEL_* attribute of this module into a --flag that
# sets that variable. otelkit's own variables get an OTEL_PYTHON_OTELKIT_
# alias here, read as a fallback when the OTELKIT_ or LOG_ variable is unset.
_ALIAS_PREFIX = "OTEL_PYTHON_OTELKIT_"
for _setting in SETTINGS:
    if _setting.env is not None and not _setting.env.startswith("OTEL_"):
        _alias = _ALIAS_PREFIX + _setting.env.removeprefix("OTELKIT_")
        globals()[_alias] = _alias


def _apply_aliases() -> None:
    for setting in SETTINGS:
        if setting.env is None or setting.env.startswith("OTEL_"):
            continue
        alias = _ALIAS_PREFIX + setting.env.removeprefix("OTELKIT_")
        if alias in os.environ and setting.env not in os.environ:
            os.environ[setting.env] = os.environ[alias]


def _disabled() -> bool:
    names = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
    return any(name.strip() in {NAME, "*"} for name in names.split(","))


class OtelkitDistro(BaseDistro):  # type: ignore[misc]  # untyped base class
    """Makes otelkit's choices when the launcher picked otelkit's distro."""

    def _configure(self, **kwargs: Any) -> None:
        if _disabled():
            return
        os.environ.setdefault("OTEL_PYTHON_CONFIGURATOR", NAME)
        # contrib's FastAPI instrumentor would make a second server span per
        # request (otelkit undoes it per app anyway; skipping it saves work).
        disabled = [
            name.strip()
            for name in os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")
            if name.strip()
        ]
        if "fastapi" not in disabled:
            disabled.append("fastapi")
        os.environ["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = ",".join(disabled)


class OtelkitConfigurator(_BaseConfigurator):
    """Validates otelkit's settings and sets up logging at start-up."""

    def _configure(self, **kwargs: Any) -> None:
        if _disabled():
            return
        _apply_aliases()
        try:
            settings = resolve_settings()
        except ConfigurationError as exc:
            # The launcher logs and swallows exceptions, then runs the program
            # uninstrumented; a wrong setting must instead stop it at start-up,
            # as otelkit.instrument() does in library mode. This runs inside
            # sitecustomize, where SystemExit would become a fatal-error dump.
            print(exc, file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)
        if settings.configure_logging:
            service = (
                settings.service_name
                or settings.resource_attribute("service.name")
                or "unknown_service"
            )
            logs.configure_logging(
                level=settings.log_level,
                log_format=settings.log_format,
                service=service,
                version=settings.service_version
                or settings.resource_attribute("service.version")
                or "unknown",
                environment=settings.environment
                or settings.resource_attribute(
                    "deployment.environment.name", "deployment.environment"
                )
                or "production",
                redact_fields=settings.redact_fields,
                quiet_server_access_log=settings.access_log,
            )


class OtelkitInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instruments every FastAPI application when it is created."""

    _lock = threading.Lock()
    _original_init: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("fastapi >= 0.100",)

    def _instrument(self, **kwargs: Any) -> None:
        from fastapi import applications

        with self._lock:
            if OtelkitInstrumentor._original_init is not None:
                return
            _apply_aliases()
            original = applications.FastAPI.__init__
            OtelkitInstrumentor._original_init = original

            @functools.wraps(original)
            def __init__(app: Any, *args: Any, **init_kwargs: Any) -> None:
                original(app, *args, **init_kwargs)
                _instrument.instrument(app, _automatic=True)

            setattr(applications.FastAPI, "__init__", __init__)  # noqa: B010 - mypy cannot type it

    def _uninstrument(self, **kwargs: Any) -> None:
        from fastapi import applications

        with self._lock:
            original = OtelkitInstrumentor._original_init
            if original is not None:
                setattr(applications.FastAPI, "__init__", original)  # noqa: B010
                OtelkitInstrumentor._original_init = None
