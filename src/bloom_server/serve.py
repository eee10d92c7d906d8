"""`bloom-server serve` on every rank: rank 0 opens the port at once and loads in the background; followers load,
then follow rank 0's steps. This module wires the layers together; it holds no logic of its own beyond that."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

from bloom_server.errors import BloomServerError
from bloom_server.progress import LoadProgress
from bloom_server.storage.model_dir import ModelDir, resolve_model_dir
from bloom_server.settings import Settings
from bloom_server.types import ModelInfo, RankContext

log = logging.getLogger("bloom_server")


def resolve(settings: Settings) -> ModelDir:
    if settings.model is None:
        from bloom_server.storage.tiny import ensure_tiny_model

        return resolve_model_dir(str(ensure_tiny_model()), model_id=settings.model_id or "bloom-tiny")
    return resolve_model_dir(settings.model, model_id=settings.model_id,
                             trust_unverified_pickles=settings.trust_unverified_pickles)  # fmt: skip


def load_backend(settings: Settings, model_dir: ModelDir, ctx: RankContext, progress: LoadProgress | None = None,
                 kernel_workers=None):  # fmt: skip
    from bloom_server.backends import create_backend

    backend = create_backend(settings, model_dir, ctx)
    backend.progress = progress
    backend.kernel_workers = kernel_workers  # the fast backend's load waits on them (fast/coldstart/precompile.py)
    backend.load()
    return backend


def start_kernel_compile(settings: Settings, model_dir: ModelDir, local_rank_flag: int | None = None,
                         progress: LoadProgress | None = None):  # fmt: skip
    """The fast backend's decode kernels start compiling now, in child processes, into Triton's cache (the
    BLOOM_KERNEL_CACHE_DIR setting), while this process imports torch and reads weights (fast/coldstart/precompile.py). First
    the cache is seeded from kernels compiled ahead of time (BLOOM_KERNEL_CACHE_SEED, else MODEL/.bloom-kernel-cache).
    None where there is nothing to compile (other backends, no GPU or Triton, fp32, BLOOM_FAST_PRECOMPILE=0)."""
    if settings.backend != "fast":
        return None
    from bloom_server.fast.coldstart.precompile import (apply_kernel_cache_dir, seed_dir, seed_kernel_cache,
                                              start_compile_workers, triton_cache_dir)  # fmt: skip

    apply_kernel_cache_dir(settings.kernel_cache_dir)
    seed = seed_dir(settings.kernel_cache_seed, model_dir.path)
    if seed is not None:  # kernels compiled ahead of time (`bloom-server precompile`): a first start finds them
        got = seed_kernel_cache(seed, triton_cache_dir())
        if progress is not None:
            progress.note("kernel cache seed: entries copied", got["copied"])
            progress.note("kernel cache seed: entries already there", got["present"])
            progress.note("kernel cache seed, s", got["seconds"])
        log.info("kernel cache seeded from %s: %d entries copied (%.1f MB), %d already there, %d failed, %.2f s",
                 seed, got["copied"], got["bytes"] / 1e6, got["present"], got["failed"], got["seconds"])  # fmt: skip
    local = local_rank_flag if local_rank_flag is not None else int(os.environ.get("LOCAL_RANK", "0") or 0)
    try:
        return start_compile_workers(settings, model_dir.path, world=int(os.environ.get("WORLD_SIZE", "1") or 1),
                                     local_rank=local, seed=seed)  # fmt: skip
    except Exception:  # noqa: BLE001 - ahead-of-time work only: the load compiles what is missing
        log.warning("kernel compile workers not started", exc_info=True)
        return None


def start_prefetch(settings: Settings, model_dir: ModelDir, progress: LoadProgress) -> None:
    """The fast backend's weights start flowing from disk into the page cache now, before torch is imported and
    CUDA initialised (seconds that would otherwise pass with the disk idle): one sequential stream to the last byte,
    which the loader follows (storage/prefetch.py)."""
    if settings.backend != "fast" or not settings.load_prefetch:
        return
    from bloom_server.storage.prefetch import ReadThrottle, start_prefetch as start

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    throttle = ReadThrottle(settings.load_throttle_mbps) if settings.load_throttle_mbps else None
    start(model_dir.path, rank=rank, world=world, threads=settings.load_prefetch_threads,
          chunk_bytes=max(4096, int(settings.load_chunk_mb * 2**20)), progress=progress,
          throttle=throttle)


def serve(settings: Settings, local_rank_flag: int | None = None) -> int:
    progress = LoadProgress()
    try:
        model_dir = resolve(settings)  # cheap checks first: refuse a bad directory before opening the port
    except BloomServerError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    start_prefetch(settings, model_dir, progress)  # before torch: rank_context imports it
    workers = start_kernel_compile(settings, model_dir, local_rank_flag, progress)

    from bloom_server.runtime.distributed import rank_context

    ctx = rank_context(local_rank_flag)
    try:
        check_memory(settings, model_dir, ctx)  # torch is imported now; nothing is allocated yet
    except BloomServerError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    if ctx.rank != 0:
        return _follower(settings, model_dir, ctx, progress, workers)
    return _leader(settings, model_dir, ctx, progress, workers)


def check_memory(settings: Settings, model_dir: ModelDir, ctx: RankContext) -> None:
    """The weights the config describes against the memory of this rank's devices (ModelDirError if they cannot fit):
    a config that asks for more fails here, not after minutes of allocating."""
    if model_dir.sizes is None or settings.cpu_offload:
        return
    from bloom_server.storage import model_config

    dtype = settings.dtype if settings.dtype != "auto" else ("fp16" if ctx.device_type == "cuda" else "fp32")
    if ctx.device_type == "cuda":
        import torch

        total = torch.cuda.get_device_properties(ctx.local_rank).total_memory
        if settings.backend == "hf" and ctx.world_size == 1:  # device_map="auto": every visible GPU, then the host
            gpus = torch.cuda.device_count()
            model_config.fits_memory(model_dir.path, model_dir.sizes, dtype, total * gpus + model_config.host_memory(),
                                     f"{gpus} GPU(s) and the host together")  # fmt: skip
        else:  # hf: a whole copy per rank; the other backends: this rank's shard
            share = 1 if settings.backend == "hf" else ctx.world_size
            model_config.fits_memory(model_dir.path, model_dir.sizes, dtype, total, f"GPU {ctx.local_rank}", share=share)
    else:  # every rank of a CPU run shares this host's memory
        model_config.fits_memory(model_dir.path, model_dir.sizes, dtype, model_config.host_memory(), "this host")


def _follower(settings: Settings, model_dir: ModelDir, ctx: RankContext, progress: LoadProgress,
              workers=None) -> int:  # fmt: skip
    from bloom_server.runtime.distributed import init_distributed, shutdown_distributed
    from bloom_server.runtime.lockstep import die, follow

    try:
        channel = init_distributed(ctx)
        backend = load_backend(settings, model_dir, ctx, progress, workers)
    except BaseException as exc:  # noqa: BLE001
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


def _leader(settings: Settings, model_dir: ModelDir, ctx: RankContext, progress: LoadProgress, workers=None) -> int:
    import uvicorn

    from bloom_server.api.app import create_app
    from bloom_server.api.connections import connection_limits, guarded_protocol
    from bloom_server.frontend.core import Engine
    from bloom_server.runtime.distributed import shutdown_distributed
    from bloom_server.runtime.lockstep import die

    engine = Engine(settings)
    engine.load_progress = progress  # type: ignore[attr-defined]  # read by /ready, /info, /metrics
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
                channel.start_watchdog(lambda reason: holder["leader"].abort(reason) if "leader" in holder else die(reason))
            engine.state_detail = f"loading {model_dir.path} ({settings.backend})"
            backend = load_backend(settings, model_dir, ctx, progress, workers)
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
            with warmup_report(settings, progress):
                engine.warmup()
            progress.set_phase("ready")
            log.info("ready: %s loaded in %.1f s (%d rank(s)); load phases: %s", model_dir.model_id,
                     engine.load_seconds, ctx.world_size, progress.summary())  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - a failed load is fatal, with the reason in the log
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
        timeout_graceful_shutdown=settings.drain_timeout_s,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # uvicorn takes a float fine
        http=guarded_protocol(connection_limits(settings)),
    )
    server = make_server(config, on_signal=engine.drain, idle=lambda: engine.idle, drain_timeout_s=settings.drain_timeout_s)
    server.run()
    shutdown_distributed()
    if engine.runner is not None and engine.runner.dead:
        return 1
    return 0 if server.started else 1


@contextlib.contextmanager
def warmup_report(settings: Settings, progress: LoadProgress):
    """Around the warm-up generate: its seconds (progress.timings, /ready's progress), the engine's graph-capture
    times at info for its duration (fast.engine logs them at debug), and, for the fast backend, whether the warm-up
    still compiled or autotuned Triton kernels (it should not: they were done during the weight read)."""
    counts = None
    if settings.backend == "fast":
        try:
            from bloom_server.fast import triton_kernels as tk

            counts = tk.kernel_counts if tk.HAVE_TRITON else None
        except Exception:  # noqa: BLE001
            counts = None
    before = counts() if counts else None
    engine_log = logging.getLogger("bloom_server.fast.engine")
    level = engine_log.level
    if log.isEnabledFor(logging.INFO) and not engine_log.isEnabledFor(logging.DEBUG):
        engine_log.setLevel(logging.DEBUG)
    t = time.perf_counter()
    try:
        yield
    finally:
        engine_log.setLevel(level)
        took = time.perf_counter() - t
        progress.note("warm-up generate", took)
        extra = ""
        if counts and before is not None:
            after = counts()
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

        def handle_exit(self, sig, frame):  # type: ignore[override]
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
            self.config.timeout_graceful_shutdown = max(1.0, deadline - time.monotonic())
            self.should_exit = True

    return Server(config)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

