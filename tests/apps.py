"""Small FastAPI apps the tests instrument; each test builds a fresh one."""

from __future__ import annotations

from typing import Any

from fastapi import BackgroundTasks, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import baggage
from pydantic import BaseModel

import otelkit

seen: dict[str, Any] = {}


class Item(BaseModel):
    name: str
    price: float


def make_app(**fastapi_kwargs: Any) -> FastAPI:
    """An app with the shapes of request the tests need."""
    app = FastAPI(title="test-app", version="1.2.3", **fastapi_kwargs)
    log = otelkit.get_logger("tests.app")

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, Any]:
        seen["handler_request_id"] = otelkit.get_request_id()
        seen["baggage"] = baggage.get_baggage("tenant")
        log.info("item_read", item_id=item_id)
        return {"id": item_id}

    @app.post("/items")
    async def create_item(item: Item) -> Item:
        return item

    @app.get("/missing")
    async def missing() -> None:
        raise HTTPException(status_code=404, detail="nothing here")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    @app.get("/sync")
    def sync_route() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/background")
    async def with_background(tasks: BackgroundTasks) -> dict[str, str]:
        def task() -> None:
            seen["background_request_id"] = otelkit.get_request_id()
            log.info("background_done")

        tasks.add_task(task)
        return {"queued": "yes"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> Any:
            yield b"one,"
            yield b"two"

        return StreamingResponse(body())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/custom-error")
    async def custom_error() -> None:
        raise ValueError("handled by the app")

    @app.exception_handler(ValueError)
    async def on_value_error(request: Request, exc: ValueError) -> JSONResponse:
        seen["exception_handler_request_id"] = otelkit.get_request_id()
        return JSONResponse({"detail": "bad value"}, status_code=400)

    return app
