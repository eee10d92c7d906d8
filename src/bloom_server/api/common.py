"""What every generation route shares: parsing a body into a model by hand (for routes that accept two shapes),
waiting for a result while watching for the client to leave, server-sent events, and TGI-style timing headers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi import routing as fastapi_routing
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from bloom_server.api.errors import malformed_json, render_error
from bloom_server.errors import InvalidRequest
from bloom_server.frontend.requests import Cancelled, Completion, GenRequest

if TYPE_CHECKING:
    from bloom_server.frontend.core import Engine

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise malformed_json(exc) from None


def parse(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [dict(e, loc=("body", *e["loc"])) for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def submit_generation(
    engine: Engine,
    request: Request,
    prompts: list[Any],
    kwargs: dict[str, Any],
    rename: Callable[[InvalidRequest], InvalidRequest] | None = None,
    **options: Any,
) -> GenRequest:
    """A route's generation request, submitted with the HTTP request's deadline (X-Request-Timeout) and id, and left
    where the access log and the error handlers find it. A refusal is raised as `rename` names its field (the field
    as the surface's clients sent it)."""
    try:
        req = engine.submit(
            prompts, kwargs, timeout_s=header_timeout(request), request_id=request_id(request), **options
        )
    except InvalidRequest as exc:
        if rename is None:
            raise
        raise rename(exc) from None
    remember(request, req)
    return req


def remember(request: Request, *reqs: GenRequest) -> None:
    """Leave the engine's requests where the access log and the error handlers find them."""
    request.state.gen = list(getattr(request.state, "gen", []) or []) + list(reqs)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection. The body has been read by then; uvicorn answers further
    receive() calls with http.disconnect once the client is gone."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def result_or_disconnect(request: Request, reqs: list[GenRequest]) -> list[list[Completion]]:
    """Every request's completions; if the client leaves first, the requests are cancelled (a queued one leaves the
    queue, a running one's rows stop) and Cancelled is raised."""
    if len(reqs) == 1:
        return [await _one_result_or_disconnect(request, reqs[0])]
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    results = asyncio.ensure_future(asyncio.gather(*(r.result() for r in reqs)))
    try:
        both: set[asyncio.Future[Any]] = {watcher, results}
        done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if results in done:
            return results.result()
        raise Cancelled("the client disconnected")
    finally:
        watcher.cancel()
        if not results.done():
            results.cancel()
            # The cancelled gather ends with a CancelledError that nobody awaits: retrieve it, or asyncio logs
            # "_GatheringFuture exception was never retrieved".
            results.add_done_callback(lambda f: f.cancelled() or f.exception())
        for r in reqs:
            r.cancel("the client disconnected")


async def _one_result_or_disconnect(request: Request, req: GenRequest) -> list[Completion]:
    """The one-request case, lighter (every non-streamed route has one request): one watcher task, which cancels the
    request when the client leaves; the result is awaited directly (no gather, no asyncio.wait)."""
    watcher = asyncio.get_running_loop().create_task(wait_for_disconnect(request))
    left = False

    def on_watcher_done(task: asyncio.Task) -> None:
        nonlocal left
        if not task.cancelled():
            task.exception()  # retrieved; whatever ended the watch, the answer has nobody to go to
            left = True
            req.cancel("the client disconnected")

    watcher.add_done_callback(on_watcher_done)
    try:
        return await req.result()
    except Cancelled:
        if left:
            raise Cancelled("the client disconnected") from None
        raise
    finally:
        watcher.cancel()
        req.cancel("the client disconnected")


def openai_stream_error(message: str) -> list[bytes]:
    """The end of an OpenAI stream that failed: an error event in OpenAI's shape, then [DONE]."""
    return [sse(render_error("openai", 500, "internal_error", message)[1]), b"data: [DONE]\n\n"]


def tgi_stream_error(message: str) -> list[bytes]:
    """The end of a TGI stream that failed: TGI's error event (huggingface_hub raises it)."""
    return [sse(render_error("tgi", 500, "internal_error", message)[1])]


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_response(description: str, event: str) -> dict[str, Any]:
    """OpenAPI's 200 of a route that may stream: `description`, and server-sent events whose `data` is a JSON
    document (described in `event`)."""
    schema = {
        "type": "object",
        "properties": {"data": {"type": "string", "description": event}, "event": {"type": "string"}},
        "required": ["data"],
    }
    return {"description": description, "content": {"text/event-stream": {"schema": schema}}}


def event_stream(
    gen: AsyncIterator[bytes], reqs: list[GenRequest], closing: Callable[[str], list[bytes]]
) -> StreamingResponse:
    """A streamed answer: `gen`'s server-sent events, through events_then_close."""
    return StreamingResponse(events_then_close(gen, reqs, closing), media_type="text/event-stream", headers=SSE_HEADERS)


def timing_headers(reqs: list[GenRequest], compute_type: str | None = None) -> dict[str, str]:
    """TGI's response headers (milliseconds): x-queue-time, x-inference-time, x-time-per-token, x-total-time,
    x-prompt-tokens, x-generated-tokens, x-compute-type."""
    queue = max(r.queue_time for r in reqs)
    inference = max(r.inference_time for r in reqs)
    generated = sum(r.generated_tokens for r in reqs)
    total = max(((r.finished or r.enqueued) - r.enqueued) for r in reqs)
    headers = {
        "x-queue-time": str(round(queue * 1000)),
        "x-inference-time": str(round(inference * 1000)),
        "x-time-per-token": str(round(inference * 1000 / max(1, generated))),
        "x-total-time": str(round(total * 1000)),
        "x-prompt-tokens": str(sum(r.prompt_tokens for r in reqs)),
        "x-generated-tokens": str(generated),
    }
    if compute_type:
        headers["x-compute-type"] = compute_type
    return headers


async def events_then_close(
    gen: AsyncIterator[bytes], reqs: list[GenRequest], closing: Callable[[str], list[bytes]]
) -> AsyncIterator[bytes]:
    """Wrap a stream so that a client that leaves (Starlette cancels the stream) cancels its requests, and so that a
    stream never ends without its closing event: if anything fails inside it after the 200 went out, the client gets
    `closing(message)` (the surface's error event and end marker), and the log the traceback."""
    try:
        try:
            async for chunk in gen:
                yield chunk
        except Exception:  # the header is sent: an event is the only way left to say it
            log.exception("unexpected error in a stream")
            for chunk in closing("internal error; the server log has the details"):
                yield chunk
    finally:
        for r in reqs:
            r.cancel("the client disconnected")


def rename_field(
    exc: InvalidRequest, mapping: dict[str, str], prefix: str = "", keep_index: bool = True
) -> InvalidRequest:
    """The engine names its own fields (text[0], max_new_tokens, ...); a surface names them as its clients sent
    them (inputs, parameters.max_new_tokens, prompt[1], max_tokens, ...)."""
    old = exc.field or ""
    base, bracket, rest = old.partition("[")
    if base in mapping:
        new = mapping[base] + (bracket + rest if keep_index else "")
    else:
        new = prefix + old if old else old
    message = exc.message
    if old and message.startswith(old + ":"):
        message = new + message[len(old) :]
    return InvalidRequest(message, field=new or None, limit=exc.limit)


def header_timeout(request: Request) -> float | None:
    """X-Request-Timeout: seconds this request may take from now (the server's own limit still applies)."""
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0 and value < 1e7):
        raise InvalidRequest(
            f"x-request-timeout: must be a number of seconds > 0 (got {raw!r})", field="x-request-timeout", limit="> 0"
        )
    return value


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


class RequestOnlyRoute(fastapi_routing.APIRoute):
    """A route whose endpoint takes only the Request and returns a Response (it reads and validates its own body):
    FastAPI's per-request handler around it (dependency solving with nothing to solve, no body to read, no response
    model to apply) is left out and the endpoint is called directly: more requests per server CPU-second on POST
    /generate (docs/results/benchmarks.md "Server overhead"). Routing, exception handlers, middleware and the OpenAPI
    document are FastAPI's as for any route. An endpoint with any other parameter gets FastAPI's handler. (FastAPI's
    opt-in telemetry, `FastAPI(telemetry=...)`, which this app does not turn on, would see no dependency/endpoint
    spans for such a route.)"""

    def get_route_handler(self):
        # Included in a router, FastAPI builds the handler for the route as included (its context may add the
        # including router's dependencies): judge that one.
        var = getattr(fastapi_routing, "_effective_route_context_var", None)
        ctx = var.get() if var is not None else None
        d = ctx.dependant if ctx is not None and getattr(ctx, "original_route", None) is self else self.dependant
        lean = (
            d.request_param_name is not None
            and not (d.path_params or d.query_params or d.header_params or d.cookie_params or d.body_params)
            and not d.dependencies
            and d.response_param_name is None
            and d.background_tasks_param_name is None
            and asyncio.iscoroutinefunction(self.endpoint)
        )
        return self.endpoint if lean else super().get_route_handler()
