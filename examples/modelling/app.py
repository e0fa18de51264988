"""The modelling backend: projects, 3D models, simulations and budgets.

A small but realistic service instrumented with otelkit: one call to
``otelkit.instrument``, structured logs, child spans and business metrics.
Run it with ``otelkit demo`` or ``uvicorn examples.modelling.app:app``.
"""

from __future__ import annotations

import asyncio
import random
from typing import Literal

from fastapi import BackgroundTasks, FastAPI, HTTPException
from pydantic import BaseModel, Field

import otelkit
from otelkit.recent import RecentTraces

app = FastAPI(title="modelling-backend", version="2.0.0")
otelkit.instrument(app)

# Without a collector, the last traces are still visible at /debug/traces.
recent_traces = RecentTraces()
recent_traces.install()
app.add_route("/debug/traces", recent_traces.endpoint, include_in_schema=False)

log = otelkit.get_logger(__name__)

models_created = otelkit.counter(
    "models_created", "Total 3D models created", labels=("model_type",)
)
simulations_run = otelkit.counter(
    "simulations_run", "Total simulations run", labels=("simulation_type",)
)
budget_calculations = otelkit.counter("budget_calculations", "Total budget calculations")
simulation_duration = otelkit.histogram(
    "simulation_duration",
    "Time the solver took",
    unit="s",
    labels=("simulation_type",),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

PROJECTS: dict[int, dict[str, object]] = {
    1: {"id": 1, "name": "Drone frame", "models": 3},
    2: {"id": 2, "name": "Desk lamp", "models": 1},
    3: {"id": 3, "name": "Gearbox housing", "models": 7},
}

PRICE_PER_CM3 = {"pla": 0.05, "abs": 0.06, "petg": 0.07, "resin": 0.25}


class ModelRequest(BaseModel):
    project_id: int
    name: str = Field(min_length=1, max_length=200)
    model_type: Literal["cadquery", "openscad", "mesh"] = "cadquery"


class SimulationRequest(BaseModel):
    model_id: int
    simulation_type: Literal["structural", "thermal", "fluid"] = "structural"


class BudgetRequest(BaseModel):
    material: Literal["pla", "abs", "petg", "resin"]
    volume_cm3: float = Field(gt=0, le=1_000_000)
    quantity: int = Field(default=1, ge=1, le=10_000)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/api/v1/projects")
async def list_projects() -> list[dict[str, object]]:
    log.info("projects_listed", count=len(PROJECTS))
    return list(PROJECTS.values())


@app.get("/api/v1/projects/{project_id}")
async def get_project(project_id: int) -> dict[str, object]:
    project = PROJECTS.get(project_id)
    if project is None:
        log.info("project_not_found", project_id=project_id)
        raise HTTPException(status_code=404, detail="Project not found")
    return project


@otelkit.traced("validate_geometry")
def validate_geometry(request: ModelRequest) -> None:
    if request.name.strip().lower() == "invalid":
        raise HTTPException(status_code=422, detail="Invalid geometry")


@app.post("/api/v1/modeling", status_code=201)
async def create_model(request: ModelRequest, background: BackgroundTasks) -> dict[str, object]:
    if request.project_id not in PROJECTS:
        raise HTTPException(status_code=404, detail="Project not found")
    log.info("model_validation_started", model_type=request.model_type)
    validate_geometry(request)
    model_id = random.randint(1000, 9999)
    models_created.add(1, model_type=request.model_type)
    log.info("model_created", model_id=model_id, model_type=request.model_type)
    background.add_task(_render_thumbnail, model_id)
    return {"id": model_id, "project_id": request.project_id, "model_type": request.model_type}


async def _render_thumbnail(model_id: int) -> None:
    # Runs after the response: its time is not part of the request's duration.
    await asyncio.sleep(0.005)
    log.info("thumbnail_rendered", model_id=model_id)


@app.post("/api/v1/simulations")
async def run_simulation(request: SimulationRequest) -> dict[str, object]:
    async with otelkit.traced("solver", simulation_type=request.simulation_type) as span:
        seconds = random.uniform(0.005, 0.06)
        await asyncio.sleep(seconds)
        span.set_attribute("solver.iterations", int(seconds * 1000))
    simulations_run.add(1, simulation_type=request.simulation_type)
    simulation_duration.record(seconds, simulation_type=request.simulation_type)
    log.info("simulation_completed", model_id=request.model_id, seconds=round(seconds, 4))
    return {
        "model_id": request.model_id,
        "simulation_type": request.simulation_type,
        "max_stress_mpa": round(random.uniform(10, 250), 1),
    }


@app.post("/api/v1/budgets")
async def calculate_budget(request: BudgetRequest) -> dict[str, object]:
    total = PRICE_PER_CM3[request.material] * request.volume_cm3 * request.quantity
    budget_calculations.add(1)
    log.info("budget_calculated", material=request.material, total=round(total, 2))
    return {"material": request.material, "total": round(total, 2), "currency": "BRL"}


@app.get("/api/v1/boom")
async def boom() -> None:
    log.info("about_to_fail")
    raise RuntimeError("simulated failure: the solver crashed")
