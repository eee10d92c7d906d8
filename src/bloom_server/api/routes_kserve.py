"""KServe: the Open Inference Protocol (v2) and v1's predict. Prompts go in as a BYTES tensor (v2) or as instances
(v1); generation settings as the request's `parameters` (any generate() keyword of POST /generate, plus `seed` and
`stop`). Errors: `{"error": <message>}`, 400 for invalid input (api/errors.py)."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from bloom_server import __version__
from bloom_server.api.common import (
    header_timeout,
    parse,
    remember,
    rename_field,
    request_id,
    result_or_disconnect,
    timing_headers,
)
from bloom_server.api.errors import NotFound, error_responses
from bloom_server.api.schemas import ErrorResponse, GenerateKwargs
from bloom_server.engine.core import Engine
from bloom_server.engine.requests import Completion
from bloom_server.errors import InvalidRequest

INPUT_NAME, OUTPUT_NAME = "text_input", "text_output"
KSERVE_ERRORS = error_responses(ErrorResponse, e400="Invalid input: `error` names the field", e404="No such model")


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="Generation settings: max_new_tokens, temperature, "
                                              "top_k, top_p, do_sample, repetition_penalty, seed, stop, ...")
    inputs: list[V2Tensor] = Field(min_length=1, description=f"One BYTES tensor of prompts (`{INPUT_NAME}`).")
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


class V1PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    instances: list[str | dict[str, Any]] = Field(min_length=1, description='Prompts, or {"text": prompt} objects.')
    parameters: dict[str, Any] | None = None


class V1PredictResponse(BaseModel):
    predictions: list[str]


def _settings(params: dict[str, Any] | None, where: str) -> tuple[dict[str, Any], int | None, tuple[str, ...]]:
    params = dict(params or {})
    seed = params.pop("seed", None)
    stop = params.pop("stop", None)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise InvalidRequest(f"{where}.seed: must be an integer >= 0", field=f"{where}.seed")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise InvalidRequest(f"{where}.stop: at most 4 strings", field=f"{where}.stop", limit=4)
    try:
        kwargs = parse(GenerateKwargs, params).generate_kwargs()
    except Exception as exc:  # a RequestValidationError: name the field under `parameters`
        from fastapi.exceptions import RequestValidationError

        if isinstance(exc, RequestValidationError):
            raise RequestValidationError([dict(e, loc=("body", where, *e["loc"][1:])) for e in exc.errors()]) from None
        raise
    return kwargs, seed, tuple(s for s in stops if s)


def build_router(engine: Engine, model_name: str) -> APIRouter:
    router = APIRouter(tags=["kserve"])

    def check(name: str) -> None:
        if name != model_name:
            raise NotFound(f"name: no model named {name!r} (this server serves {model_name!r})", field="name")

    async def run(request: Request, prompts: list[str], params: dict | None, field: str) -> tuple[list[Completion], Any]:
        kwargs, seed, stop = _settings(params, "parameters")
        kwargs.setdefault("remove_input_from_output", True)
        try:
            req = engine.submit(prompts, kwargs, seed=seed, field="text", stop=stop, timeout_s=header_timeout(request),
                                request_id=request_id(request))
        except InvalidRequest as exc:
            raise rename_field(exc, {"text": field}, prefix="parameters.") from None
        remember(request, req)
        (comps,) = await result_or_disconnect(request, [req])
        return comps, req

    @router.get("/v2/health/live")
    async def v2_live() -> JSONResponse:
        """Open Inference Protocol liveness."""
        return JSONResponse({"live": engine.alive}, status_code=200 if engine.alive else 500)

    @router.get("/v2/health/ready")
    async def v2_ready() -> JSONResponse:
        """Open Inference Protocol readiness: 200 once loaded and warmed up, 503 before and while draining."""
        return JSONResponse({"ready": engine.ready}, status_code=200 if engine.ready else 503)

    @router.get("/v2")
    async def v2_server() -> dict:
        """Server metadata."""
        return {"name": "bloom-server", "version": __version__, "extensions": []}

    @router.get("/v2/models/{name}", responses=KSERVE_ERRORS)
    async def v2_metadata(name: str) -> dict:
        """Model metadata: one BYTES input tensor of prompts, BYTES output of texts."""
        check(name)
        info = engine.info
        return {
            "name": model_name,
            "versions": [info.revision] if info and info.revision else [],
            "platform": f"bloom-server/{info.backend if info else 'loading'}",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [-1]},
                {"name": "generated_tokens", "datatype": "INT64", "shape": [-1]},
                {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]},
            ],
        }

    @router.get("/v2/models/{name}/ready", responses=KSERVE_ERRORS)
    async def v2_model_ready(name: str) -> JSONResponse:
        check(name)
        return JSONResponse({"name": name, "ready": engine.ready}, status_code=200 if engine.ready else 503)

    @router.post("/v2/models/{name}/infer", response_model=V2InferResponse, responses=KSERVE_ERRORS)
    async def v2_infer(name: str, body: V2InferRequest, request: Request) -> JSONResponse:
        """Generate for each prompt of the BYTES input tensor; `parameters` (of the request, or of the tensor)
        carry the generation settings."""
        check(name)
        if len(body.inputs) != 1:
            raise InvalidRequest("inputs: exactly one tensor of prompts is expected", field="inputs", limit=1)
        t = body.inputs[0]
        if t.datatype.upper() != "BYTES":
            raise InvalidRequest(f"inputs[0].datatype: must be BYTES (got {t.datatype})", field="inputs[0].datatype")
        if math.prod(t.shape) != len(t.data) or not all(isinstance(x, str) and x for x in t.data):
            raise InvalidRequest(
                f"inputs[0].data: {len(t.data)} non-empty strings expected to match shape {t.shape}",
                field="inputs[0].data",
            )
        params = {**(t.parameters or {}), **(body.parameters or {})}
        comps, req = await run(request, list(t.data), params, "inputs[0].data")
        n = len(comps)
        outputs = [
            {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [n], "data": [c.text for c in comps]},
            {"name": "generated_tokens", "datatype": "INT64", "shape": [n], "data": [len(c.token_ids) for c in comps]},
            {"name": "finish_reason", "datatype": "BYTES", "shape": [n], "data": [c.finish_reason for c in comps]},
        ]
        if body.outputs:
            wanted = {o.name for o in body.outputs}
            unknown = wanted - {o["name"] for o in outputs}
            if unknown:
                raise InvalidRequest(f"outputs: unknown output {sorted(unknown)[0]!r}", field="outputs")
            outputs = [o for o in outputs if o["name"] in wanted]
        out = {"model_name": model_name, "model_version": None, "id": body.id or req.id, "parameters": {},
               "outputs": outputs}
        return JSONResponse(out, headers=timing_headers([req]))

    @router.post("/v1/models/{name}:predict", response_model=V1PredictResponse, responses=KSERVE_ERRORS)
    async def v1_predict(name: str, body: V1PredictRequest, request: Request) -> JSONResponse:
        """KServe v1: `{"instances": [prompt, ...], "parameters": {...}}` -> `{"predictions": [text, ...]}`."""
        check(name)
        prompts = []
        for i, inst in enumerate(body.instances):
            text = inst if isinstance(inst, str) else (inst.get("text") or inst.get("prompt") or inst.get("inputs"))
            if not isinstance(text, str) or not text:
                raise InvalidRequest(f"instances[{i}]: a non-empty prompt string (or {{\"text\": ...}})",
                                     field=f"instances[{i}]")
            prompts.append(text)
        comps, req = await run(request, prompts, body.parameters, "instances")
        return JSONResponse({"predictions": [c.text for c in comps]}, headers=timing_headers([req]))

    return router
