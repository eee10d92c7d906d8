"""The one table from domain errors to HTTP, and the JSON error body every route shares.

Body: {"error": <kind>, "message": <text naming the field>, "field": <field or null>, "limit": <bound or null>}.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bloom_server.errors import ConfigError, EngineDead, InvalidRequest, ModelDirError, NotReady, Overloaded

log = logging.getLogger(__name__)

STATUS: dict[type[Exception], tuple[int, str]] = {
    InvalidRequest: (422, "validation_error"),
    Overloaded: (429, "overloaded"),
    NotReady: (503, "not_ready"),
    EngineDead: (503, "engine_dead"),
    ModelDirError: (500, "model_dir_error"),
    ConfigError: (500, "config_error"),
}


def error_body(kind: str, message: str, field: str | None = None, limit: Any = None, **extra: Any) -> dict:
    return {"error": kind, "message": message, "field": field, "limit": limit, **extra}


def loc_to_field(loc: tuple) -> str:
    """('body', 'text', 0) -> 'text[0]'."""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _validation_message(err: dict) -> tuple[str, str]:
    field = loc_to_field(tuple(err.get("loc", ())))
    if err.get("type") == "json_invalid":
        return "body", f"body: malformed JSON ({err.get('ctx', {}).get('error', 'cannot parse')})"
    msg = err.get("msg", "invalid")
    if err.get("type") == "missing":
        msg = "is required"
    return field, f"{field}: {msg}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        field, message = _validation_message(errors[0]) if errors else ("body", "invalid request")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more: " + "; ".join(_validation_message(e)[1] for e in errors[1:4])
            message += ")"
        return JSONResponse(status_code=422, content=error_body("validation_error", message, field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status_code,
            content=error_body("http_error", str(exc.detail)),
            headers=getattr(exc, "headers", None),
        )

    for exc_type, (status, kind) in STATUS.items():
        app.add_exception_handler(exc_type, _make_handler(status, kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content=error_body("internal_error", f"{type(exc).__name__}: {exc}"))


def _make_handler(status: int, kind: str):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        headers = {}
        if isinstance(exc, Overloaded):
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        if isinstance(exc, NotReady):
            headers["Retry-After"] = "5"
        return JSONResponse(
            status_code=status,
            content=error_body(kind, str(exc), getattr(exc, "field", None), getattr(exc, "limit", None)),
            headers=headers,
        )

    return handler
