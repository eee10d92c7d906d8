"""What a load has done so far (phase, bytes loaded of the total, named timings): written by the loader on any
thread, read by /ready, /info and /metrics. Standard library only."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bloom_server.storage.prefetch import Prefetcher

log = logging.getLogger(__name__)


class LoadProgress:
    """Load progress of this rank, written by the loader (any thread), read by the API. Phases, in order:
    starting, prefetching (bytes into the page cache before torch is up), reading weights, allocating cache,
    compiling kernels (fast backend on a GPU, only when the kernels compiled during the read are not done when the
    weights are), warming up (the first generate: CUDA graph capture), ready. `timings`: named seconds (or counts)
    of pieces inside the phases (the kernels done ahead, the warm-up generate), for /ready and the log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.t0 = time.monotonic()
        self.phase = "starting"
        self.phases: list[tuple[str, float]] = [("starting", 0.0)]
        self.loaded_bytes = 0  # bytes placed in their final tensors
        self.total_bytes = 0  # bytes this rank's weights take on disk (0 until known)
        self.prefetched_bytes = 0  # bytes read ahead into the page cache
        self.loading_started = threading.Event()  # the real load began ("reading weights")
        self.prefetcher: Prefetcher | None = None  # the disk reader the loader follows (start_prefetch)
        self.timings: dict[str, float] = {}

    def set_phase(self, name: str) -> None:
        with self._lock:
            if name != self.phase:
                self.phase = name
                self.phases.append((name, time.monotonic() - self.t0))
        if name == "reading weights":
            self.loading_started.set()
        log.info("load phase: %s", name)

    def set_total(self, nbytes: int) -> None:
        with self._lock:
            self.total_bytes = int(nbytes)

    def note(self, name: str, value: float) -> None:
        """A named duration (seconds) or count inside the phases (reported with them)."""
        with self._lock:
            self.timings[name] = float(value)
        log.debug("load timing: %s = %.3f", name, value)

    def note_since_start(self, what: str) -> None:
        """`what`, seconds after this process started, among the timings: where a cold start's seconds went."""
        at = since_process_start()
        if at is not None:
            self.note(f"{what}, s after process start", at)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.loaded_bytes += int(nbytes)

    def add_prefetched(self, nbytes: int) -> None:
        with self._lock:
            self.prefetched_bytes += int(nbytes)

    def durations(self) -> list[tuple[str, float, float]]:
        """(phase, start s, seconds) for each phase so far (the current one up to now)."""
        with self._lock:
            marks = list(self.phases)
        now = time.monotonic() - self.t0
        return [(n, s, (marks[i + 1][1] if i + 1 < len(marks) else now) - s) for i, (n, s) in enumerate(marks)]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            loaded, total, pre, phase = self.loaded_bytes, self.total_bytes, self.prefetched_bytes, self.phase
            timings = dict(self.timings)
        return {
            "phase": phase,
            "loaded_bytes": loaded,
            "total_bytes": total,
            "percent": round(100.0 * loaded / total, 1) if total else None,
            "prefetched_bytes": pre,
            "elapsed_s": round(time.monotonic() - self.t0, 3),
            "phases": [{"phase": n, "start_s": round(s, 3), "seconds": round(d, 3)} for n, s, d in self.durations()],
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }

    def summary(self) -> str:
        parts = [f"{n} {d:.2f} s" for n, _, d in self.durations() if n not in ("ready",)]
        with self._lock:
            timings = dict(self.timings)
        inside = "; ".join(f"{k} {v:.2f}" for k, v in timings.items())
        sizes = f" (weights {self.loaded_bytes / 1e9:.2f} GB, prefetched {self.prefetched_bytes / 1e9:.2f} GB)"
        return "; ".join(parts) + sizes + (f"; inside: {inside}" if inside else "")


def since_process_start() -> float | None:
    """Seconds since this process was started (from /proc: 10 ms resolution), None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
