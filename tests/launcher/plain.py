"""A FastAPI app that knows nothing of otelkit (the zero-code case)."""

import logging

from fastapi import FastAPI

app = FastAPI(title="plain-service", version="3.1.4")
log = logging.getLogger("plain")


@app.get("/hello/{name}")
async def hello(name: str) -> dict[str, str]:
    log.info("saying hello to %s", name)
    return {"hello": name}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
