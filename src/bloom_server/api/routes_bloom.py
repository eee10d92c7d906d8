"""The original server's routes, with and without the trailing slash (never a redirect)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from bloom_server.api import routes_tgi
from bloom_server.api.common import (
    RequestOnlyRoute,
    parse,
    read_json,
    result_or_disconnect,
    submit_generation,
    timing_headers,
)
from bloom_server.api.errors import error_responses
from bloom_server.api.grammar import tgi_grammar
from bloom_server.api.schemas import (
    ErrorResponse,
    ForwardRequest,
    ForwardResponse,
    GenerateRequest,
    GenerateResponse,
    QueryIdResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from bloom_server.api.schemas_tgi import TGIRequest, TGIResponse, TGIStreamEvent
from bloom_server.frontend.core import Engine

ERRORS = error_responses(ErrorResponse, e422="Invalid request: the message names the field and the limit")
# POST /generate takes the original body or TGI's; both schemas are listed (app.py adds them to the components).
GENERATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/GenerateRequest"},
                        {"$ref": "#/components/schemas/TGIRequest"},
                    ]
                }
            }
        },
    }
}
GENERATE_RESPONSES = {
    **ERRORS,
    200: {
        "description": "GenerateResponse for the original body; TGIResponse for TGI's",
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/GenerateResponse"},
                        {"$ref": "#/components/schemas/TGIResponse"},
                    ]
                }
            }
        },
    },
}
OPENAPI_MODELS = [GenerateRequest, GenerateResponse, TGIRequest, TGIResponse, TGIStreamEvent]


class QueryIds:
    def __init__(self) -> None:
        self.counters = {name: itertools.count() for name in ("generate", "tokenize", "forward")}
        self.next = {name: 0 for name in self.counters}

    def take(self, name: str) -> int:
        qid = next(self.counters[name])
        self.next[name] = qid + 1
        return qid


IGNORED_NAMES, IGNORED_NAME_CHARS = 16, 56  # the header stays under 1 KiB, whatever the body holds


def ignored_fields_header(names: list[str]) -> str:
    """x-ignored-fields: the unknown fields of the body, comma-separated. Header values are latin-1: a name that is
    not printable ASCII (or holds a comma or %, or starts or ends with a space) goes percent-encoded. Bounded: the first 16 names, each cut to 56
    characters (a cut name ends with "..."), then "+N more" for the names left out."""
    items = []
    for name in names[:IGNORED_NAMES]:
        # Edge whitespace is percent-encoded too: a header value may not begin or end with it (h11 refuses to send
        # one, and the connection would drop without an answer).
        plain = name.isascii() and name.isprintable() and name == name.strip() and not set(name) & {",", "%"}
        item, cut = (name if plain else quote(name, safe="")), name[:IGNORED_NAME_CHARS]
        while len(item) > IGNORED_NAME_CHARS:
            cut = cut[:-1]
            item = (cut if plain else quote(cut, safe="")) + "..."
        items.append(item)
    if len(names) > len(items):
        items.append(f"+{len(names) - len(items)} more")
    return ",".join(items)


def secs(t: float) -> str:
    return f"{round(t, 2)} secs"


def msecs(t: float) -> str:
    return f"{round(t * 1000, 2)} msecs"


def build_router(engine: Engine) -> APIRouter:
    router = APIRouter(tags=["bloom"])
    ids = QueryIds()

    def both(path: str, method: str, **kw) -> Callable:
        def deco(fn: Callable) -> Callable:
            router.add_api_route(path, fn, methods=[method], **kw)
            router.add_api_route(path + "/", fn, methods=[method], include_in_schema=False, **kw)
            return fn

        return deco

    # The hot route: called without FastAPI's per-request handler (nothing for it to solve; see RequestOnlyRoute).
    @both(
        "/generate",
        "POST",
        responses=GENERATE_RESPONSES,
        openapi_extra=GENERATE_BODY,
        route_class_override=RequestOnlyRoute,
    )
    async def generate(request: Request) -> Response:
        """Generate a completion for each prompt. The original body (`{"text": [...], <generate() kwargs>}`) gets
        the original answer; TGI's body (`{"inputs": str, "parameters": {...}}`) gets TGI's."""
        start = time.perf_counter()
        data = await read_json(request)
        if isinstance(data, dict) and "inputs" in data and "text" not in data:
            request.state.surface = "tgi"
            return await routes_tgi.answer(engine, request, parse(TGIRequest, data), as_list=False)
        body = parse(GenerateRequest, data)
        req = submit_generation(
            engine, request, body.text, body.generate_kwargs(), grammar=tgi_grammar(body.grammar, "grammar")
        )
        (completions,) = await result_or_disconnect(request, [req])
        headers = timing_headers([req])
        ignored = body.ignored_fields()
        if ignored:
            headers["x-ignored-fields"] = ignored_fields_header(ignored)
        out = GenerateResponse(
            text=[c.text for c in completions],
            num_generated_tokens=[len(c.token_ids) for c in completions],
            query_id=ids.take("generate"),
            total_time_taken=secs(time.perf_counter() - start),
        )
        return JSONResponse(out.model_dump(), headers=headers)

    @both("/tokenize", "POST", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """Token ids of each text, as the model sees them."""
        start = time.perf_counter()
        token_ids = engine.tokenize(body.text)
        return TokenizeResponse(
            token_ids=token_ids, query_id=ids.take("tokenize"), total_time_taken=msecs(time.perf_counter() - start)
        )

    @both("/forward", "POST", response_model=ForwardResponse, responses=ERRORS)
    async def forward(body: ForwardRequest) -> ForwardResponse:
        """Negative log-likelihood of each response given its conditioning text (mean over response tokens)."""
        start = time.perf_counter()
        nll = await engine.forward(body.conditioning_text, body.response)
        return ForwardResponse(
            nll=nll, query_id=ids.take("forward"), total_time_taken=secs(time.perf_counter() - start)
        )

    @both("/query_id", "GET", response_model=QueryIdResponse)
    async def query_id() -> QueryIdResponse:
        """How many requests each method has answered (the next query_id of each)."""
        return QueryIdResponse(
            generate_query_id=ids.next["generate"],
            tokenize_query_id=ids.next["tokenize"],
            forward_query_id=ids.next["forward"],
        )

    return router
