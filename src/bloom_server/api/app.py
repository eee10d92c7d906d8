"""The FastAPI application factory. Everything it needs is passed in; nothing is read from the environment."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response

from bloom_server import __version__
from bloom_server.api import routes_bloom, routes_health, routes_info, routes_kserve, routes_openai, routes_tgi
from bloom_server.api.errors import install_error_handlers
from bloom_server.api.logs import apply_log_format
from bloom_server.api.metrics import Metrics
from bloom_server.api.middleware import ApiKeyAuth, Gateway
from bloom_server.errors import ConfigError
from bloom_server.frontend.chat import ChatTemplate
from bloom_server.frontend.core import Engine
from bloom_server.frontend.requests import Cancelled, DeadlineExceeded, GenRequest
from bloom_server.settings import Settings

DESCRIPTION = """BLOOM inference over HTTP.

Surfaces: the original server's routes (`/generate`, `/tokenize`, `/forward`, `/query_id`), Text Generation
Inference's (`/generate_stream`, `POST /`, TGI's body on `/generate`), OpenAI's (`/v1/completions`,
`/v1/chat/completions`, `/v1/models`), KServe's (`/v2/...`, `/v1/models/{name}:predict`), and `/info`, `/metrics`,
`/health`, `/ready`. Every limit (max input tokens, max new tokens, max batch size, queue bounds) is in `GET /info`;
a request past one gets a 4xx naming the field and the limit. With an API key configured, send
`Authorization: Bearer <key>` on every route but `/health`, `/ready`, `/v2/health/*` and `/metrics`.
"""


def create_app(
    engine: Engine,
    settings: Settings,
    model_name: str,
    on_startup: Callable[[], Awaitable[None] | None] | None = None,
    on_shutdown: Callable[[], Awaitable[None] | None] | None = None,
) -> FastAPI:
    metrics = Metrics()
    _wire_metrics(engine, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import asyncio

        apply_log_format(settings.log_format)
        engine.bind_loop(asyncio.get_running_loop())
        if on_startup:
            res = on_startup()
            if res is not None:
                await res
        yield
        if engine.batcher is not None:
            await engine.batcher.stop()
        if on_shutdown:
            res = on_shutdown()
            if res is not None:
                await res

    app = FastAPI(
        title="bloom-server",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url=None,  # served by _docs_router from local assets, not a CDN
        redoc_url=None,
    )
    install_error_handlers(app)
    chat = _chat_template_loader(engine, settings)
    bloom = routes_bloom.build_router(engine)
    documented = [  # the order of the OpenAPI document (and /docs)
        _playground_router(engine),
        routes_health.build_router(engine),
        routes_info.build_router(engine, settings, model_name, metrics, chat),
        bloom,
        routes_tgi.build_router(engine),
        routes_openai.build_router(engine, model_name, chat, settings.model_alias_names),
        routes_kserve.build_router(engine, model_name),
    ]
    # Matched in this order: the original server's routes first. Every router ahead of a request's own costs route
    # matching on each request; none of their paths is another router's, so no request is routed differently.
    for router in [bloom] + [r for r in documented if r is not bloom]:
        app.include_router(router)
    app.state.documented_routers = documented
    _install_docs(app)
    _install_middleware(app, settings, metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    return app


def _install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Outermost the request context (id, access log, HTTP metrics), so 401s and 413s get an id, a log line and a
    count; then CORS and the API key where configured; then the body guard and JSON by default. Without CORS and a
    key these are one layer (Gateway): every layer costs CPU on every request."""
    if settings.api_key is None and not settings.cors_origins:
        app.add_middleware(
            Gateway, metrics=metrics, max_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s
        )
        return
    # Added innermost first.
    app.add_middleware(
        Gateway, context=False, max_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Request-Timeout"],
            expose_headers=[
                "x-request-id",
                "x-queue-time",
                "x-inference-time",
                "x-time-per-token",
                "x-prompt-tokens",
                "x-generated-tokens",
                "x-total-time",
                "Retry-After",
            ],
        )
    app.add_middleware(Gateway, metrics=metrics, max_bytes=None, json_default=False)


def _wire_metrics(engine: Engine, metrics: Metrics) -> None:
    metrics.bind(
        queue_depth=lambda: engine.batcher.queue_depth if engine.batcher else 0,
        queue_tokens=lambda: engine.batcher.queued_tokens if engine.batcher else 0,
        running=lambda: engine.batcher.running_rows if engine.batcher else 0,
        ready=lambda: 1.0 if engine.ready else 0.0,
        load_seconds=lambda: engine.load_seconds or 0.0,
        engine_stats=engine.engine_stats,
    )

    def done(req: GenRequest, exc: BaseException | None) -> None:
        outcome = (
            "ok"
            if exc is None
            else (
                "cancelled"
                if isinstance(exc, Cancelled)
                else "deadline"
                if isinstance(exc, DeadlineExceeded)
                else "error"
            )
        )
        ttft = (req.first_token - req.enqueued) if req.first_token is not None else None
        metrics.observe_generation(
            outcome=outcome,
            queue_s=req.queue_time if req.started is not None else None,
            ttft_s=ttft,
            ttft_steps=req.ttft_steps,
            inference_s=req.inference_time if req.started is not None else None,
            prompt_tokens=req.prompt_tokens,
            generated_tokens=req.generated_tokens,
        )

    engine.on_request_done = done
    engine.on_batch = lambda batch, seconds: metrics.observe_batch(len(batch.input_ids))


def _chat_template_loader(engine: Engine, settings: Settings) -> Callable[[], ChatTemplate | None]:
    cache: dict[str, Any] = {}

    def load() -> ChatTemplate | None:
        if "t" not in cache:
            if engine.info is None and not settings.chat_template:
                return None
            try:
                cache["t"] = ChatTemplate.load(engine.info.model_dir if engine.info else None, settings.chat_template)
            except Exception as exc:  # noqa: BLE001 - the operator's template: say so, not a bare 500
                raise ConfigError(f"the chat template cannot be loaded: {type(exc).__name__}: {exc}") from None
        return cache["t"]

    return load


DOCS_ASSETS = "/static/docs"


def _install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their JavaScript and CSS served from the app: the pages work without
    internet. The assets come from the fastapi-offline package (a runtime dependency), not copies in this tree."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.staticfiles import StaticFiles

    assets = resources.files("fastapi_offline").joinpath("static")
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")
    page: dict[str, Any] = {"openapi_url": "/openapi.json", "title": f"{app.title} - API docs"}

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            **page,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
            # Swagger UI's default validator is an online service: off, the page makes no request elsewhere.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            **page,
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def wants_html(accept: str) -> bool:
    """Whether an Accept header asks for a page: browsers list text/html; API clients send */*, JSON, or none."""
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media.strip().lower() in ("text/html", "application/xhtml+xml") and q > 0:
            return True
    return False


def _playground_router(engine: Engine):
    from fastapi import APIRouter

    router = APIRouter(tags=["playground"])
    page: dict[str, str] = {}

    def html() -> str:
        if "html" not in page:
            page["html"] = resources.files("bloom_server").joinpath("static/playground.html").read_text("utf-8")
        return page["html"]

    @router.get(
        "/",
        response_class=HTMLResponse,
        responses={
            200: {
                "content": {"application/json": {"example": {"status": "alive"}}},
                "description": "The playground page when the Accept header lists text/html (a browser); "
                'otherwise KServe v1\'s liveness, `{"status": "alive"}`',
            },
            500: {"content": {"application/json": {"example": {"status": "dead"}}}, "description": "The engine died"},
        },
    )
    async def root(request: Request) -> Response:
        """A browser (Accept: text/html) gets the playground; an API client gets KServe v1's liveness answer, as
        KServe's own model server gives it (the KServe SDK's v1 `is_server_live()` reads it)."""
        # The answer depends on Accept: caches must keep the two apart.
        vary = {"Vary": "Accept"}
        if wants_html(request.headers.get("accept", "")):
            return HTMLResponse(html(), headers=vary)
        if engine.alive:
            return JSONResponse({"status": "alive"}, headers=vary)
        return JSONResponse({"status": "dead"}, status_code=500, headers=vary)

    @router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def playground_ui() -> HTMLResponse:
        return HTMLResponse(html())

    return router


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus the bodies of routes that parse two shapes by hand (their $refs point here)."""
    if app.openapi_schema:
        return app.openapi_schema
    rank = {id(r): i for i, r in enumerate(getattr(app.state, "documented_routers", []))}
    routes = sorted(app.routes, key=lambda r: rank.get(id(getattr(r, "original_router", None)), -1))
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    models: list[Any] = [*routes_bloom.OPENAPI_MODELS, *routes_kserve.OPENAPI_MODELS]
    for model in models:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in js.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components.setdefault(model.__name__, js)
    app.openapi_schema = schema
    return schema
