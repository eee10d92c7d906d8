"""The fast backend's work before torch is imported (`FastBackend.before_torch`): the weights start flowing from the
disk into the page cache (for the builtin read path), and the decode kernels start compiling in child processes,
while this process imports torch and CUDA initialises (seconds that would otherwise pass with the disk and the CPUs
idle). Torch-free."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from bloom_server.runtime.distributed import launcher_ranks

if TYPE_CHECKING:
    from bloom_server.progress import LoadProgress
    from bloom_server.settings import Settings
    from bloom_server.storage.model_dir import ModelDir

log = logging.getLogger(__name__)


def start_prefetch(settings: Settings, model_dir: ModelDir, progress: LoadProgress) -> None:
    """One sequential stream of this rank's weights to the last byte, which the builtin loader follows
    (storage/prefetch.py); none where a field loader will read the weights."""
    if not settings.load_prefetch:
        return
    from bloom_server.backends.fast_loader import planned
    from bloom_server.storage.prefetch import ReadThrottle
    from bloom_server.storage.prefetch import start_prefetch as start

    rank, world, _ = launcher_ranks()
    loader = planned(settings, model_dir, rank, world)
    if loader != "builtin":
        # Not started: a field loader read no faster with every page prefetched than from a cold disk, and the
        # prefetch held the disk while torch was imported, delaying the library's start (docs/results/cold-start.md).
        log.info("no prefetch: the %s loader reads the weights itself once torch is up", loader)
        return
    throttle = ReadThrottle(settings.load_throttle_mbps) if settings.load_throttle_mbps else None
    start(model_dir.path, rank=rank, world=world, threads=settings.load_prefetch_threads,
          chunk_bytes=max(4096, int(settings.load_chunk_mb * 2**20)), progress=progress, throttle=throttle,
          idle_io=settings.load_prefetch_io == "idle")  # fmt: skip


def start_kernel_compile(settings: Settings, model_dir: ModelDir, local_rank_flag: int | None = None,
                         progress: LoadProgress | None = None) -> Any:  # fmt: skip
    """The decode kernels compile now, in child processes, into Triton's cache (BLOOM_KERNEL_CACHE_DIR), after the
    cache is seeded from kernels compiled ahead of time (BLOOM_KERNEL_CACHE_SEED, else MODEL/.bloom-kernel-cache).
    None where there is nothing to compile (no GPU or Triton, fp32, BLOOM_FAST_PRECOMPILE=0)."""
    from bloom_server.fast.coldstart.precompile import (
        apply_kernel_cache_dir,
        seed_dir,
        seed_kernel_cache,
        start_compile_workers,
        triton_cache_dir,
    )

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
    _, world, local = launcher_ranks(local_rank_flag)
    try:
        return start_compile_workers(settings, model_dir.path, world=world, local_rank=local, seed=seed)
    except Exception:  # ahead-of-time work only: the load compiles what is missing
        log.warning("kernel compile workers not started", exc_info=True)
        return None


def before_torch(settings: Settings, model_dir: ModelDir, progress: LoadProgress, local_rank_flag: int | None) -> Any:
    """The prefetch first (the disk is the long pole), then the compile workers; returns the workers, which the load
    waits on."""
    start_prefetch(settings, model_dir, progress)
    return start_kernel_compile(settings, model_dir, local_rank_flag, progress)
