"""Dynamic batching: requests that arrive together share one generate call.

The loop gathers for `wait_s` after the first waiting request (or until `max_batch_size` rows wait), takes the oldest
request's group (requests whose settings can share a call, see GenerateSpec.batch_key) in arrival order, runs it, and
hands every caller exactly its own rows. Requests of other groups wait for the next call; the oldest always goes
first, so none starves. Continuous batching (joining a running call) is a different engine, not this loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from bloom_server.engine.validation import GenerateSpec
from bloom_server.errors import Overloaded
from bloom_server.types import GenerateBatch, GenerateOutput

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    rows: list[list[int]]
    spec: GenerateSpec
    key: tuple
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[GenerateBatch], Awaitable[GenerateOutput]],
        *,
        max_batch_size: int,
        max_queued: int,
        wait_s: float,
        pad_token_id: int,
        eos_token_id: int | None,
    ):
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.wait_s = wait_s
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.running_rows = 0

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="bloom-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None

    async def submit(self, rows: list[list[int]], spec: GenerateSpec) -> GenerateOutput:
        """Queue one request (all its prompts go in the same call) and wait for its rows."""
        if len(self._pending) >= self.max_queued:
            raise Overloaded(f"{len(self._pending)} requests are queued (the limit is {self.max_queued})")
        self.start()
        fut = asyncio.get_running_loop().create_future()
        key = spec.batch_key(max(len(r) for r in rows))
        self._pending.append(_Pending(rows, spec, key, fut))
        self._wakeup.set()
        return await fut

    def _take(self) -> list[_Pending]:
        self._pending = [p for p in self._pending if not p.future.done()]  # callers that went away
        if not self._pending:
            return []
        key = self._pending[0].key
        taken, rows = [], 0
        for p in self._pending:
            if p.key == key and rows + len(p.rows) <= self.max_batch_size:
                taken.append(p)
                rows += len(p.rows)
        ids = {id(p) for p in taken}
        self._pending = [p for p in self._pending if id(p) not in ids]
        return taken

    def _rows_waiting(self) -> int:
        return sum(len(p.rows) for p in self._pending if not p.future.done())

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Gather: wait until the oldest has waited wait_s, or a full batch is there.
            deadline = self._pending[0].enqueued + self.wait_s
            while self._rows_waiting() < self.max_batch_size and (delay := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                except asyncio.TimeoutError:
                    break
            taken = self._take()
            if taken:
                await self._run(taken)

    async def _run(self, taken: list[_Pending]) -> None:
        spec = taken[0].spec
        seed = taken[0].key[2] if taken[0].key[2] is not None else random.getrandbits(31)
        input_ids, max_new = [], []
        for p in taken:
            input_ids.extend(tuple(r) for r in p.rows)
            max_new.extend([p.spec.max_new_tokens] * len(p.rows))
        batch = GenerateBatch(
            input_ids=tuple(input_ids),
            max_new_tokens=tuple(max_new),
            params=spec.params,
            seed=seed,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
        )
        self.running_rows = len(input_ids)
        try:
            out = await self._run_batch(batch)
        except Exception as exc:  # noqa: BLE001 - handed to each caller
            for p in taken:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self.running_rows = 0
        i = 0
        for p in taken:
            n = len(p.rows)
            if not p.future.done():
                p.future.set_result(GenerateOutput(out.token_ids[i : i + n], out.finish_reasons[i : i + n]))
            i += n
