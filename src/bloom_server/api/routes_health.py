"""Liveness and readiness. Liveness answers from process start; readiness only after the model is loaded and a
warm-up generate ran on every rank. (KServe's v1 model status, GET /v1/models/{name}, is routes_openai's.)"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from bloom_server.api.schemas import Health
from bloom_server.frontend.core import Engine


def load_progress(engine: Engine) -> dict | None:
    """Rank 0's load progress (bloom_server.storage.prefetch.LoadProgress, set by the composition root), as plain data."""
    progress = engine.load_progress
    return progress.snapshot() if progress is not None else None


def build_router(engine: Engine) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/health", response_model=Health, responses={500: {"model": Health}})
    async def health() -> JSONResponse:
        """Liveness: 200 while the process can still serve (loading included); 500 once the engine died."""
        status = 200 if engine.alive else 500
        return JSONResponse({"status": engine.state.value, "detail": engine.state_detail}, status_code=status)

    @router.get("/ready", response_model=Health, responses={503: {"model": Health}})
    async def ready() -> JSONResponse:
        """Readiness: 200 once the model is loaded and warmed up, 503 before (and while draining). `progress` (when
        the server tracks it): the load's phase, bytes of weights loaded / total on rank 0, and each phase's time."""
        body: dict[str, Any] = {"status": engine.state.value, "detail": engine.state_detail}
        progress = load_progress(engine)
        if progress is not None:
            body["progress"] = progress
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    return router
