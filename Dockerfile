# The example service ("modelling-backend") with otelkit installed from this
# checkout: the `app` service of docker-compose.yml.
#
#   docker build -t otelkit-modelling-backend .
#   docker run --rm -p 127.0.0.1:8000:8000 otelkit-modelling-backend
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/otelkit

# Only what building the package needs, so that editing docs or tests does
# not invalidate the install layer: the metadata (README.md is the package's
# readme), the package, and the example, which the wheel ships as well.
COPY pyproject.toml README.md ./
COPY src ./src
COPY examples ./examples
RUN pip install ".[demo]"

RUN useradd --system --uid 10001 --no-create-home otelkit
USER otelkit

EXPOSE 8000

# python:3.11-slim has no curl or wget; the interpreter can make the request.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"]

# 0.0.0.0 is the container's own interface: compose publishes the port on
# the host's 127.0.0.1 only. uvicorn's access log is off because otelkit
# writes one access line per request itself (with request and trace ids).
CMD ["uvicorn", "examples.modelling.app:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
