"""The one table from domain errors to HTTP, and the error body of each API surface.

- bloom (the original routes, /info, ...): {"error": <kind>, "message": <text naming the field>, "field", "limit"}
- tgi (/generate_stream, POST /, /generate with TGI's body): {"error": <message>, "error_type": <kind>, "message",
  "field", "limit"} (huggingface_hub reads `error` and `error_type`)
- openai (every /v1/... path but KServe's /v1/models/{name}:predict): {"error": {"message", "type", "param",
  "code"}}; invalid input is a 400 there, as OpenAI answers it; `type` is a client error type for every 4xx
- kserve (/v2/..., /v1/models/{name}:predict): {"error": <message>, "message", "field", "limit"}; invalid input is
  a 400
Every shape but OpenAI's has a string `error` and `message`, so generic clients can read any of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from bloom_server.errors import (
    BloomServerError,
    ConfigError,
    EngineDead,
    InvalidRequest,
    ModelDirError,
    NotReady,
    Overloaded,
)
from bloom_server.frontend.requests import Cancelled, DeadlineExceeded

log = logging.getLogger(__name__)


class Unauthorized(BloomServerError):
    """No API key, or the wrong one."""


class NotFound(BloomServerError):
    """No such model (or resource)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


STATUS: dict[type[Exception], tuple[int, str]] = {
    InvalidRequest: (422, "validation_error"),
    Unauthorized: (401, "unauthorized"),
    NotFound: (404, "not_found"),
    Overloaded: (429, "overloaded"),
    Cancelled: (499, "cancelled"),
    NotReady: (503, "not_ready"),
    EngineDead: (503, "engine_dead"),
    DeadlineExceeded: (504, "deadline_exceeded"),
    ModelDirError: (500, "model_dir_error"),
    ConfigError: (500, "config_error"),
}

# TGI's error_type values (huggingface_hub turns them into its exception classes).
_TGI_TYPES = {"validation_error": "validation", "overloaded": "overloaded", "engine_dead": "generation"}
# Any other 4xx is "invalid_request_error", any other 5xx "server_error".
_OPENAI_TYPES = {
    401: "authentication_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable",
    504: "timeout",
}


_COMMON_ERROR_DOCS = {
    401: "API key missing or wrong",
    413: "Body larger than the limit",
    429: "Queue full; retry after Retry-After seconds",
    503: "Model not ready (loading, draining) or engine failed",
    504: "The request's deadline passed while it was queued",
}


def error_responses(model: Any, **surface: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a generate route: the errors every surface shares, plus the surface's own (given
    as `e400="..."`, `e422="..."`), each with the surface's error schema."""
    docs = {**_COMMON_ERROR_DOCS, **{int(k[1:]): v for k, v in surface.items()}}
    return {code: {"model": model, "description": docs[code]} for code in sorted(docs)}


def error_body(kind: str, message: str, field: str | None = None, limit: Any = None, **extra: Any) -> dict:
    return {"error": kind, "message": message, "field": field, "limit": limit, **extra}


def surface_of(request_or_scope: Any) -> str:
    """Which API surface a request belongs to: decides the error body's shape. A route may set it explicitly
    (request.state.surface), e.g. /generate when the body is TGI's."""
    scope = getattr(request_or_scope, "scope", request_or_scope)
    explicit = (scope.get("state") or {}).get("surface")
    if explicit:
        return explicit
    path = scope.get("path", "")
    if path.startswith("/v2/") or path == "/v2" or path.endswith(":predict"):
        return "kserve"
    if path.startswith("/v1/"):
        return "openai"
    if path in ("/generate_stream", "/") and scope.get("method") == "POST":
        return "tgi"
    return "bloom"


def render_error(
    surface: str, status: int, kind: str, message: str, field: str | None = None, limit: Any = None
) -> tuple[int, dict]:
    """(status, body) of an error in the shape of the given surface."""
    if surface == "openai":
        status = 400 if status == 422 else status
        return status, {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
                "param": field,
                "code": kind,
            }
        }
    if surface == "kserve":
        return (400 if status == 422 else status), {
            "error": message,
            "message": message,
            "field": field,
            "limit": limit,
        }
    if surface == "tgi":
        tgi_type = _TGI_TYPES.get(kind, kind)
        return status, {"error": message, "error_type": tgi_type, "message": message, "field": field, "limit": limit}
    return status, error_body(kind, message, field, limit)


def error_response(
    request: Any, status: int, kind: str, message: str, field: str | None = None, limit: Any = None, headers=None
) -> JSONResponse:
    status, body = render_error(surface_of(request), status, kind, message, field, limit)
    return JSONResponse(status_code=status, content=body, headers=headers)


def status_of(exc: BaseException) -> tuple[int, str]:
    for exc_type, (status, kind) in STATUS.items():
        if isinstance(exc, exc_type):
            return status, kind
    return 500, "internal_error"


def loc_to_field(loc: tuple) -> str:
    """('body', 'text', 0) -> 'text[0]'."""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def malformed_json(exc: BaseException) -> RequestValidationError:
    """The validation error of a body that is not JSON (also one nested deeper than the parser goes), as FastAPI
    makes it for the routes whose body it parses: the position in `loc`, the reason in `ctx`."""
    if isinstance(exc, json.JSONDecodeError):
        loc: tuple[str | int, ...] = ("body", exc.pos)
        reason = exc.msg
    else:
        loc, reason = ("body",), "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
    return RequestValidationError(
        [{"type": "json_invalid", "loc": loc, "msg": "JSON decode error", "ctx": {"error": reason}}]
    )


def _validation_message(err: dict) -> tuple[str, str]:
    field = loc_to_field(tuple(err.get("loc", ())))
    if err.get("type") == "json_invalid":
        loc = tuple(err.get("loc", ()))
        at = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return "body", f"body: malformed JSON ({err.get('ctx', {}).get('error', 'cannot parse')}{at})"
    msg = err.get("msg", "invalid")
    if err.get("type") == "missing":
        msg = "is required"
    return field, f"{field}: {msg}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        field, message = validation_summary(errors)
        return error_response(request, 422, "validation_error", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers a body it could not read with a bare 400 "There was an error parsing the body"; its cause
        # says why: the client left (the Gateway middleware logs a 499), or the body is not JSON (a 422 naming `body`, as on
        # the routes that parse their body by hand).
        cause = exc.__cause__
        if isinstance(cause, ClientDisconnect):
            raise cause
        if exc.status_code == 400 and isinstance(cause, (ValueError, RecursionError)):
            return await _validation(request, malformed_json(cause))
        return error_response(
            request, exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None)
        )

    for exc_type, (status, kind) in STATUS.items():
        app.add_exception_handler(exc_type, _make_handler(status, kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal_error", internal_error_message(request))


def internal_error_message(request: Any) -> str:
    """A 5xx never quotes the exception: its text may hold the client's input or the server's internals. The request
    id leads to the log line that has it."""
    rid = getattr(getattr(request, "state", None), "request_id", None) if request is not None else None
    return "internal error; the server log has the details" + (f" (request id {rid})" if rid else "")


def validation_summary(errors: Sequence[Any]) -> tuple[str, str]:
    """(field, message) of pydantic errors: the first named, the next few listed."""
    field, message = _validation_message(errors[0]) if errors else ("body", "invalid request")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more: " + "; ".join(_validation_message(e)[1] for e in errors[1:4])
        message += ")"
    return field, message


def error_headers(exc: BaseException) -> dict[str, str]:
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, NotReady):
        headers["Retry-After"] = "5"
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def _make_handler(status: int, kind: str):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None and status in (429, 503, 504):
            metrics.rejected.labels(kind).inc()
        return error_response(
            request,
            status,
            kind,
            str(exc),
            getattr(exc, "field", None),
            getattr(exc, "limit", None),
            headers=error_headers(exc),
        )

    return handler
