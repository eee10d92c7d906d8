"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions. Thin: translate the
body, submit to the engine, translate back. Errors are in OpenAI's shape (api/errors.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from bloom_server.api.common import (
    event_stream,
    openai_stream_error,
    rename_field,
    result_or_disconnect,
    sse,
    sse_response,
    submit_generation,
    timing_headers,
)
from bloom_server.api.errors import NotFound, error_responses, render_error, status_of
from bloom_server.api.grammar import ToolPlan, response_format_grammar, tool_field, tool_grammar
from bloom_server.api.schemas_openai import (
    MAX_STOP,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    ModelObject,
    OpenAIError,
)
from bloom_server.errors import BloomServerError, InvalidRequest
from bloom_server.frontend.chat import ChatTemplate
from bloom_server.frontend.core import Engine
from bloom_server.frontend.requests import Completion, GenRequest
from bloom_server.types import Grammar

OPENAI_ERRORS = error_responses(OpenAIError, e400="Invalid request: `param` names the field", e404="No such model")
_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p"}
_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "max_time": "length"}


def _streamed(answer: str, chunk: str) -> dict[Any, Any]:
    """The responses of a route that answers `answer`, or with `stream` its chunks."""
    return {**OPENAI_ERRORS, 200: sse_response(f"{answer}; with stream: server-sent chunks, then [DONE]",
                                                f"{chunk} (JSON), or [DONE] last")}  # fmt: skip


def _answer(rid: str, obj: str, created: int, model: str, choices: list, req: GenRequest, n: int) -> JSONResponse:
    """A whole (not streamed) completion or chat completion, with TGI's timing headers."""
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": _usage(req, n)}
    return JSONResponse(out, headers=timing_headers([req]))


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise InvalidRequest(f"stop: at most {MAX_STOP} sequences", field="stop", limit=MAX_STOP)
    return tuple(s for s in stops if s)


def _unsupported(body: Any) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name, None) not in (None, 0, 0.0):
            raise InvalidRequest(f"{name}: only 0 is supported (use repetition_penalty on /generate)", field=name)
    if getattr(body, "logit_bias", None):
        raise InvalidRequest("logit_bias: not supported", field="logit_bias")
    if getattr(body, "suffix", None):
        raise InvalidRequest("suffix: not supported", field="suffix")
    best_of = getattr(body, "best_of", None)
    if best_of not in (None, 1, body.n):
        raise InvalidRequest("best_of: only 1 (or n) is supported", field="best_of", limit=1)
    # The deprecated function-calling fields: `tools` with `tool_choice` serve the same purpose.
    if getattr(body, "functions", None):
        raise InvalidRequest("functions: not supported; use tools with tool_choice", field="functions")
    if getattr(body, "function_call", None) not in (None, "none"):
        raise InvalidRequest("function_call: not supported; use tools with tool_choice", field="function_call")


def _grammar(body: Any) -> tuple[Grammar | None, str, ToolPlan | None]:
    """The body's structured output: (grammar, the field a bad one is reported under, the tool call plan)."""
    rf = getattr(body, "response_format", None)
    grammar = response_format_grammar(rf)
    field = "response_format.json_schema.schema" if grammar is not None and grammar.kind == "json_schema" \
        else "response_format"  # fmt: skip
    tools = getattr(body, "tools", None)
    tool = tool_grammar(tools, getattr(body, "tool_choice", None)) if hasattr(body, "tools") else None
    if tool is None:
        return grammar, field, None
    if grammar is not None:
        raise InvalidRequest("response_format: cannot be combined with a required tool call (tool_choice)",
                             field="response_format")  # fmt: skip
    return tool[0], tool_field(tools, body.tool_choice), tool[1]


def _kwargs(body: Any, max_tokens: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"remove_input_from_output": True}
    if max_tokens is not None:
        kw["max_new_tokens"] = max_tokens
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature > 0:  # OpenAI's default (1) samples; 0 is greedy
        kw["do_sample"] = True
        kw["temperature"] = temperature
        if body.top_p is not None and body.top_p < 1:
            kw["top_p"] = body.top_p
    return kw


def build_router(
    engine: Engine,
    model_name: str,
    chat_template: Callable[[], ChatTemplate | None],
    aliases: frozenset[str] = frozenset(),
) -> APIRouter:
    router = APIRouter(tags=["openai"])
    started = time.time()

    def check_model(name: str | None) -> None:
        """A generation body's `model`: the served id, none, or an alias (docs/api.md "Model names")."""
        if name in (None, "", model_name) or name in aliases or "*" in aliases:
            return
        raise NotFound(f"model: {name!r} is not served here; this server serves {model_name!r}", field="model")

    def check_resource(name: str) -> None:
        # A model's own URL names one resource: only the served id has one.
        if name != model_name:
            raise NotFound(f"model: {name!r} is not served here; this server serves {model_name!r}", field="model")

    def submit(
        request: Request,
        prompts: list[str] | list[str | list[int]],
        body: Any,
        max_tokens: int | None,
        field: str,
        top_n: int,
    ):
        _unsupported(body)
        grammar, grammar_field, plan = _grammar(body)

        def rename(exc: InvalidRequest) -> InvalidRequest:
            if exc.field and (exc.field.startswith(("response_format", "tools")) or exc.field == grammar_field):
                return exc
            return rename_field(exc, {**_FIELDS, "text": field}, keep_index=field == "prompt")

        req = submit_generation(engine, request, prompts, _kwargs(body, max_tokens), rename, seed=body.seed,
                            field="text", n=body.n, stop=_stops(body.stop), top_n=top_n, streaming=body.stream,
                            grammar=grammar, grammar_field=grammar_field)  # fmt: skip
        return req, plan

    def card() -> dict[str, Any]:
        # `created`: when the model was loaded (the server's start while it loads), the same on every call.
        return {
            "id": model_name,
            "object": "model",
            "created": int(engine.loaded_at or started),
            "owned_by": "bloom-server",
        }

    @router.get("/v1/models", response_model=ModelList, responses=OPENAI_ERRORS)
    async def list_models() -> ModelList:
        """The one served model, as OpenAI lists models."""
        return ModelList(data=[card()])

    @router.get(
        "/v1/models/{name}",
        response_model=ModelObject,
        responses={
            401: OPENAI_ERRORS[401],
            404: OPENAI_ERRORS[404],
            503: {"model": ModelObject, "description": "Not ready yet (loading) or draining"},
        },
    )
    async def retrieve_model(name: str) -> JSONResponse:
        """OpenAI's model object (`client.models.retrieve`), which is also KServe v1's model status: `name` and
        `ready` are there too, and the status is 503 until the model is loaded and warmed up (and while draining)."""
        if name.endswith(":predict"):  # POST /v1/models/{name}:predict is KServe's route; GET is the wrong method
            raise HTTPException(405, headers={"Allow": "POST"})
        check_resource(name)
        body = {**card(), "name": name, "ready": engine.ready}
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    @router.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=_streamed("CompletionResponse", "a text_completion chunk"),
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """OpenAI completions: prompt (string or list), max_tokens, temperature, top_p, n, stop, seed, logprobs,
        echo, stream (with stream_options.include_usage). Choice i*n+j is prompt i's j-th choice."""
        check_model(body.model)
        prompts = _prompts(body.prompt)
        if not prompts or any(not p for p in prompts):
            raise InvalidRequest("prompt: a non-empty string or a list of them (or of token id lists)", field="prompt")
        req, _ = submit(request, prompts, body, body.max_tokens, "prompt", body.logprobs or 0)
        rid, created = f"cmpl-{req.id}", int(time.time())
        echo = [_prompt_text(engine, p) for p in prompts for _ in range(body.n)] if body.echo else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            gen = _completion_chunks(engine, req, rid, created, model_name, echo, body.logprobs, include_usage, body.n)
            return event_stream(gen, [req], openai_stream_error)
        (comps,) = await result_or_disconnect(request, [req])
        choices = []
        for i, c in enumerate(comps):
            text = (echo[i] if echo else "") + c.text
            lp = (
                _completion_logprobs(engine, c, body.logprobs, echo[i] if echo else None)
                if body.logprobs is not None
                else None
            )
            choices.append(
                {"index": i, "text": text, "logprobs": lp, "finish_reason": _FINISH.get(c.finish_reason, "length")}
            )
        return _answer(rid, "text_completion", created, model_name, choices, req, body.n)

    @router.post(
        "/v1/chat/completions",
        response_model=ChatResponse,
        responses=_streamed("ChatResponse", "a chat.completion.chunk"),
    )
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        """OpenAI chat completions, for a model whose tokenizer has a chat template (or with BLOOM_CHAT_TEMPLATE);
        otherwise a 400 that says so."""
        check_model(body.model)
        template = chat_template()
        if template is None:
            raise InvalidRequest(
                "messages: this model's tokenizer has no chat template (tokenizer_config.json `chat_template`); "
                "use /v1/completions, or start the server with BLOOM_CHAT_TEMPLATE",
                field="messages",
            )
        messages = [_message(m.model_dump(exclude_none=True), i) for i, m in enumerate(body.messages)]
        prompt = template.render(messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        top_n = (body.top_logprobs or 0) if body.logprobs else 0
        req, plan = submit(request, [prompt], body, max_tokens, "messages", top_n)
        rid, created = f"chatcmpl-{req.id}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            gen = _chat_chunks(engine, req, rid, created, model_name, body.logprobs, include_usage, body.n, plan)
            return event_stream(gen, [req], openai_stream_error)
        (comps,) = await result_or_disconnect(request, [req])
        choices = []
        for i, c in enumerate(comps):
            message, finish = _chat_message(c, plan, f"{rid}-{i}")
            choices.append({
                "index": i,
                "message": message,
                "logprobs": {"content": _chat_logprobs(engine, c)} if body.logprobs else None,
                "finish_reason": finish,
            })  # fmt: skip
        return _answer(rid, "chat.completion", created, model_name, choices, req, body.n)

    return router


def _tool_call(plan: ToolPlan, c: Completion, call_id: str) -> dict[str, Any] | None:
    """OpenAI's tool call of a finished constrained answer (None: it was cut, or does not parse)."""
    if c.finish_reason not in ("eos_token", "stop_sequence"):
        return None
    call = plan.call(c.text)
    if call is None:
        return None
    return {"id": f"call_{call_id}", "type": "function", "function": {"name": call[0], "arguments": call[1]}}


def _chat_message(c: Completion, plan: ToolPlan | None, call_id: str) -> tuple[dict[str, Any], str]:
    """The choice's message and finish_reason: a tool call when the answer is a complete one (finish_reason
    `tool_calls`); otherwise the text, with `length` when it was cut."""
    if plan is not None:
        call = _tool_call(plan, c, call_id)
        if call is not None:
            return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    return {"role": "assistant", "content": c.text}, _FINISH.get(c.finish_reason, "length")


def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four prompt shapes: a string, strings, one prompt as token ids, or several as token id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


def _prompt_text(engine: Engine, prompt: str | list[int]) -> str:
    assert engine.tokenizer is not None
    return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)


def _message(m: dict[str, Any], i: int) -> dict[str, Any]:
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    f"messages[{i}].content: only text parts are supported", field=f"messages[{i}].content"
                )
            parts.append(part["text"])
        m["content"] = "".join(parts)
    elif content is None:
        m["content"] = ""
    return m


def _usage(req: GenRequest, n: int = 1) -> dict[str, int]:
    prompt = req.prompt_tokens // max(1, n)  # each prompt counted once, whatever its number of choices
    completion = req.generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _text(engine: Engine, token_id: int) -> str:
    assert engine.tokenizer is not None
    return engine.tokenizer.token_text(token_id)


def _completion_logprobs(engine: Engine, c: Completion, n: int | None, echo: str | None) -> dict[str, Any]:
    tokens: list[Any] = []
    lps: list[Any] = []
    tops: list[Any] = []
    if echo is not None:  # the prompt's own tokens: their log-probabilities are not computed here (null)
        for t in c.prompt_ids:
            tokens.append(_text(engine, t))
            lps.append(None)
            tops.append(None)
    for t, lp, top in zip(
        c.token_ids, c.logprobs or [None] * len(c.token_ids), c.top_logprobs or [None] * len(c.token_ids)
    ):
        tokens.append(_text(engine, t))
        lps.append(lp)
        tops.append({_text(engine, i): p for i, p in top} if (n and top) else None)
    offsets, at = [], 0
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops if n else None, "text_offset": offsets}


def _chat_logprobs(engine: Engine, c: Completion) -> list[dict[str, Any]]:
    out = []
    for t, lp, top in zip(
        c.token_ids, c.logprobs or [None] * len(c.token_ids), c.top_logprobs or [None] * len(c.token_ids)
    ):
        text = _text(engine, t)
        out.append(
            {
                "token": text,
                "logprob": lp if lp is not None else 0.0,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": _text(engine, i), "logprob": p, "bytes": list(_text(engine, i).encode())}
                    for i, p in (top or ())
                ],
            }
        )
    return out


async def _completion_chunks(
    engine: Engine,
    req: GenRequest,
    rid: str,
    created: int,
    model: str,
    echo: list[str] | None,
    logprobs: int | None,
    include_usage: bool,
    n: int,
) -> AsyncIterator[bytes]:
    def chunk(index: int, text: str, finish: str | None, lp: Any = None) -> bytes:
        return sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}],
            }
        )

    if echo:
        for i, prompt in enumerate(echo):
            yield chunk(i, prompt, None)
    async for ev in req.stream():
        lp = None
        if logprobs is not None:
            text = _text(engine, ev.token_id)
            lp = {
                "tokens": [text],
                "token_logprobs": [ev.logprob],
                "top_logprobs": [{_text(engine, i): p for i, p in (ev.top or ())}] if logprobs else None,
                "text_offset": [0],
            }
        yield chunk(ev.row, ev.text, None, lp)
    # The finishing chunk carries any text the token events held back, so the chunks add up to the answer.
    async for tail in _finish(
        req,
        lambda i, c: chunk(i, c.stream_tail, _FINISH.get(c.finish_reason, "length")),
        rid,
        created,
        model,
        "text_completion",
        include_usage,
        n,
    ):
        yield tail


async def _chat_chunks(
    engine: Engine,
    req: GenRequest,
    rid: str,
    created: int,
    model: str,
    logprobs: bool,
    include_usage: bool,
    n: int,
    plan: ToolPlan | None = None,
) -> AsyncIterator[bytes]:
    def chunk(index: int, delta: dict, finish: str | None, lp: Any = None) -> bytes:
        return sse(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
            }
        )

    texts: dict[int, str] = {}  # with a tool call: each choice's text so far
    for i in range(req.n_rows):
        yield chunk(i, {"role": "assistant", "content": "" if plan is None else None}, None)
    async for ev in req.stream():
        lp = None
        if logprobs:
            text = _text(engine, ev.token_id)
            lp = {
                "content": [
                    {
                        "token": text,
                        "logprob": ev.logprob if ev.logprob is not None else 0.0,
                        "bytes": list(text.encode()),
                        "top_logprobs": [
                            {"token": _text(engine, i), "logprob": p, "bytes": list(_text(engine, i).encode())}
                            for i, p in (ev.top or ())
                        ],
                    }
                ]
            }
        if plan is None:
            yield chunk(ev.row, {"content": ev.text}, None, lp)
        else:  # a tool call is sent whole once it is complete (its name is known only then with "required")
            texts[ev.row] = texts.get(ev.row, "") + ev.text

    def last(i: int, c: Completion) -> bytes:
        if plan is not None:
            message, finish = _chat_message(c, plan, f"{rid}-{i}")
            if message.get("tool_calls"):
                return chunk(i, {"tool_calls": [{"index": 0, **message["tool_calls"][0]}]}, finish)
            return chunk(i, {"content": texts.get(i, "") + c.stream_tail}, finish)
        return chunk(i, {"content": c.stream_tail} if c.stream_tail else {}, _FINISH.get(c.finish_reason, "length"))

    async for tail in _finish(req, last, rid, created, model, "chat.completion.chunk", include_usage, n):
        yield tail


async def _finish(
    req: GenRequest,
    last: Callable[[int, Completion], bytes],
    rid: str,
    created: int,
    model: str,
    obj: str,
    include_usage: bool,
    n: int,
) -> AsyncIterator[bytes]:
    """The stream's end: one chunk per choice with its finish_reason, usage if asked, then [DONE]; or, if the
    request failed after the stream began, one error event (OpenAI's error shape) and [DONE]."""
    try:
        comps = await req.result()
    except BloomServerError as exc:
        status, kind = status_of(exc)
        yield sse(render_error("openai", status, kind, str(exc))[1])
        yield b"data: [DONE]\n\n"
        return
    for i, c in enumerate(comps):
        yield last(i, c)
    if include_usage:
        yield sse(
            {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": _usage(req, n)}
        )
    yield b"data: [DONE]\n\n"
