"""The plain app, which also calls otelkit.instrument(app) itself."""

import otelkit
from tests.launcher.plain import app

otelkit.instrument(app)

__all__ = ["app"]
