"""Shared fixtures: every test gets fresh in-memory telemetry and clean globals."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from otelkit import logs
from otelkit import metrics as otelkit_metrics


@pytest.fixture(autouse=True)
def _reset_otelkit_globals() -> Iterator[None]:
    """Undo logging and metric declarations a test made, whatever it did."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logs.reset_logging()
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    otelkit_metrics._reset_declarations()
    otelkit_metrics.bind_declared(None)
    otelkit_metrics.set_strict(False)
