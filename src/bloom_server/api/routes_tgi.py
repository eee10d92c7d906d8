"""Text Generation Inference's routes: POST /generate_stream (server-sent events), POST / (TGI's compat route:
`stream` in the body decides), and TGI's body on POST /generate (routes_bloom dispatches here). huggingface_hub's
InferenceClient(base_url).text_generation(...) works against these unchanged."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bloom_server.api.common import (
    event_stream,
    parse,
    read_json,
    rename_field,
    result_or_disconnect,
    sse,
    sse_response,
    submit_generation,
    tgi_stream_error,
    timing_headers,
)
from bloom_server.api.errors import error_responses, render_error, status_of
from bloom_server.api.grammar import tgi_grammar
from bloom_server.api.schemas import ErrorResponse, GenerateKwargs
from bloom_server.api.schemas_tgi import TGIRequest, TGIResponse
from bloom_server.errors import BloomServerError, InvalidRequest
from bloom_server.frontend.core import Engine
from bloom_server.frontend.requests import Completion, GenRequest, TokenEvent
from bloom_server.types import ACCEPTED_GENERATE_KWARGS

TGI_ERRORS = error_responses(ErrorResponse, e422="Invalid request: `error` names the field, `error_type` is TGI's kind")
# The engine's field names -> TGI's
_FIELDS = {"text": "inputs"}


def submit(engine: Engine, request: Request, body: TGIRequest, streaming: bool = False) -> GenRequest:
    p = body.parameters
    if p.best_of not in (None, 1):
        raise InvalidRequest("parameters.best_of: only 1 is supported", field="parameters.best_of", limit=1)
    for name, unsupported in (
        ("watermark", p.watermark),
        ("adapter_id", p.adapter_id is not None),
        ("frequency_penalty", p.frequency_penalty not in (None, 0)),
    ):
        if unsupported:
            raise InvalidRequest(f"parameters.{name}: not supported by this server", field=f"parameters.{name}")
    kwargs: dict[str, Any] = {}
    for name in ("max_new_tokens", "repetition_penalty", "temperature", "top_k", "top_p", "typical_p"):
        value = getattr(p, name)
        if value is not None:
            kwargs[name] = value
    if p.top_k is not None and p.top_k <= 0:
        raise InvalidRequest("parameters.top_k: must be > 0", field="parameters.top_k", limit="> 0")
    if p.temperature is not None and p.temperature <= 0:
        raise InvalidRequest("parameters.temperature: must be > 0", field="parameters.temperature", limit="> 0")
    # As TGI does: any warper means sampling.
    sampling = p.do_sample or (p.temperature not in (None, 1.0)) or p.top_k is not None
    sampling = sampling or (p.top_p is not None and p.top_p < 1) or (p.typical_p is not None and p.typical_p < 1)
    if sampling:
        kwargs["do_sample"] = True
    kwargs["remove_input_from_output"] = not p.return_full_text
    # Beyond TGI's own parameters, the original server's generate() keywords (min_length, no_repeat_ngram_size, ...)
    # and min_new_tokens are honoured too, with the same parsing as POST /generate's.
    extra = {k: v for k, v in (p.model_extra or {}).items() if k in ACCEPTED_GENERATE_KWARGS and k not in kwargs}
    if extra:
        kwargs.update(parse(GenerateKwargs, extra).generate_kwargs())
    grammar = tgi_grammar(p.grammar, "parameters.grammar")

    def rename(exc: InvalidRequest) -> InvalidRequest:
        if exc.field and exc.field.startswith("parameters.grammar"):
            return exc
        return rename_field(exc, _FIELDS, prefix="parameters.", keep_index=False)

    return submit_generation(engine, request, [body.inputs], kwargs, rename, seed=p.seed, field="text",
                         stop=tuple(p.stop), top_n=p.top_n_tokens or 0, truncate=p.truncate, streaming=streaming,
                         grammar=grammar, grammar_field="parameters.grammar")  # fmt: skip


def generated_text(c: Completion) -> str:
    # TGI's generated_text ends with the stop sequence that ended it.
    return c.text + (c.stop_sequence or "")


def _token(engine: Engine, token_id: int, logprob: float | None) -> dict:
    tok = engine.tokenizer
    assert tok is not None
    return {
        "id": token_id,
        "text": tok.token_text(token_id),
        "logprob": logprob,
        "special": token_id in tok.special_ids,
    }


def response_body(engine: Engine, req: GenRequest, c: Completion, details: bool, prefill: bool) -> dict:
    out: dict[str, Any] = {"generated_text": generated_text(c)}
    if details:
        tokens = [_token(engine, t, lp) for t, lp in zip(c.token_ids, c.logprobs or [None] * len(c.token_ids))]
        d: dict[str, Any] = {
            "finish_reason": c.finish_reason,
            "generated_tokens": len(c.token_ids),
            "seed": req.seed if req.spec.params.do_sample else None,
            "prefill": [
                {"id": t, "text": engine.tokenizer.token_text(t), "logprob": None}  # type: ignore[union-attr]
                for t in (c.prompt_ids if prefill else ())
            ],
            "tokens": tokens,
        }
        if req.top_n:
            d["top_tokens"] = [[_token(engine, i, lp) for i, lp in (alts or ())] for alts in c.top_logprobs]
        out["details"] = d
    return out


async def answer(engine: Engine, request: Request, body: TGIRequest, as_list: bool) -> Response:
    req = submit(engine, request, body)
    (completions,) = await result_or_disconnect(request, [req])
    out = response_body(engine, req, completions[0], body.parameters.details, body.parameters.decoder_input_details)
    return JSONResponse([out] if as_list else out, headers=timing_headers([req], compute_type(engine)))


def compute_type(engine: Engine) -> str | None:
    if engine.info is None:
        return None
    device = str(engine.info.extra.get("device", ""))
    return f"{engine.info.world_size}-{'gpu' if 'cuda' in device or engine.info.backend != 'hf' else 'cpu'}"


def stream(engine: Engine, request: Request, body: TGIRequest) -> StreamingResponse:
    req = submit(engine, request, body, streaming=True)  # every 4xx happens here, before the stream's first byte
    return event_stream(_events(engine, req), [req], tgi_stream_error)


async def _events(engine: Engine, req: GenRequest) -> AsyncIterator[bytes]:
    # The last token's event carries the answer (generated_text, details), so an event waits while it may be the
    # last: while what follows it is already queued, or where a timer may end the request with no token. Otherwise
    # it goes out at once: the end comes with the last token, so the first token does not wait for the second.
    last: TokenEvent | None = None  # held
    sent: TokenEvent | None = None
    count = 0
    async for ev in req.stream():
        if last is not None:
            yield sse(_event(engine, last, count))
            sent, last = last, None
        count += 1
        if req.events_queued() or req.may_end_without_token():
            last = ev
        else:
            yield sse(_event(engine, ev, count))
            sent = ev
    try:
        (c,) = await req.result()
    except BloomServerError as exc:
        if last is not None:
            yield sse(_event(engine, last, count))
        status, kind = status_of(exc)
        yield sse(render_error("tgi", status, kind, str(exc))[1])
        return
    if last is None and sent is None:
        yield sse({"error": "the request ended before its first token", "error_type": "incomplete_generation"})
        return
    if last is None:  # an end no timer foresaw, after every token went out: the final event adds only the held text
        assert sent is not None
        last = dataclasses.replace(sent, text="", logprob=None, top=None)
    final = _event(engine, last, count)
    # The engine's events stop before a stop sequence; TGI's generated_text ends with it, so the last token carries
    # it too: the tokens' texts add up to generated_text (less the prompt, with return_full_text).
    final["token"]["text"] += c.stream_tail + (c.stop_sequence or "")
    final["generated_text"] = generated_text(c)
    final["details"] = {
        "finish_reason": c.finish_reason,
        "generated_tokens": len(c.token_ids),
        "seed": req.seed if req.spec.params.do_sample else None,
        "input_length": c.prompt_tokens,
    }
    yield sse(final)


def _event(engine: Engine, ev: TokenEvent, index: int) -> dict:
    tok = engine.tokenizer
    assert tok is not None
    out: dict[str, Any] = {
        "index": index,
        "token": {"id": ev.token_id, "text": ev.text, "logprob": ev.logprob, "special": ev.special},
        "generated_text": None,
        "details": None,
    }
    if ev.top:
        out["top_tokens"] = [_token(engine, i, lp) for i, lp in ev.top]
    return out


def build_router(engine: Engine) -> APIRouter:
    router = APIRouter(tags=["text-generation-inference"])

    @router.post(
        "/generate_stream",
        response_class=StreamingResponse,
        responses={
            200: sse_response(
                "One `data: {TGIStreamEvent}` event per token; the last has generated_text and details; an error "
                'after the first token ends the stream with `data: {"error": <message>, "error_type": <kind>}`.',
                "TGIStreamEvent (JSON)",
            ),
            **TGI_ERRORS,
        },
    )
    async def generate_stream(body: TGIRequest, request: Request) -> StreamingResponse:
        """TGI's streaming route: tokens as server-sent events. Invalid requests get their 4xx before any event."""
        request.state.surface = "tgi"
        return stream(engine, request, body)

    @router.post(
        "/",
        response_model=list[TGIResponse],
        responses={
            200: sse_response(
                "`[TGIResponse]` as JSON; with `stream: true`, the events of /generate_stream", "TGIStreamEvent (JSON)"
            ),
            **TGI_ERRORS,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TGIRequest"}}},
            }
        },
    )
    async def compat_generate(request: Request) -> Response:
        """TGI's compat route: `{"inputs", "parameters", "stream"}`; streams (as /generate_stream) when `stream` is
        true, else answers `[{"generated_text", "details"?}]`."""
        request.state.surface = "tgi"
        body = parse(TGIRequest, await read_json(request))
        if body.stream:
            return stream(engine, request, body)
        return await answer(engine, request, body, as_list=True)

    return router
