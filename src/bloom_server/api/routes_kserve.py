"""KServe: the Open Inference Protocol (v2) and v1's predict. Prompts go in as a BYTES tensor (v2) or as instances
(v1); generation settings as the request's `parameters` (any generate() keyword of POST /generate, plus `seed` and
`stop`). Tensors as JSON or with the binary tensor data extension; the model's one version under
/v2/models/{name}/versions/{version}. Errors: `{"error": <message>}`, 400 for invalid input (api/errors.py)."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from bloom_server import __version__
from bloom_server.api.common import (
    parse,
    rename_field,
    result_or_disconnect,
    submit_generation,
    timing_headers,
)
from bloom_server.api.errors import NotFound, error_responses, malformed_json
from bloom_server.api.schemas import ErrorResponse, GenerateKwargs
from bloom_server.errors import InvalidRequest
from bloom_server.frontend.core import Engine
from bloom_server.frontend.requests import Completion

INPUT_NAME, OUTPUT_NAME = "text_input", "text_output"
# Parameters of the protocol itself, not generation settings.
_PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "binary_data", "binary_data_size"})
KSERVE_ERRORS = error_responses(ErrorResponse, e400="Invalid input: `error` names the field", e404="No such model")


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(
        None,
        description="The elements (row-major; nested lists are flattened); absent "
        "when the tensor's bytes follow the JSON (parameters.binary_data_size).",
    )
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        description="Generation settings: max_new_tokens, temperature, "
        "top_k, top_p, do_sample, repetition_penalty, seed, stop, ...",
    )
    inputs: list[V2Tensor] = Field(min_length=1, description=f"One BYTES tensor of prompts (`{INPUT_NAME}`).")
    outputs: list[V2RequestedOutput] | None = None


class V2OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2OutputTensor]


class V1PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    instances: list[str | dict[str, Any]] = Field(min_length=1, description='Prompts, or {"text": prompt} objects.')
    parameters: dict[str, Any] | None = None


class V1PredictResponse(BaseModel):
    predictions: list[str]


# The binary tensor data extension (Triton's, which KServe's model server implements): the body is the JSON request
# of `Inference-Header-Content-Length` bytes, followed by the raw bytes of each input that sets
# parameters.binary_data_size, in input order. BYTES elements are each a 4-byte little-endian length, then the bytes.
HEADER_LENGTH = "inference-header-content-length"
OPENAPI_MODELS = [V2InferRequest]


def _split_body(raw: bytes, header_length: str | None) -> tuple[Any, bytes]:
    if header_length is None:
        return _json(raw), b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 < n <= len(raw):
        raise InvalidRequest(
            f"Inference-Header-Content-Length: must be the JSON header's length in bytes, from 1 to the body's "
            f"{len(raw)} (got {header_length!r})",
            field="Inference-Header-Content-Length",
            limit=len(raw),
        )
    return _json(raw[:n]), raw[n:]


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise malformed_json(exc) from None


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def _bytes_elements(blob: bytes, field: str) -> list[bytes]:
    out, at = [], 0
    while at < len(blob):
        if at + 4 > len(blob):
            raise InvalidRequest(f"{field}: BYTES data ends inside an element's 4-byte length", field=field)
        size = int.from_bytes(blob[at : at + 4], "little")
        at += 4
        if at + size > len(blob):
            raise InvalidRequest(f"{field}: a BYTES element of {size} bytes runs past the tensor's data", field=field)
        out.append(blob[at : at + size])
        at += size
    return out


def _input_data(body: V2InferRequest, rest: bytes) -> list[list[Any]]:
    """Each input's elements: from its JSON `data`, or from its share of the binary data after the JSON."""
    out, at = [], 0
    for i, t in enumerate(body.inputs):
        size = (t.parameters or {}).get("binary_data_size")
        if size is None:
            if t.data is None:
                raise InvalidRequest(
                    f"inputs[{i}].data: is required (or parameters.binary_data_size with the binary data extension)",
                    field=f"inputs[{i}].data",
                )
            out.append(_flatten(t.data))
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(rest):
            raise InvalidRequest(
                f"inputs[{i}].parameters.binary_data_size: {size!r} bytes, but {len(rest) - at} follow the JSON header",
                field=f"inputs[{i}].parameters.binary_data_size",
                limit=len(rest) - at,
            )
        blob, at = rest[at : at + size], at + size
        if t.datatype.upper() != "BYTES":
            out.append([blob])  # not a prompt tensor: refused by its datatype below
            continue
        texts = []
        for element in _bytes_elements(blob, f"inputs[{i}].data"):
            try:
                texts.append(element.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidRequest(
                    f"inputs[{i}].data: prompts must be UTF-8 text", field=f"inputs[{i}].data"
                ) from None
        out.append(texts)
    if at != len(rest):
        raise InvalidRequest(
            f"body: {len(rest) - at} bytes after the JSON header belong to no input (binary_data_size)",
            field="Inference-Header-Content-Length",
        )
    return out


def _binary(output: dict[str, Any]) -> bytes:
    if output["datatype"] == "BYTES":
        parts = []
        for x in output["data"]:
            b = x.encode("utf-8")
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    return b"".join(int(x).to_bytes(8, "little", signed=True) for x in output["data"])  # INT64


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

    async def run(
        request: Request, prompts: list[str], params: dict | None, field: str
    ) -> tuple[list[Completion], Any]:
        kwargs, seed, stop = _settings(params, "parameters")
        kwargs.setdefault("remove_input_from_output", True)
        rename = lambda exc: rename_field(exc, {"text": field}, prefix="parameters.")  # noqa: E731
        req = submit_generation(engine, request, prompts, kwargs, rename, seed=seed, field="text", stop=stop)
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
        return {"name": "bloom-server", "version": __version__, "extensions": ["binary_tensor_data"]}

    def check_version(version: str) -> None:
        if version not in versions():
            raise NotFound(
                f"version: model {model_name!r} has no version {version!r} (it has {versions()})", field="version"
            )

    def versions() -> list[str]:
        # One model, one version: its revision when known, else "1".
        info = engine.info
        return [info.revision] if info and info.revision else ["1"]

    def metadata() -> dict:
        info = engine.info
        return {
            "name": model_name,
            "versions": versions(),
            "platform": f"bloom-server/{info.backend if info else 'loading'}",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [-1]},
                {"name": "generated_tokens", "datatype": "INT64", "shape": [-1]},
                {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]},
            ],
        }

    @router.get("/v2/models/{name}", responses=KSERVE_ERRORS)
    async def v2_metadata(name: str) -> dict:
        """Model metadata: one BYTES input tensor of prompts, BYTES output of texts."""
        check(name)
        return metadata()

    @router.get("/v2/models/{name}/versions/{version}", responses=KSERVE_ERRORS)
    async def v2_version_metadata(name: str, version: str) -> dict:
        """Model metadata of a version (the model has one: `versions` in its metadata)."""
        check(name)
        check_version(version)
        return metadata()

    @router.get("/v2/models/{name}/ready", responses=KSERVE_ERRORS)
    async def v2_model_ready(name: str) -> JSONResponse:
        check(name)
        return JSONResponse({"name": name, "ready": engine.ready}, status_code=200 if engine.ready else 503)

    @router.get("/v2/models/{name}/versions/{version}/ready", responses=KSERVE_ERRORS)
    async def v2_version_ready(name: str, version: str) -> JSONResponse:
        check(name)
        check_version(version)
        return JSONResponse({"name": name, "ready": engine.ready}, status_code=200 if engine.ready else 503)

    async def infer(name: str, version: str | None, request: Request) -> Response:
        check(name)
        data, rest = _split_body(await request.body(), request.headers.get(HEADER_LENGTH))
        body = parse(V2InferRequest, data)
        if version is not None:  # after the body: a body that cannot be served is refused as on the unversioned path
            check_version(version)
        if len(body.inputs) != 1:
            raise InvalidRequest("inputs: exactly one tensor of prompts is expected", field="inputs", limit=1)
        (elements,) = _input_data(body, rest)
        t = body.inputs[0]
        if t.datatype.upper() != "BYTES":
            raise InvalidRequest(f"inputs[0].datatype: must be BYTES (got {t.datatype})", field="inputs[0].datatype")
        if math.prod(t.shape) != len(elements) or not all(isinstance(x, str) and x for x in elements):
            raise InvalidRequest(
                f"inputs[0].data: {len(elements)} non-empty strings expected to match shape {t.shape}",
                field="inputs[0].data",
            )
        params = {
            k: v
            for k, v in {**(t.parameters or {}), **(body.parameters or {})}.items()
            if k not in _PROTOCOL_PARAMETERS
        }
        comps, req = await run(request, elements, params, "inputs[0].data")
        n = len(comps)
        outputs: list[dict[str, Any]] = [
            {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [n], "data": [c.text for c in comps]},
            {"name": "generated_tokens", "datatype": "INT64", "shape": [n], "data": [len(c.token_ids) for c in comps]},
            {"name": "finish_reason", "datatype": "BYTES", "shape": [n], "data": [c.finish_reason for c in comps]},
        ]
        all_binary = bool((body.parameters or {}).get("binary_data_output", False))
        binary = {o["name"]: all_binary for o in outputs}
        if body.outputs:
            wanted = {o.name: o for o in body.outputs}
            unknown = set(wanted) - {o["name"] for o in outputs}
            if unknown:
                raise InvalidRequest(f"outputs: unknown output {sorted(unknown)[0]!r}", field="outputs")
            outputs = [o for o in outputs if o["name"] in wanted]
            for o in outputs:
                binary[o["name"]] = bool((wanted[o["name"]].parameters or {}).get("binary_data", all_binary))
        blobs = []
        for o in outputs:
            if binary[o["name"]]:
                blob = _binary(o)
                blobs.append(blob)
                del o["data"]
                o["parameters"] = {"binary_data_size": len(blob)}
        out: dict[str, Any] = {
            "model_name": model_name,
            "model_version": version,
            "id": body.id or req.id,
            "parameters": {},
            "outputs": outputs,
        }
        headers = timing_headers([req])
        if not blobs:
            return JSONResponse(out, headers=headers)
        head = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()
        headers["Inference-Header-Content-Length"] = str(len(head))
        return Response(head + b"".join(blobs), media_type="application/octet-stream", headers=headers)

    infer_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": (
                        "The binary tensor data extension: the JSON request (Inference-Header-Content-Length bytes), "
                        "then each binary input's bytes"
                    ),
                },
            },
        },
        "parameters": [
            {
                "name": "Inference-Header-Content-Length",
                "in": "header",
                "required": False,
                "schema": {"type": "integer"},
                "description": "Length of the JSON header when binary tensor data follows it",
            }
        ],
    }

    @router.post(
        "/v2/models/{name}/infer", response_model=V2InferResponse, responses=KSERVE_ERRORS, openapi_extra=infer_doc
    )
    async def v2_infer(name: str, request: Request) -> Response:
        """Generate for each prompt of the BYTES input tensor; `parameters` (of the request, or of the tensor)
        carry the generation settings. Takes the binary tensor data extension (inputs as raw bytes after the JSON,
        `Inference-Header-Content-Length`), and answers outputs in binary when asked (`binary_data_output` in the
        request's parameters, or `binary_data` in an output's)."""
        return await infer(name, None, request)

    @router.post(
        "/v2/models/{name}/versions/{version}/infer",
        response_model=V2InferResponse,
        responses=KSERVE_ERRORS,
        openapi_extra=infer_doc,
    )
    async def v2_version_infer(name: str, version: str, request: Request) -> Response:
        """As /v2/models/{name}/infer, for a version of the model (it has one: `versions` in its metadata)."""
        return await infer(name, version, request)

    @router.post("/v1/models/{name}:predict", response_model=V1PredictResponse, responses=KSERVE_ERRORS)
    async def v1_predict(name: str, body: V1PredictRequest, request: Request) -> JSONResponse:
        """KServe v1: `{"instances": [prompt, ...], "parameters": {...}}` -> `{"predictions": [text, ...]}`."""
        check(name)
        prompts = []
        for i, inst in enumerate(body.instances):
            text = inst if isinstance(inst, str) else (inst.get("text") or inst.get("prompt") or inst.get("inputs"))
            if not isinstance(text, str) or not text:
                raise InvalidRequest(
                    f'instances[{i}]: a non-empty prompt string (or {{"text": ...}})', field=f"instances[{i}]"
                )
            prompts.append(text)
        comps, req = await run(request, prompts, body.parameters, "instances")
        return JSONResponse({"predictions": [c.text for c in comps]}, headers=timing_headers([req]))

    return router
