"""The load's one disk reader (`Prefetcher`): this rank's weight bytes into the page cache, in file order, from process
start (while Python imports torch and CUDA initialises) to the last byte; the loader (fast/weights.py) follows it chunk
by chunk and copies from memory, or reads by itself where there is no prefetcher or it failed. `ReadThrottle`: an
honest rate limit on reads, for tests that must watch a load in progress (BLOOM_LOAD_THROTTLE_MBPS); off by default.
Standard library only, so the composition root can start reading before torch is imported."""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
import platform
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloom_server.errors import ModelDirError
from bloom_server.storage.safetensors import Chunk, plan_chunks, read_header, weights_source

if TYPE_CHECKING:
    from bloom_server.progress import LoadProgress

log = logging.getLogger(__name__)


# ioprio_set / ioprio_get syscall numbers (Linux; the others have none), and the idle class: its reads go to the disk
# only when no other reads of normal priority wait (the import's page faults, during a cold start).
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}
IOPRIO_CLASS_IDLE = 3
_IOPRIO_WHO_PROCESS = 1  # with id 0: the calling thread


def _ioprio_syscall(get: bool, value: int = 0) -> int:
    nums = _IOPRIO_SYSCALLS.get(platform.machine()) if platform.system() == "Linux" else None
    if nums is None:
        return -1
    libc = ctypes.CDLL(None, use_errno=True)
    if get:
        return int(libc.syscall(nums[1], _IOPRIO_WHO_PROCESS, 0))
    return int(libc.syscall(nums[0], _IOPRIO_WHO_PROCESS, 0, value))


def idle_io_priority() -> bool:
    """The calling thread's reads take the idle I/O class (Linux; where the disk's scheduler honours classes). False
    where it cannot be set."""
    return _ioprio_syscall(False, IOPRIO_CLASS_IDLE << 13) == 0


def io_priority_class() -> int | None:
    """The calling thread's I/O class (0: none set, 1 real time, 2 best effort, 3 idle), or None where unknown."""
    got = _ioprio_syscall(True)
    return None if got < 0 else got >> 13


class ReadThrottle:
    """At most `mbps` MB/s over all the threads that share it (a token bucket without burst). For tests and for
    rehearsing a slow volume; never on by default."""

    def __init__(self, mbps: float):
        if mbps <= 0:
            raise ValueError("throttle must be positive")
        self.rate = mbps * 1e6
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._sent = 0

    def wait(self, nbytes: int) -> None:
        with self._lock:
            self._sent += nbytes
            due = self._t0 + self._sent / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


# ------------------------------------------------------------------------------------------------------ prefetch


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Prefetcher:
    """The one disk reader of a load: reads `chunks` of `paths` in file order into a small throw-away buffer, from
    process start (before torch is imported) to the last byte, so that the page cache holds each chunk when the
    loader comes for it. `threads` reads in flight (the load setting's default: eight, docs/results/cold-start.md).

    The loader (fast/weights.py `read_safetensors`) asks, for each of its chunks, `need(path, end)`: how many of
    this plan's chunks must be read before that chunk's bytes are all in memory; `wait_for(k)` blocks until they are
    (True), or returns False at once when the prefetcher is no longer reading (finished short, failed, closed, or
    its threads gone): the loader then reads from the disk itself, so a failed prefetch never hangs a load. Each
    `wait_for` also tells the prefetcher how far the loader has got: the prefetcher never stops because the loader
    caught up, it only pauses while it is more than `budget` bytes ahead of the loader (half the available memory by
    default: pages read too far ahead could be evicted before use) and resumes when the loader advances.

    Counters (under the lock; `stats()`): read_bytes, pauses (times a reader waited at the budget), loader_waits and
    loader_wait_s (the loader waiting for bytes not read yet), frontier (chunks read, in order). Never raises: a read
    error ends the prefetch (logged) and the loader reads the rest itself."""

    # No posix_fadvise(WILLNEED) look-ahead past the chunk being read: it slowed the loader (docs/results/removed.md).

    def __init__(self, paths: Sequence[Path], chunks: Sequence[Chunk], *, threads: int = 1,
                 progress: LoadProgress | None = None, throttle: ReadThrottle | None = None,
                 budget: int | None = None, idle_io: bool = False):  # fmt: skip
        self.paths = [Path(p) for p in paths]
        self.idle_io = idle_io  # the readers' I/O in the idle class (load_prefetch_io)
        self.io_classes: list[int | None] = []  # each reader's I/O class once it runs
        self.chunks = list(chunks)
        self.threads = max(1, threads)
        self.progress = progress
        self.throttle = throttle
        longest = max((c.length for c in self.chunks), default=0)
        avail = mem_available()
        budget = budget if budget is not None else (avail // 2 if avail else 1 << 62)
        self.budget = max(int(budget), longest)  # at least one chunk ahead, whatever the memory
        self._cum = [0]
        for c in self.chunks:
            self._cum.append(self._cum[-1] + c.length)
        self._keys = [(c.file, c.offset) for c in self.chunks]
        self._index = {os.path.realpath(p): i for i, p in enumerate(self.paths)}
        self._cv = threading.Condition()
        self._next = 0  # next chunk to hand to a reader thread
        self._done = [False] * len(self.chunks)
        self.frontier = 0  # chunks [0, frontier) are read
        self.demand = 0  # the loader has asked for chunks [0, demand)
        self.state = "new"  # new, running, finished, failed, closed
        self.error: str | None = None
        self.read_bytes = 0
        self.pauses = 0
        self.loader_waits = 0
        self.loader_wait_s = 0.0
        self._paused = 0
        self._alive = 0
        self._started = False
        self._workers: list[threading.Thread] = []

    # ---- the reader threads

    def start(self) -> Prefetcher:
        with self._cv:
            self.state = "running" if self.chunks else "finished"
        for i in range(min(self.threads, len(self.chunks))):
            t = threading.Thread(target=self._run, name=f"bloom-prefetch-{i}", daemon=True)
            with self._cv:
                self._alive += 1
            t.start()
            self._workers.append(t)
        self._started = True  # from now on, no live reader thread means none will read any more
        return self

    def join(self, timeout: float | None = None) -> None:
        for t in self._workers:
            t.join(timeout)

    def close(self) -> None:
        """Stop reading (the readers finish their current chunk); waiting loaders return False."""
        with self._cv:
            stopped = self.state in ("new", "running")
            if stopped:
                self.state = "closed"
            self._cv.notify_all()

    def advance(self, k: int) -> None:
        """The loader has asked for chunks [0, k): a reader paused at the budget may go on."""
        with self._cv:
            self._raise_demand(k)

    def _raise_demand(self, k: int) -> None:  # under the lock
        if k > self.demand:
            self.demand = k
            self._cv.notify_all()

    def _take(self) -> int | None:
        with self._cv:
            paused = False
            while True:
                if self.state != "running" or self._next >= len(self.chunks):
                    return None
                i = self._next
                base = min(self.demand, i)  # chunks before the loader's point are being consumed
                if i < self.demand or self._cum[i + 1] - self._cum[base] <= self.budget:
                    break
                if not paused:
                    paused = True
                    self.pauses += 1
                    self._paused += 1
                self._cv.wait()
            if paused:
                self._paused -= 1
            self._next += 1
            return i

    def _complete(self, i: int) -> None:
        with self._cv:
            self._done[i] = True
            self.read_bytes += self.chunks[i].length
            while self.frontier < len(self.chunks) and self._done[self.frontier]:
                self.frontier += 1
            if self.frontier == len(self.chunks) and self.state == "running":
                self.state = "finished"  # every byte read (its threads exit on their own)
                if self.progress is not None:
                    self.progress.note_since_start("prefetch finished")
            self._cv.notify_all()

    def _run(self) -> None:
        fds: dict[int, int] = {}
        # One preadv per chunk (32 MiB by default): every return from a read needs the GIL back, which the main
        # thread holds for long stretches while it imports torch; few large reads keep the disk busy through that.
        buf = bytearray(max((c.length for c in self.chunks), default=0) or 1)
        view = memoryview(buf)
        if self.idle_io and not idle_io_priority():
            log.info("prefetch: the idle I/O class could not be set; reading at normal priority")
        with self._cv:
            self.io_classes.append(io_priority_class())
        try:
            while (i := self._take()) is not None:
                c = self.chunks[i]
                if c.file not in fds:
                    fds[c.file] = os.open(self.paths[c.file], os.O_RDONLY)
                    try:
                        os.posix_fadvise(fds[c.file], 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    except (AttributeError, OSError):
                        pass
                got = 0
                while got < c.length:
                    n = os.preadv(fds[c.file], [view[got : c.length]], c.offset + got)
                    if n <= 0:
                        raise OSError(f"{self.paths[c.file]}: unexpected end of file at byte {c.offset + got}")
                    got += n
                if self.throttle is not None:
                    self.throttle.wait(got)
                if self.progress is not None:
                    self.progress.add_prefetched(c.wanted_bytes)
                self._complete(i)
        except BaseException as e:  # noqa: BLE001 - the loader reads what is missing itself
            with self._cv:
                if self.state == "running":
                    self.state, self.error = "failed", str(e) or type(e).__name__
                self._cv.notify_all()
            log.warning("prefetch stopped: %s (the loader reads the rest from disk itself)", e)
        finally:
            for fd in fds.values():
                os.close(fd)
            with self._cv:
                self._alive -= 1
                if self._alive == 0 and self.state == "running":
                    self.state = "finished"
                self._cv.notify_all()

    # ---- the loader's side

    def need(self, path: str | os.PathLike, end: int) -> int | None:
        """Chunks of this plan that must be read before bytes [.., end) of `path` are in memory (every chunk of the
        plan that starts before `end` in that file, and every chunk of the files before it); None when `path` is not
        one of this prefetcher's files."""
        fi = self._index.get(os.path.realpath(path))
        if fi is None:
            return None
        return bisect.bisect_left(self._keys, (fi, end))

    def wait_for(self, k: int, timeout: float | None = None) -> bool:
        """Block until chunks [0, k) are read: True. False when they will not be (the prefetcher finished short,
        failed, was closed, or its threads are gone) or at `timeout`: the caller reads from disk itself."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._raise_demand(k)  # a reader paused at the budget may go on
            if self.frontier >= k:
                return True
            self.loader_waits += 1
            t = time.monotonic()
            try:
                while self.frontier < k:
                    if self.state != "running":
                        return False
                    if self._started and not any(w.is_alive() for w in self._workers):  # gone without a word
                        self.state = "failed" if self.error else "finished"
                        return False
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cv.wait(0.5 if left is None else min(0.5, left))
                return True
            finally:
                self.loader_wait_s += time.monotonic() - t

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {"state": self.state, "read_bytes": self.read_bytes, "frontier": self.frontier,
                    "chunks": len(self.chunks), "demand": self.demand, "pauses": self.pauses,
                    "paused": self._paused, "loader_waits": self.loader_waits,
                    "loader_wait_s": self.loader_wait_s, "error": self.error}  # fmt: skip


def start_prefetch(model_dir: Path, *, rank: int, world: int, threads: int, chunk_bytes: int,
                   progress: LoadProgress, throttle: ReadThrottle | None = None,
                   budget: int | None = None, idle_io: bool = False) -> Prefetcher | None:  # fmt: skip
    """Start reading this rank's weight bytes for the fast backend (`progress.prefetcher` is then the Prefetcher,
    which the loader follows), or None when there is nothing to read ahead (several ranks slicing a plain
    checkpoint, pickles, or anything unexpected: the loader will say what)."""
    try:
        src = weights_source(model_dir, rank, world)
        if src.kind not in ("presharded", "whole"):
            return None
        headers = [read_header(p) for p in src.files]
        wanted = [(fi, t) for fi, h in enumerate(headers) for t in h.tensors
                  if not t.name.endswith("lm_head.weight")]  # fmt: skip
        chunks = plan_chunks(wanted, chunk_bytes)
    except (ModelDirError, OSError) as e:
        log.debug("no prefetch: %s", e)
        return None
    p = Prefetcher(
        list(src.files), chunks, threads=threads, progress=progress, throttle=throttle, budget=budget, idle_io=idle_io
    )
    progress.prefetcher = p
    progress.set_phase("prefetching")
    progress.note_since_start("prefetch started")
    p.start()
    return p
