"""Continuous batching in the server (rank 0, torch-free): requests join the running batch at step boundaries and
leave it the step they finish, so a short request never waits for a long batch to end.

ContinuousBatcher has the DynamicBatcher's face (submit with the same bounded queue, queue_depth, queued_tokens,
running_rows, idle, retry_after, stop), so the API, metrics, overload and draining see no difference. Behind it:

  event loop                               engine thread (runtime.lockstep.Leader, continuous mode)
  submit(req) -> waiting, runner.wake()
                                           take(): leaves + the oldest waiting requests that fit -> CStep
                                           broadcast CStep; every rank runs backend.cstep(); digests compared
                                           deliver(CStep, result) -> coalesced call_soon_threadsafe
  _drain(): on_start, add_token per row,
  end_row; stop strings / disconnects /
  deadlines -> _leave(rids)

The fast backend reads a step's tokens during the next step (its decode is queued first, so the GPU does not wait
for the host: fast/rows.py), so tokens and finishes reach deliver() one step after they were chosen; nothing
here depends on it (a row is live until its finish is delivered).

Admission (in take(), on the engine thread, so it sees exactly which rows are live): strict arrival order, a
request's rows all join together, while the live rows (after this step's leaves) plus its rows fit in
max_batch_size. Every prompt was already checked against the engine's max_total_tokens at submit, so a row always
fits its slot. The decision travels in the broadcast CStep, so every rank admits the same rows.

Each row of a request samples with its own generator: row 0 with the request's seed (so a seeded n=1 request gives
what the dynamic path gives it alone), row r with a seed derived from it; the rows' tokens do not depend on which
other rows share their steps. Every setting the fast backend's static path honours is honoured here (the
RowScheduler uses the same per-row Sampler); min_length counts from the row's own prompt (each row as if alone).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bloom_server.errors import EngineDead, NotReady
from bloom_server.frontend.batching.config import BatcherConfig
from bloom_server.runtime.protocol import CStep, GenerateBatch, Join
from bloom_server.types import FinishReason, SamplingParams

if TYPE_CHECKING:
    from bloom_server.frontend.requests import GenRequest

log = logging.getLogger(__name__)

_SEED_MIX = 0x9E3779B97F4A7C15  # row r of a request samples from seed + r * this (mod 2**63)


def row_seed(seed: int, row: int) -> int:
    return seed if row == 0 else (seed + row * _SEED_MIX) % (1 << 63)


class ContinuousBatcher:
    def __init__(
        self,
        runner: Any,
        config: BatcherConfig,
        on_batch: Callable[[GenerateBatch, float], None] | None = None,
    ):
        self._runner = runner
        self.config = config
        self.on_batch = on_batch
        self._lock = threading.Lock()  # guards _waiting, _live, _leaves (event loop and engine thread)
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._live: dict[int, tuple[GenRequest, int]] = {}  # row id -> (request, row): joined, not yet finished
        self._leaves: set[int] = set()
        self._started: list[
            tuple[GenRequest, int, float]
        ] = []  # engine thread: admitted by take(), sent with deliver()
        self._out: list[tuple] = []  # engine thread -> event loop, drained together
        self._out_lock = threading.Lock()
        self._rids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: BaseException | None = None
        self._request_seconds = 1.0  # moving average of a request's time in the batch, for Retry-After
        self.steps = 0
        self._takes = 0  # csteps taken so far (a request's wait for a slot counts those taken after it came)
        runner.attach_continuous(self)

    # ---- the DynamicBatcher's face (event loop) ----
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def queued_tokens(self) -> int:
        with self._lock:
            return sum(p.tokens for p in self._waiting)

    @property
    def running_rows(self) -> int:
        return len(self._live)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._live

    def start(self) -> None:
        """Nothing to start: the engine thread runs the steps."""

    async def stop(self) -> None:
        """Shutdown: requests still here are answered with an error (drain normally leaves none)."""
        self._close(NotReady("the server is shutting down"))

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: batches' worth of rows ahead of a new request, at the recent pace."""
        return self.config.retry_after(sum(p.n_rows for p in list(self._waiting)), self._request_seconds)

    def submit(self, req: GenRequest) -> None:
        """Queue one request (all its rows join together) or refuse it at once (Overloaded)."""
        if self._closed is not None:
            raise EngineDead(str(self._closed)) if isinstance(self._closed, EngineDead) else self._closed
        self.config.check(len(self._waiting), lambda: self.queued_tokens, req.tokens, self.retry_after)
        self._loop = req.loop
        req._rids = [next(self._rids) for _ in req.rows]
        req._takes_before = self._takes
        req._on_cancel_queued = self._remove
        req._on_stop_rows = self._leave
        with self._lock:
            self._waiting.append(req)
        self._runner.wake()

    def _remove(self, req: GenRequest) -> None:
        """A request leaves before it started: out of the queue, or, if the engine thread admitted it meanwhile, its
        rows leave the batch at the next step."""
        with self._lock:
            if req in self._waiting:
                self._waiting.remove(req)
                return
        self._leave(req, list(range(req.n_rows)))

    def _leave(self, req: GenRequest, rows: list[int]) -> None:
        """Rows whose callers no longer read them (disconnect, stop string, deadline, max_time): their slots are
        freed at the next step boundary."""
        with self._lock:
            for r in rows:
                rid = req._rids[r]
                if rid in self._live:
                    self._leaves.add(rid)

    # ---- engine thread (called by the Leader) ----
    def take(self) -> CStep | None:
        """The next step's joins and leaves; None when nothing is live, waiting or leaving (the Leader then waits)."""
        if self._closed is not None:
            return None
        with self._lock:
            leaves = tuple(rid for rid in self._leaves if rid in self._live)
            self._leaves.clear()
            cfg = self.config
            free = cfg.max_batch_size - len(self._live) + len(leaves)
            joins: list[Join] = []
            started: list[tuple[GenRequest, int, float]] = []
            now = time.monotonic()
            while self._waiting:
                req = self._waiting[0]
                if req.done:  # answered while queued (a race with its own removal)
                    self._waiting.popleft()
                    continue
                if req.n_rows > free:
                    break  # strict arrival order: the oldest goes first, so none starves
                self._waiting.popleft()
                spec = req.spec
                seed = spec.seed if spec.seed is not None else random.getrandbits(31)
                for r, row in enumerate(req.rows):
                    rid = req._rids[r]
                    self._live[rid] = (req, r)
                    joins.append(Join(rid, tuple(row.prompt), spec.max_new_tokens, spec.params, row_seed(seed, r),
                                      cfg.eos_token_id, cfg.pad_token_id, req.top_n, spec.grammar))  # fmt: skip
                free -= req.n_rows
                started.append((req, seed, now))
                req._waited_takes = self._takes - req._takes_before  # 0: taken by the first cstep after it came
            if not joins and not leaves and not self._live:
                return None
            self._takes += 1
        self._started = started
        if leaves:
            log.debug("rows %s leave the batch (their callers are gone)", list(leaves))
        return CStep(tuple(joins), leaves)

    def deliver(self, step: CStep, result: Any) -> None:
        """A cstep's result (backends.fast.CStepResult): hand its tokens and finished rows to the event loop."""
        started, self._started = self._started, []
        rows, ended = [], []
        extra = result.extra
        with self._lock:
            for i, (rid, token) in enumerate(result.tokens):
                where = self._live.get(rid)
                if where is not None:
                    lp, top = extra[i] if extra is not None else (None, None)
                    rows.append((where[0], where[1], token, lp, top))
            for rid, wait, prefill in result.firsts:
                where = self._live.get(rid)
                if where is not None and where[0].ttft_steps is None:  # its first row's first token
                    where[0].ttft_steps = (where[0]._waited_takes + wait, prefill)
            for rid, reason in result.finished:
                where = self._live.pop(rid, None)
                if where is not None:
                    ended.append((where[0], where[1], reason))
            live = len(self._live)
        self.steps += 1
        self._post((started, rows, ended, live))

    def fail(self, exc: BaseException) -> None:
        """The engine died (any thread): every request here gets the error."""
        self._close(exc)

    # ---- event loop ----
    def _post(self, item: tuple) -> None:
        with self._out_lock:
            self._out.append(item)
            first = len(self._out) == 1
        if first and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _drain(self) -> None:
        with self._out_lock:
            items, self._out = self._out, []
        for started, rows, ended, live in items:
            for req, seed, at in started:
                if not req.done:
                    req.on_start(seed, at)
            if started and self.on_batch is not None:
                try:
                    rows_now = ((),) * live
                    cfg = self.config
                    self.on_batch(GenerateBatch(rows_now, (0,) * live, SamplingParams(), 0, cfg.pad_token_id,
                                                cfg.eos_token_id), 0.0)  # fmt: skip
                except Exception:  # metrics never break a request
                    log.exception("batch report failed")
            for req, r, reason in ended:  # before the step's tokens: the EOS a failed grammar forced is no answer
                if reason == FinishReason.GRAMMAR.value and not req.done:
                    req.end_row(r, reason)
            for req, r, token, lp, top in rows:
                if not req.done:
                    req.add_token(r, int(token), lp, tuple((int(t), float(p)) for t, p in top) if top else None)
            for req, r, reason in ended:
                was_done = req.done
                req.end_row(r, reason if reason in _REASONS else FinishReason.TIME.value)
                if req.done and not was_done and req.started is not None:
                    self._request_seconds = 0.8 * self._request_seconds + 0.2 * req.inference_time

    def _close(self, exc: BaseException) -> None:
        """Stop taking steps and answer everyone still here with `exc` (on the event loop)."""
        if self._closed is None:
            self._closed = exc

        def fail_all() -> None:
            with self._lock:
                reqs = list(self._waiting) + [req for req, _ in self._live.values()]
                self._waiting.clear()
                self._live.clear()
                self._leaves.clear()
            for req in dict.fromkeys(reqs):
                if not req.done:
                    req.fail(exc)

        loop = self._loop
        if loop is None:
            return
        try:
            if loop.is_running() and _on_loop(loop):
                fail_all()
            else:
                loop.call_soon_threadsafe(fail_all)
        except RuntimeError:  # the loop is closed
            pass


_REASONS = {FinishReason.EOS.value, FinishReason.LENGTH.value, FinishReason.TIME.value, FinishReason.GRAMMAR.value}


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
