"""The FastAPI application factory. Everything it needs is passed in; nothing is read from the environment."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI

from bloom_server import __version__
from bloom_server.api import routes_bloom, routes_health
from bloom_server.api.errors import install_error_handlers
from bloom_server.api.middleware import BodySizeLimit, JSONByDefault
from bloom_server.engine.core import Engine
from bloom_server.settings import Settings


def create_app(
    engine: Engine,
    settings: Settings,
    model_name: str,
    on_startup: Callable[[], Awaitable[None] | None] | None = None,
    on_shutdown: Callable[[], Awaitable[None] | None] | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import asyncio

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
        description="BLOOM inference over HTTP. Limits: see each route's 422 answers and GET /info.",
        lifespan=lifespan,
        redirect_slashes=False,
    )
    install_error_handlers(app)
    app.include_router(routes_health.build_router(engine, model_name))
    app.include_router(routes_bloom.build_router(engine))
    app.add_middleware(JSONByDefault)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.engine = engine
    app.state.settings = settings
    return app
