"""`bloom-server serve` on every rank: rank 0 opens the port at once and loads in the background; followers load,
then follow rank 0's steps. This module wires the layers together; it holds no logic of its own beyond that."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from bloom_server.errors import BloomServerError
from bloom_server.progress import LoadProgress
from bloom_server.settings import Settings
from bloom_server.storage.model_dir import ModelDir, resolve_model_dir
from bloom_server.types import ModelInfo, RankContext

if TYPE_CHECKING:
    from bloom_server.backends.base import Backend

log = logging.getLogger("bloom_server")


def resolve(settings: Settings) -> ModelDir:
    if settings.model is None:
        from bloom_server.storage.tiny import ensure_tiny_model, tiny_dir

        return resolve_model_dir(
            str(ensure_tiny_model(tiny_dir(settings.home))), model_id=settings.model_id or "bloom-tiny"
        )
    return resolve_model_dir(settings.model, model_id=settings.model_id,
                             trust_unverified_pickles=settings.trust_unverified_pickles)  # fmt: skip


def load_backend(settings: Settings, model_dir: ModelDir, ctx: RankContext, progress: LoadProgress | None = None,
                 early: Any = None) -> Backend:  # fmt: skip
    from bloom_server.backends import create_backend

    backend = create_backend(settings, model_dir, ctx)
    backend.progress = progress
    backend.early = early  # what the class's before_torch() started (the fast backend's load waits on it)
    backend.load()
    return backend


def serve(settings: Settings, local_rank_flag: int | None = None) -> int:
    from bloom_server.backends import backend_class
    from bloom_server.frontend.batching import batching_mode
    from bloom_server.runtime.distributed import launcher_ranks

    progress = LoadProgress()
    cls = backend_class(settings.backend)
    try:  # cheap checks first: refuse a bad setting or directory before opening the port
        batching_mode(settings.batching, cls.supports_continuous, settings.backend)
        model_dir = resolve(settings)
        rank, world, _ = launcher_ranks(local_rank_flag)
        cls.check(settings, model_dir, rank, world)
    except BloomServerError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    early = cls.before_torch(settings, model_dir, progress, local_rank_flag)  # before torch: rank_context imports it

    from bloom_server.runtime.distributed import rank_context

    ctx = rank_context(local_rank_flag)
    try:
        check_memory(settings, model_dir, ctx, cls)  # torch is imported now; nothing is allocated yet
    except BloomServerError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    progress.note_since_start("torch up")
    if ctx.rank != 0:
        return _follower(settings, model_dir, ctx, progress, early)
    return _leader(settings, model_dir, ctx, progress, early)


def check_memory(settings: Settings, model_dir: ModelDir, ctx: RankContext, cls: type[Backend]) -> None:
    """The weights the config describes against the memory of this rank's devices (ModelDirError if they cannot fit):
    a config that asks for more fails here, not after minutes of allocating."""
    if model_dir.sizes is None or settings.cpu_offload:
        return
    from bloom_server.storage import model_config

    dtype = settings.dtype if settings.dtype != "auto" else ("fp16" if ctx.device_type == "cuda" else "fp32")
    if ctx.device_type == "cuda":
        import torch

        total = torch.cuda.get_device_properties(ctx.local_rank).total_memory
        if cls.spills_over_devices and ctx.world_size == 1:  # every visible GPU, then the host
            gpus = torch.cuda.device_count()
            model_config.fits_memory(model_dir.path, model_dir.sizes, dtype, total * gpus + model_config.host_memory(),
                                     f"{gpus} GPU(s) and the host together")  # fmt: skip
        else:  # a whole copy per rank, or this rank's shard
            share = 1 if cls.whole_copy_per_rank else ctx.world_size
            model_config.fits_memory(
                model_dir.path, model_dir.sizes, dtype, total, f"GPU {ctx.local_rank}", share=share
            )
    else:  # every rank of a CPU run shares this host's memory
        model_config.fits_memory(model_dir.path, model_dir.sizes, dtype, model_config.host_memory(), "this host")


def _follower(settings: Settings, model_dir: ModelDir, ctx: RankContext, progress: LoadProgress, early: Any) -> int:
    from bloom_server.runtime.distributed import init_distributed, shutdown_distributed
    from bloom_server.runtime.lockstep import die, follow

    try:
        channel = init_distributed(ctx)
        backend = load_backend(settings, model_dir, ctx, progress, early)
    except BaseException as exc:
        log.exception("rank %d failed to load", ctx.rank)
        die(f"rank {ctx.rank} failed to load: {exc}")
    assert channel is not None
    channel.start_watchdog(die)
    log.info("rank %d: loaded, following rank 0; load phases: %s", ctx.rank, progress.summary())
    code = follow(backend, channel, settings.drain_timeout_s)
    if code == 0:
        shutdown_distributed()
    # Exit without waiting on threads that may be stuck in a collective with a dead peer.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leader(settings: Settings, model_dir: ModelDir, ctx: RankContext, progress: LoadProgress, early: Any) -> int:
    import uvicorn

    from bloom_server.api.app import create_app
    from bloom_server.api.connections import connection_limits, guarded_protocol
    from bloom_server.frontend.core import Engine
    from bloom_server.runtime.distributed import shutdown_distributed
    from bloom_server.runtime.lockstep import die

    engine = Engine(settings)
    engine.load_progress = progress  # read by /ready, /info, /metrics
    holder: dict = {}

    def boot() -> None:
        from bloom_server.frontend.tokenizer import TextTokenizer
        from bloom_server.runtime.distributed import init_distributed
        from bloom_server.runtime.lockstep import Leader

        start = time.perf_counter()
        try:
            engine.state_detail = "initialising process groups"
            channel = init_distributed(ctx)
            if channel is not None:
                # Once the leader exists it answers the callers in flight before the process goes.
                channel.start_watchdog(
                    lambda reason: holder["leader"].abort(reason) if "leader" in holder else die(reason)
                )
            engine.state_detail = f"loading {model_dir.path} ({settings.backend})"
            backend = load_backend(settings, model_dir, ctx, progress, early)
            tokenizer = TextTokenizer(model_dir.path)
            leader = Leader(backend, channel, heartbeat_s=settings.heartbeat_s).start()
            holder["leader"] = leader
            described = backend.describe()
            info = ModelInfo(
                model_id=model_dir.model_id,
                model_dir=str(model_dir.path),
                backend=settings.backend,
                dtype=str(described.get("dtype", settings.dtype)),
                world_size=ctx.world_size,
                revision=model_dir.revision,
                max_total_tokens=settings.total_tokens_limit,
                extra=described,
            )
            engine.attach(leader, tokenizer, info)
            engine.load_seconds = time.perf_counter() - start
            progress.set_phase("warming up")  # the first generate (on GPUs it captures its CUDA graph)
            with warmup_report(backend, progress):
                engine.warmup()
            leader.allow_idle_work()  # e.g. the fast engine's decode graphs, captured while no request runs
            progress.set_phase("ready")
            log.info("ready: %s loaded in %.1f s (%d rank(s)); load phases: %s", model_dir.model_id,
                     engine.load_seconds, ctx.world_size, progress.summary())  # fmt: skip
        except BaseException as exc:  # a failed load is fatal, with the reason in the log
            engine.fail(f"load failed: {exc}")
            log.exception("load failed")
            die(f"load failed: {type(exc).__name__}: {exc}")

    def start_loading() -> None:
        threading.Thread(target=boot, name="bloom-boot", daemon=True).start()

    def stop() -> None:
        leader = holder.get("leader")
        if leader is not None:
            leader.stop()

    app = create_app(engine, settings, model_dir.model_id, on_startup=start_loading, on_shutdown=stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]  # uvicorn takes a float fine
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works
        http=guarded_protocol(connection_limits(settings)),
    )
    server = make_server(
        config, on_signal=engine.drain, idle=lambda: engine.idle, drain_timeout_s=settings.drain_timeout_s
    )
    server.run()
    shutdown_distributed()
    if engine.runner is not None and engine.runner.dead:
        return 1
    return 0 if server.started else 1


@contextlib.contextmanager
def warmup_report(backend: Backend, progress: LoadProgress) -> Iterator[None]:
    """Around the warm-up generate: its seconds (progress.timings, /ready's progress), the backend's graph-capture
    times at info for its duration (its warmup_loggers log them at debug), and whether the warm-up still compiled or
    autotuned kernels (it should not: they were done during the weight read)."""
    before = backend.kernel_counts()
    loggers = [logging.getLogger(name) for name in backend.warmup_loggers]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if log.isEnabledFor(logging.INFO) and not lg.isEnabledFor(logging.DEBUG):
            lg.setLevel(logging.DEBUG)
    t = time.perf_counter()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        took = time.perf_counter() - t
        progress.note("warm-up generate", took)
        extra = ""
        after = backend.kernel_counts() if before is not None else None
        if before is not None and after is not None:
            new = {k: after[k] - before[k] for k in after}
            progress.note("warm-up kernel compiles", new["compiled"])
            progress.note("warm-up kernel autotunes", new["tuned"])
            extra = f"; Triton during the warm-up: {new['compiled']} variant(s) compiled or loaded, " \
                    f"{new['tuned']} GEMV key(s) autotuned (0 and 0: all done ahead)"  # fmt: skip
        log.info("warm-up generate: %.2f s%s", took, extra)


def make_server(config, on_signal, idle=None, drain_timeout_s: float = 0.0):
    """uvicorn's server, with SIGTERM/SIGINT as the normal way to stop: readiness turns false at once, in-flight
    requests finish (up to the drain timeout), and the process exits 0 instead of re-raising the signal.

    With `idle` given, the port stays open while requests are in flight, so that callers that still reach the pod
    (endpoints are removed with a delay) get a clear 503 instead of a refused connection; once idle (or at the drain
    timeout) uvicorn shuts down. A second signal stops at once."""
    import uvicorn

    class Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame):
            on_signal()
            if idle is None or self.draining or idle():
                super().handle_exit(sig, frame)
                self._captured_signals.clear()
                return
            self.draining = True
            threading.Thread(target=self._drain, name="bloom-drain", daemon=True).start()

        def _drain(self) -> None:
            deadline = time.monotonic() + drain_timeout_s
            while time.monotonic() < deadline and not idle():
                time.sleep(0.05)
            # What is left of the drain timeout is uvicorn's own grace for the connections still open.
            self.config.timeout_graceful_shutdown = max(1.0, deadline - time.monotonic())  # type: ignore[assignment]  # a float works
            self.should_exit = True

    return Server(config)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
