"""Dynamic batching: requests that arrive together share one generate call. This is the one batching loop; streaming
is a callback into it (BatchListener), not a second loop.

The loop takes the oldest request's group (requests whose settings can share a call, see GenerateSpec.batch_key) in
arrival order, runs it, and hands every caller exactly its own rows. Requests of other groups wait for the next call;
the oldest always goes first, so none starves. Requests that arrive while a call runs share the next call; an idle
engine starts at once (`wait_s` 0, the default) or, with `wait_s` > 0, gathers for that long after the first request
(or until `max_batch_size` rows wait). Continuous batching (joining a running call) is frontend/batching/continuous.py;
the queue's bounds, shared with it, are frontend/batching/config.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable

from bloom_server.frontend.batching.config import BatcherConfig
from bloom_server.frontend.requests import GenRequest
from bloom_server.runtime.protocol import GenerateBatch, GenerateOutput
from bloom_server.types import FinishReason

log = logging.getLogger(__name__)


class BatchListener:
    """Handed to the backend with one generate call, on rank 0 only (followers run the same step without it).

    The backend calls `on_tokens` from the engine thread once per decoding step with one token per row of the batch,
    and reads `stopped_rows()` to stop rows whose callers are gone. Steps cross to the event loop with
    `loop.call_soon_threadsafe`, so they reach callers in order and before the call's own result. Steps that arrive
    while the loop has not yet taken the previous ones are taken together: one wake-up of the loop per step would
    make the two threads trade the GIL on every token (several times slower generation on CPU).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, rows: list[tuple[GenRequest, int]], top_n: int):
        self.loop = loop
        self.rows = rows  # batch row -> (request, row within the request)
        self.top_n = top_n
        self._stopped: frozenset[int] = frozenset()
        self._index: dict[int, list[tuple[int, int]]] = {}
        for i, (req, r) in enumerate(rows):
            self._index.setdefault(id(req), []).append((i, r))
        self._steps: list[tuple] = []
        self._lock = threading.Lock()

    # engine thread
    def on_tokens(self, token_ids: list[int], logprobs: list[float] | None, top: list | None = None) -> None:
        self._post((token_ids, logprobs, top))

    def on_grammar_failed(self, row: int) -> None:
        """The grammar engine gave up on batch row `row` (its last mask let only EOS through): its request fails
        before that step's tokens reach it, in the same order as the steps."""
        self._post((None, row, None))

    def _post(self, item: tuple) -> None:
        with self._lock:
            self._steps.append(item)
            first = len(self._steps) == 1
        if first:
            self.loop.call_soon_threadsafe(self._drain)

    def stopped_rows(self) -> frozenset[int]:
        return self._stopped

    # event loop
    def stop(self, req: GenRequest, rows: list[int]) -> None:
        wanted = set(rows)
        self._stopped = self._stopped | {i for i, r in self._index.get(id(req), []) if r in wanted}

    def _drain(self) -> None:
        with self._lock:
            steps, self._steps = self._steps, []
        for token_ids, logprobs, top in steps:
            if token_ids is None:  # on_grammar_failed: logprobs holds the batch row
                req, r = self.rows[logprobs]
                req.end_row(r, FinishReason.GRAMMAR.value)
                continue
            self._deliver(token_ids, logprobs, top)

    def _deliver(self, token_ids: list[int], logprobs: list[float] | None, top: list | None) -> None:
        for i, (req, r) in enumerate(self.rows):
            if i >= len(token_ids):
                break
            lp = None if logprobs is None else float(logprobs[i])
            alt = tuple((int(t), float(p)) for t, p in top[i][: req.top_n]) if (top and req.top_n) else None
            req.add_token(r, int(token_ids[i]), lp, alt)


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[GenerateBatch, BatchListener], Awaitable[GenerateOutput]],
        config: BatcherConfig,
        wait_s: float = 0.0,
        on_batch: Callable[[GenerateBatch, float], None] | None = None,
    ):
        self._run_batch = run_batch
        self.config = config
        self.wait_s = wait_s
        self.on_batch = on_batch
        self._pending: list[GenRequest] = []
        self._queued_tokens = 0  # sum of `tokens` over _pending, kept as it changes (not summed at each submit)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.running_rows = 0
        self.running: list[GenRequest] = []
        self._batch_seconds = 1.0  # moving average of a generate call, for Retry-After

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def _set_pending(self, pending: list[GenRequest]) -> None:
        if len(pending) != len(self._pending):
            self._queued_tokens = sum(p.tokens for p in pending)
        self._pending = pending

    @property
    def idle(self) -> bool:
        return not self._pending and not self.running

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="bloom-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping: the task's own failure was reported where it happened
                pass
            self._task = None

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: the calls ahead of a new request, at the recent pace."""
        return self.config.retry_after(len(self._pending), self._batch_seconds)

    def submit(self, req: GenRequest) -> None:
        """Admit one request (all its rows go in the same call) or refuse it at once."""
        tokens = req.tokens
        self.config.check(len(self._pending), lambda: self._queued_tokens, tokens, self.retry_after)
        self.start()
        req._on_cancel_queued = self._remove
        self._pending.append(req)
        self._queued_tokens += tokens
        self._wakeup.set()

    def _remove(self, req: GenRequest) -> None:
        self._set_pending([p for p in self._pending if p is not req])

    def _take(self) -> list[GenRequest]:
        self._set_pending([p for p in self._pending if not p.done])
        if not self._pending:
            return []
        key = self._key(self._pending[0])
        taken, rows = [], 0
        for p in self._pending:
            if self._key(p) == key and rows + p.n_rows <= self.config.max_batch_size:
                taken.append(p)
                rows += p.n_rows
        ids = {id(p) for p in taken}
        self._set_pending([p for p in self._pending if id(p) not in ids])
        return taken

    @staticmethod
    def _key(p: GenRequest) -> tuple:
        return p.spec.batch_key(max(len(r.prompt) for r in p.rows))

    def _rows_waiting(self) -> int:
        return sum(p.n_rows for p in self._pending if not p.done)

    async def _loop(self) -> None:
        while True:
            self._set_pending([p for p in self._pending if not p.done])
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Gather (wait_s > 0 only): until the oldest has waited wait_s, or a full batch is there. Requests that
            # waited through the previous call are past their deadline already: they start at once.
            deadline = self._pending[0].enqueued + self.wait_s
            while (
                self.wait_s > 0
                and self._rows_waiting() < self.config.max_batch_size
                and (delay := deadline - time.monotonic()) > 0
            ):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                except asyncio.TimeoutError:
                    break
            taken = self._take()
            if taken:
                await self._run(taken)

    async def _run(self, taken: list[GenRequest]) -> None:
        first = taken[0]
        seed_key = first.spec.batch_key(0)[2]
        seed = seed_key if seed_key is not None else random.getrandbits(31)
        input_ids, max_new, mapping, grammars = [], [], [], []
        for p in taken:
            for r, row in enumerate(p.rows):
                input_ids.append(tuple(row.prompt))
                max_new.append(p.spec.max_new_tokens)
                mapping.append((p, r))
                grammars.append(p.spec.grammar)
        batch = GenerateBatch(
            input_ids=tuple(input_ids),
            max_new_tokens=tuple(max_new),
            params=first.spec.params,
            seed=seed,
            pad_token_id=self.config.pad_token_id,
            eos_token_id=self.config.eos_token_id,
            grammars=tuple(grammars) if any(g is not None for g in grammars) else (),
        )
        listener = BatchListener(asyncio.get_running_loop(), mapping, top_n=max(p.top_n for p in taken))
        for p in taken:
            p._on_stop_rows = listener.stop
            p.on_start(seed)
        self.running_rows, self.running = len(input_ids), taken
        started = time.monotonic()
        try:
            out = await self._run_batch(batch, listener)
        except Exception as exc:  # noqa: BLE001 - handed to each caller
            for p in taken:
                p.fail(exc)
            return
        finally:
            self.running_rows, self.running = 0, []
            elapsed = time.monotonic() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
            if self.on_batch is not None:
                self.on_batch(batch, elapsed)
        for i, (p, r) in enumerate(mapping):
            p.settle_row(r, out.token_ids[i], out.finish_reasons[i])
        for p in taken:
            if not p.done:
                p._finish()
