"""GET /info (what is served and its limits) and GET /metrics (Prometheus exposition, docs/metrics.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, Field

from bloom_server import __version__
from bloom_server.api.metrics import Metrics
from bloom_server.api.routes_health import load_progress
from bloom_server.api.schemas_tgi import MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS
from bloom_server.frontend.core import Engine
from bloom_server.settings import Settings


class Info(BaseModel):
    model_id: str
    model_sha: str | None = Field(None, description="Revision (commit) of the served weights, when known.")
    model_dtype: str | None = Field(None, description="The weights' dtype (int8: weight-only int8, fp16 activations).")
    model_weight_bytes: int | None = Field(
        None, description="Bytes of model weights resident on rank 0's device (its tensor-parallel share, as stored)."
    )
    model_device_type: str | None = None
    backend: str
    tensor_parallel: int = Field(description="Ranks serving the model (the launcher's world size).")
    version: str
    state: str = Field(description="loading | ready | draining | dead")
    max_input_tokens: int = Field(description="Longest prompt, in tokens.")
    max_new_tokens: int = Field(description="Most new tokens a request may ask for.")
    max_total_tokens: int = Field(description="Prompt + new tokens the engine is built for.")
    max_batch_size: int = Field(description="Rows in one generate call, and prompts (x n) per request.")
    max_queued_requests: int = Field(description="Requests waiting before 429.")
    max_queued_tokens: int = Field(description="Tokens (prompt + max new) waiting before 429.")
    max_concurrent_requests: int = Field(description="TGI's name for max_queued_requests.")
    max_best_of: int = 1
    max_stop_sequences: int = MAX_STOP_SEQUENCES
    max_top_n_tokens: int = MAX_TOP_N_TOKENS
    max_body_bytes: int
    request_timeout_s: float | None = None
    chat_template: bool = Field(description="Whether /v1/chat/completions can render prompts.")
    auth: bool = Field(description="Whether an API key is required.")
    model_load_seconds: float | None = None
    load_progress: dict[str, Any] | None = Field(
        None, description="Rank 0's load: phase, loaded_bytes / total_bytes of weights, percent, phase times."
    )
    batching: str | None = Field(None, description="continuous | dynamic: how requests share the model's steps.")


def build_router(engine: Engine, settings: Settings, model_name: str, metrics: Metrics, has_chat: Any) -> APIRouter:
    router = APIRouter(tags=["info"])

    @router.get("/info", response_model=Info)
    async def info() -> Info:
        """The model, the backend and every limit a client must respect."""
        i = engine.info
        extra = i.extra if i else {}
        device = str(extra.get("device", "")) or None
        return Info(
            model_id=i.model_id if i else model_name,
            model_sha=i.revision if i else None,
            model_dtype=i.dtype if i else None,
            model_weight_bytes=extra.get("weight_bytes"),
            model_device_type=("cuda" if device and "cuda" in device else device.split(":")[0]) if device else None,
            backend=settings.backend,
            tensor_parallel=i.world_size if i else 1,
            version=__version__,
            state=engine.state.value,
            max_input_tokens=settings.max_input_length,
            max_new_tokens=settings.max_new_tokens,
            max_total_tokens=settings.total_tokens_limit,
            max_batch_size=settings.max_batch_size,
            max_queued_requests=settings.max_queued_requests,
            max_queued_tokens=settings.queued_tokens_limit,
            max_concurrent_requests=settings.max_queued_requests,
            max_body_bytes=settings.max_body_bytes,
            request_timeout_s=settings.request_timeout_s,
            chat_template=bool(has_chat()),
            auth=settings.api_key is not None,
            model_load_seconds=engine.load_seconds,
            load_progress=load_progress(engine),
            batching=getattr(engine, "batching", None),
        )

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition"}},
    )
    async def prometheus() -> Response:
        """Prometheus metrics (names and meanings: docs/metrics.md). Never behind the API key."""
        progress = load_progress(engine)
        if progress is not None:
            metrics.set_load_progress(progress["loaded_bytes"], progress["total_bytes"])
        if engine.info is not None:
            i = engine.info
            metrics.set_info(
                model_id=i.model_id, backend=i.backend, dtype=i.dtype, world_size=i.world_size, version=__version__
            )
            if i.extra.get("weight_bytes") is not None:
                metrics.weight_bytes.set(int(i.extra["weight_bytes"]))
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return router
