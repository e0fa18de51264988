"""otelkit: one call makes a FastAPI service observable with OpenTelemetry.

Example:
    >>> from fastapi import FastAPI
    >>> import otelkit
    >>> app = FastAPI()
    >>> otelkit.instrument(app)
    >>> log = otelkit.get_logger(__name__)
    >>> models_created = otelkit.counter("models_created", "Total 3D models created",
    ...                                  labels=("model_type",))
"""

from otelkit._instrument import __version__, instrument, shutdown, uninstrument
from otelkit.context import get_request_id
from otelkit.logs import configure_logging, get_logger
from otelkit.metrics import counter, gauge, histogram, up_down_counter
from otelkit.settings import ConfigurationError
from otelkit.tracing import traced

__all__ = [
    "ConfigurationError",
    "__version__",
    "configure_logging",
    "counter",
    "gauge",
    "get_logger",
    "get_request_id",
    "histogram",
    "instrument",
    "shutdown",
    "traced",
    "uninstrument",
    "up_down_counter",
]
