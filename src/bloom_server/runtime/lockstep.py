"""One loop on every rank. Rank 0 (the Leader) broadcasts a step, then runs it; followers receive, then run the same.

Continuous batching: the Leader also runs "cstep" steps (rows join and leave a running batch, see
frontend/batching/continuous.py) from a source the engine attaches (`attach_continuous`). While the source has live rows or rows
waiting, the engine thread runs csteps back to back, taking the source's joins and leaves at each step boundary and
handing each step's result back to it (the source carries them to the event loop, coalesced); other queued steps
(forward, generate, noop) run between two csteps. When nothing is live it waits on its queue again (heartbeats).
Followers need nothing special: a cstep is one more kind of step.

Idle work: once the server is ready (`allow_idle_work`), while its queue is empty the Leader runs "idle" steps, each
one piece of the backend's `idle_work` (the fast engine captures one missing decode graph), until the backend says
none is left; any step queued meanwhile waits for at most that one piece. After real work it looks again.

Any exception inside a step, a disagreement between ranks, or a peer that disappears is fatal: the other ranks may
be blocked in a collective, so the process exits non-zero and Kubernetes restarts the pod.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import queue
import signal
import threading
from collections.abc import Callable
from typing import Any

from bloom_server.errors import EngineDead
from bloom_server.runtime.distributed import ControlChannel
from bloom_server.runtime.protocol import CSTEP, FORWARD, GENERATE, IDLE, NOOP, SHUTDOWN, Step

log = logging.getLogger(__name__)

_WAKE = object()  # queue marker: the continuous source has work


class ChannelStops:
    """Rank 0's decision to stop rows of a running generate call (their callers left), made the same on every rank:
    one broadcast of a [rows] uint8 tensor on the gloo control group per decoding step. Only for backends that take
    it (`supports_lockstep_stops`), on every rank alike, so the ranks stay in the same collectives."""

    def __init__(self, channel: ControlChannel):
        self.channel = channel

    def share(self, stops: list[bool]) -> list[bool]:
        import torch
        import torch.distributed as dist

        flags = torch.tensor(stops, dtype=torch.uint8)
        dist.broadcast(flags, src=0, group=self.channel.group)
        return [bool(x) for x in flags.tolist()]


def execute(backend: Any, step: Step, listener: Any = None, stops: ChannelStops | None = None) -> Any:
    """Run one step on this rank. `listener` (rank 0 only, never broadcast) receives each decoding step's tokens
    from backends that stream (`supports_streaming`); others deliver every token with their result. `stops` (every
    rank, when there are several) carries rank 0's row stops to backends that take them."""
    if step.kind == GENERATE:
        kwargs: dict[str, Any] = {}
        if listener is not None and getattr(backend, "supports_streaming", False):
            kwargs["listener"] = listener
        if stops is not None and getattr(backend, "supports_lockstep_stops", False):
            kwargs["stops"] = stops
        return backend.generate(step.payload, **kwargs)
    if step.kind == FORWARD:
        return backend.forward_nll(step.payload)
    if step.kind == CSTEP:  # rank 0 delivers the tokens: it alone computes their log-probabilities
        return backend.cstep(step.payload, rank0=listener is not None)
    if step.kind == IDLE:
        work = getattr(backend, "idle_work", None)
        return bool(work()) if work is not None else False
    return None


def agreed(result: Any) -> Any:
    """The part of a step's result that every rank must hold alike (a cstep's log-probabilities, computed on rank 0
    alone, are left out)."""
    view = getattr(result, "agreed", None)
    return view() if callable(view) else result


def die(reason: str, code: int = 1) -> None:
    """Leave now: other ranks may be stuck in a collective that will never complete."""
    log.critical("fatal: %s; exiting with %d", reason, code)
    for h in logging.getLogger().handlers:
        h.flush()
    os._exit(code)


class Leader:
    """Rank 0's single engine thread. `submit()` is thread-safe and returns a concurrent Future."""

    def __init__(
        self,
        backend: Any,
        channel: ControlChannel | None,
        heartbeat_s: float = 2.0,
        on_fatal: Callable[[str], None] = die,
        fatal_grace_s: float = 0.5,
    ):
        self.backend = backend
        self.channel = channel
        self.heartbeat_s = heartbeat_s
        self.on_fatal = on_fatal
        self.fatal_grace_s = fatal_grace_s
        self._queue: queue.Queue[tuple[Step, concurrent.futures.Future | None, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="bloom-engine", daemon=True)
        self.dead: str | None = None
        self._current: concurrent.futures.Future | None = None
        self._stops = ChannelStops(channel) if channel is not None else None
        self.supports_continuous = bool(getattr(backend, "supports_continuous", False))
        self._source: Any = None  # the engine's continuous batcher (take / deliver / fail)
        self._continuous = False  # the engine thread is running csteps back to back
        self._idle_allowed = False  # the server is ready and the backend has idle work to offer
        self._idle_work = False  # run idle steps while the queue is empty (the backend's last answer)

    def attach_continuous(self, source: Any) -> None:
        """The engine's continuous source: `take()` -> the next cstep's payload or None (nothing live or waiting),
        `deliver(payload, result)` after each cstep, `fail(exc)` when the engine dies. Engine thread only, except
        fail (also from the watchdog)."""
        self._source = source

    def allow_idle_work(self) -> None:
        """Thread-safe: from now on, an empty queue runs the backend's idle work (after the warm-up: it never delays
        readiness)."""
        self._idle_allowed = self._idle_work = callable(getattr(self.backend, "idle_work", None))
        self._queue.put(_WAKE)  # type: ignore[arg-type]  # out of a heartbeat's wait

    def wake(self) -> None:
        """Thread-safe: the source has rows to join (or leaves): start or keep running csteps."""
        self._queue.put(_WAKE)  # type: ignore[arg-type]

    def start(self) -> Leader:
        self._thread.start()
        return self

    def submit(self, kind: str, payload: Any = None, listener: Any = None) -> concurrent.futures.Future:
        """Queue a step. `listener` stays on rank 0: followers run the same step without it. A cstep queued here
        (not taken by the continuous loop) drains: it runs until its rows have finished (the payload's `drain`)."""
        if kind == CSTEP and getattr(payload, "drain", None) is False:
            payload = dataclasses.replace(payload, drain=True)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.dead:
            fut.set_exception(EngineDead(self.dead))
            return fut
        self._queue.put((Step(kind, payload), fut, listener))
        return fut

    def run(self, kind: str, payload: Any = None) -> Any:
        """submit() and wait: for callers on a plain thread (warm-up)."""
        return self.submit(kind, payload).result()

    def engine_stats(self) -> dict[str, Any]:
        """Rank 0's backend counters for /metrics (any thread: a read of plain values the engine thread updates)."""
        stats = getattr(self.backend, "engine_stats", None)
        return stats() if callable(stats) else {}

    def stop(self, timeout: float = 30.0) -> None:
        """Tell the followers to exit, then end the engine thread (after the steps already queued)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _broadcast(self, step: Step) -> None:
        if self.channel is not None:
            self.channel.broadcast(step)

    def _loop(self) -> None:
        while True:
            if self._continuous:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:  # no other step waits: the next cstep
                    if not self._cstep():
                        return
                    continue
            else:
                try:
                    item = self._queue.get_nowait() if self._idle_work else self._queue.get(timeout=self.heartbeat_s)
                except queue.Empty:
                    item = (Step(IDLE if self._idle_work else NOOP), None, None)
            if item is _WAKE:
                self._continuous = self._source is not None
                continue
            if item is None:
                if self.channel is not None:
                    self.channel.closing = True
                try:
                    self._broadcast(Step(SHUTDOWN))
                except Exception as exc:  # noqa: BLE001 - exiting anyway: the followers' own watchdog ends them
                    log.warning("followers did not take the shutdown step: %s", exc)
                return
            step, fut, listener = item
            if fut is not None and not fut.set_running_or_notify_cancel():
                continue
            self._current = fut
            try:
                self._broadcast(step)
                result = execute(self.backend, step, listener, self._stops)
                if self.channel is not None and step.kind != NOOP and not self.channel.agree(agreed(result)):
                    raise RuntimeError(f"ranks disagree on the result of a {step.kind} step")
            except BaseException as exc:  # every failure here is fatal by design
                log.exception("%s step failed on rank 0", step.kind)
                self._fail(f"{step.kind} step failed: {type(exc).__name__}: {exc}", fut)
                return
            self._current = None
            if step.kind == IDLE:
                self._idle_work = bool(result)
            elif step.kind != NOOP:  # real work may have left new idle work (a shape run without its graph)
                self._idle_work = self._idle_allowed
            if fut is not None:
                fut.set_result(result)

    def _cstep(self) -> bool:
        """One continuous step from the source, or back to waiting when it has nothing. False: the engine died."""
        source = self._source
        try:
            payload = source.take() if source is not None else None
            if payload is None:
                self._continuous = False
                self._idle_work = self._idle_allowed
                return True
            step = Step(CSTEP, payload)
            self._broadcast(step)
            result = execute(self.backend, step, source, self._stops)
            if self.channel is not None and not self.channel.agree(agreed(result)):
                raise RuntimeError("ranks disagree on the result of a cstep step")
        except BaseException as exc:  # fatal, as for every step
            log.exception("cstep step failed on rank 0")
            self._fail(f"cstep step failed: {type(exc).__name__}: {exc}", None)
            return False
        source.deliver(payload, result)  # hands over to the event loop; never raises into the engine thread
        return True

    def abort(self, reason: str) -> None:
        """From another thread (the watchdog): a peer is gone; answer every caller, then exit non-zero."""
        if not self.dead:
            self._fail(reason, self._current)

    def _fail(self, reason: str, current: concurrent.futures.Future | None) -> None:
        self.dead = reason
        log.error("engine failure: %s", reason)
        pending = [current] if current is not None else []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item is not _WAKE and item[1] is not None:
                pending.append(item[1])
        for fut in pending:
            if fut is not None and not fut.done():
                fut.set_exception(EngineDead(reason))
        if self._source is not None:
            try:
                self._source.fail(EngineDead(reason))
            except Exception:  # answering callers must not stop the exit
                log.exception("continuous source failed to fail its requests")
        # Let the HTTP layer answer the requests that were in flight before the process goes.
        threading.Timer(self.fatal_grace_s, self.on_fatal, args=(reason,)).start()


def follow(backend: Any, channel: ControlChannel, drain_timeout_s: float = 30.0) -> int:
    """A follower's whole life after load: run what rank 0 sends until it says shutdown. Returns the exit code.

    SIGTERM does not stop a follower at once: rank 0 may still be draining and need it for those steps. The follower
    keeps running steps until rank 0 sends shutdown or the drain timeout passes, then exits 0.
    """
    terminating = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        terminating.set()
        threading.Timer(drain_timeout_s + 5.0, lambda: die("rank 0 sent no shutdown after SIGTERM", 0)).start()

    signal.signal(signal.SIGTERM, on_term)
    stops = ChannelStops(channel)
    done = threading.Event()
    outcome: dict[str, int] = {}

    def loop() -> None:
        while True:
            try:
                step = channel.broadcast()
            except BaseException as exc:  # noqa: BLE001 - rank 0 or the group is gone: this rank leaves
                if terminating.is_set():
                    outcome["code"] = 0
                else:
                    log.error("lost rank 0: %s", exc)
                    outcome["code"] = 1
                break
            if step.kind == SHUTDOWN:
                channel.closing = True
                outcome["code"] = 0
                break
            try:
                result = execute(backend, step, None, stops)
                if step.kind != NOOP and not channel.agree(agreed(result)):
                    raise RuntimeError(f"ranks disagree on the result of a {step.kind} step")
            except BaseException:  # a failed step ends this rank (exit 1); the log has the traceback
                log.exception("step %s failed on this rank", step.kind)
                outcome["code"] = 1
                break
        done.set()

    threading.Thread(target=loop, name="bloom-follower", daemon=True).start()
    # The main thread only waits, so signal handlers run even while the loop is blocked inside a collective.
    while not done.wait(0.5):
        pass
    return outcome.get("code", 1)
