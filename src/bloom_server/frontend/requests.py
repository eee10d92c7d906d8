"""One generation request inside the engine (rank 0, asyncio, torch-free): its rows, the tokens they produced so far,
stop sequences, deadlines, cancellation, and the events a streaming caller reads.

Everything here runs on the event loop. Tokens arrive from the engine thread through `BatchListener`, which hands
them over with `loop.call_soon_threadsafe`; the backend's final output then settles whatever the stream did not
carry (a backend without the streaming hook streams nothing, and every token is delivered at the end).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bloom_server.errors import BloomServerError, InvalidRequest
from bloom_server.types import FinishReason, cut_row, row_end

# The log-probability reported for a token of probability 0 (a grammar's mask, a suppressed EOS), and for anything not
# finite: JSON has no -inf, and OpenAI's API reports such tokens as -9999.0.
MIN_LOGPROB = -9999.0

if TYPE_CHECKING:
    from bloom_server.frontend.tokenizer import IncrementalText, TextTokenizer
    from bloom_server.frontend.validation import GenerateSpec

STOP_SEQUENCE = "stop_sequence"  # finish reason of a row cut by one of the request's stop strings
_ids = itertools.count(1)


class Cancelled(BloomServerError):
    """The caller went away (disconnect) or asked to stop; nobody reads the answer."""


class DeadlineExceeded(BloomServerError):
    """The request's deadline passed before it produced anything."""


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one row. `text` is the text this token adds once it is stable (held back while it may be
    the start of a stop sequence or an incomplete UTF-8 character), so concatenating `text` gives the output."""

    row: int
    index: int
    token_id: int
    text: str
    logprob: float | None
    special: bool
    top: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class Completion:
    text: str  # the output text: prompt included when the request keeps it, stop sequence excluded
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  # FinishReason value, or "stop_sequence"
    logprobs: tuple[float | None, ...] = ()
    top_logprobs: tuple[tuple[tuple[int, float], ...] | None, ...] = ()
    stop_sequence: str | None = None
    prompt_ids: tuple[int, ...] = ()
    # Output text the token events did not carry (held back when the row ended by max_time or a cancel): a stream
    # sends it last, so that its pieces add up to `text` (less the prompt).
    stream_tail: str = ""


@dataclass
class _Row:
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[tuple[tuple[int, float], ...] | None] = field(default_factory=list)
    text: str = ""  # decoded output so far (special tokens skipped)
    emitted: int = 0  # characters of `text` already handed to the stream
    done: bool = False
    reason: str | None = None
    stop: str | None = None
    cut: int | None = None  # text length at the stop sequence's start
    detok: IncrementalText | None = None  # the streamed text's decoder (made at the first token)


class GenRequest:
    """A request queued or running in the engine. Create with Engine.submit(); read with `stream()` and `result()`."""

    def __init__(
        self,
        rows: list[list[int]],
        spec: GenerateSpec,
        tokenizer: TextTokenizer,
        *,
        stop: tuple[str, ...] = (),
        eos_ids: frozenset[int] = frozenset(),
        deadline: float | None = None,
        max_time: float | None = None,
        top_n: int = 0,
        request_id: str | None = None,
        streaming: bool = False,
    ):
        self.id = request_id or f"req-{next(_ids)}"
        self.spec = spec
        self.tok = tokenizer
        self.stops = tuple(s for s in stop if s)
        self.eos_ids = eos_ids
        self.deadline = deadline  # time.monotonic() value, or None
        self.max_time = max_time  # seconds of generation, counted from the start of its batch
        self.top_n = top_n
        # Text as tokens come is needed only to stream it or to find stop sequences; otherwise it is decoded once.
        self.incremental = streaming or bool(self.stops)
        self.rows = [_Row(list(r)) for r in rows]
        self.loop = asyncio.get_running_loop()
        self.enqueued = time.monotonic()
        self.started: float | None = None
        self.first_token: float | None = None
        # Its time to a first token in engine steps (continuous batching): (steps that ran while it waited for a
        # slot, steps from its admission to its first token, both counted); None elsewhere.
        self.ttft_steps: tuple[int, int] | None = None
        self.finished: float | None = None
        self.seed: int | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._done: asyncio.Future = self.loop.create_future()
        self._timers: list[asyncio.TimerHandle] = []
        self._on_cancel_queued: Any = None  # set by the batcher while the request waits
        self._on_stop_rows: Any = None  # set by the batcher while the request runs: stop these rows in the backend
        self._rids: list[int] = []  # the continuous batcher's row ids (frontend/batching/continuous.py)
        self._takes_before = 0  # the continuous batcher's csteps taken before it came, and those it waited through
        self._waited_takes = 0
        if deadline is not None:
            self._timers.append(self.loop.call_at(self._loop_time(deadline), self._expire, "deadline"))

    # ---- what callers read ----
    @property
    def n_rows(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> int:
        """What the request costs in the queue: prompt plus the most it may generate, over its rows."""
        return sum(len(r.prompt) + self.spec.max_new_tokens for r in self.rows)

    @property
    def done(self) -> bool:
        return self._done.done()

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """Token events as they come, until every row is finished (then `result()` answers at once)."""
        while True:
            ev = await self._events.get()
            if ev is None:
                return
            yield ev

    async def result(self) -> list[Completion]:
        return await asyncio.shield(self._done)

    def events_queued(self) -> bool:
        """Whether the stream's next item (an event, or its end) is already here."""
        return not self._events.empty()

    def may_end_without_token(self) -> bool:
        """Whether the stream can still end with no token of its own: a timer (deadline, max_time) may stop it. Every
        other end comes with the row's last token, in the same loop tick (EOS, length, stop sequence)."""
        return any(not t.cancelled() for t in self._timers)

    def cancel(self, reason: str = "cancelled") -> None:
        """The caller is gone: leave the queue, or stop its rows (the backend stops them where it safely can)."""
        if self.done:
            return
        if self._on_cancel_queued is not None:
            self._on_cancel_queued(self)
        self._stop_all(FinishReason.TIME.value)
        self._settle(Cancelled(f"request {self.id}: {reason}"))

    # ---- driven by the batcher, on the loop ----
    def on_start(self, seed: int, at: float | None = None) -> None:
        """The request's rows started (at: when, as time.monotonic(); default now)."""
        now = time.monotonic()
        self.started = now if at is None else min(at, now)
        self.seed = seed
        self._on_cancel_queued = None
        if self.max_time is not None:
            delay = max(0.0, self.max_time - (now - self.started))
            self._timers.append(self.loop.call_later(delay, self._expire, "max_time"))

    def add_token(self, r: int, token_id: int, logprob: float | None, top: tuple | None) -> None:
        row = self.rows[r]
        if row.done or self.done:
            return
        if self.first_token is None:
            self.first_token = time.monotonic()
        if logprob is not None and not logprob > MIN_LOGPROB:
            logprob = MIN_LOGPROB
        if top is not None and not all(p > MIN_LOGPROB for _, p in top):
            top = tuple((t, p if p > MIN_LOGPROB else MIN_LOGPROB) for t, p in top)
        row.ids.append(token_id)
        row.logprobs.append(logprob)
        row.top.append(top)
        special = token_id in self.tok.special_ids
        end = row_end(token_id, len(row.ids), self.spec.max_new_tokens, self.eos_ids)
        if end is not None:
            row.done, row.reason = True, end.value
        if self.incremental:
            self._advance_text(r, row, token_id, logprob, special, top)
        if row.stop is not None and not row.done:
            row.done, row.reason = True, STOP_SEQUENCE
            if self._on_stop_rows is not None:
                self._on_stop_rows(self, [r])
        if all(x.done for x in self.rows):
            self._finish()

    def settle_row(self, r: int, token_ids: tuple[int, ...], reason: FinishReason) -> None:
        """The backend's final answer for a row: deliver what the stream did not carry, then finish the row."""
        if reason is FinishReason.GRAMMAR:
            self._grammar_failed()
            return
        row = self.rows[r]
        if row.done:
            return
        if list(token_ids[: len(row.ids)]) != row.ids:  # the stream disagreed: the final output is the truth
            row.ids, row.logprobs, row.top, row.text, row.emitted, row.detok = [], [], [], "", 0, None
        if not self.incremental:
            self._settle_bulk(r, row, token_ids[len(row.ids) :])
        else:
            for t in token_ids[len(row.ids) :]:
                self.add_token(r, t, None, None)
                if row.done:
                    break
        if not row.done:
            row.done, row.reason = True, reason.value

    def _settle_bulk(self, r: int, row: _Row, new: tuple[int, ...]) -> None:
        """What add_token does token by token (no text to advance: the request is not incremental), in one step:
        the row's tokens up to its first EOS or its max_new_tokens."""
        if not new or self.done:
            return
        take, end = cut_row(new, self.spec.max_new_tokens, self.eos_ids, have=len(row.ids))
        reason = None if end is None else end.value
        if take and self.first_token is None:
            self.first_token = time.monotonic()
        row.ids.extend(take)
        row.logprobs.extend([None] * len(take))
        row.top.extend([None] * len(take))
        if reason is not None:
            row.done, row.reason = True, reason
            if all(x.done for x in self.rows):
                self._finish()

    def end_row(self, r: int, reason: str) -> None:
        """The backend finished a row (continuous batching: its tokens came with the steps); the request is answered
        once every row is finished."""
        if reason == FinishReason.GRAMMAR.value:
            self._grammar_failed()
            return
        row = self.rows[r]
        if not row.done:
            row.done, row.reason = True, reason
        if all(x.done for x in self.rows):
            self._finish()

    def fail(self, exc: BaseException) -> None:
        self._settle(exc)

    def _grammar_failed(self) -> None:
        """A row's grammar engine gave up on it (one of its limits, reached while following the grammar): no valid
        answer can come, so the request is answered with a 422 naming the grammar's field, and its other rows stop."""
        field = self.spec.grammar_field
        exc = InvalidRequest(f"{field}: the grammar engine could not follow this grammar while generating (it reached "
                             "one of its limits: too large or too costly a grammar); simplify it", field=field)  # fmt: skip
        self._stop_all(FinishReason.GRAMMAR.value)
        self._settle(exc)

    # ---- internals ----
    def _loop_time(self, monotonic_deadline: float) -> float:
        return self.loop.time() + (monotonic_deadline - time.monotonic())

    def _advance_text(self, r: int, row: _Row, token_id: int, logprob: float | None, special: bool, top) -> None:
        if row.detok is None:
            row.detok = self.tok.incremental()
        text = row.detok.text(row.ids)
        if row.cut is None and self.stops:
            for s in self.stops:
                # From what was already streamed: the text after it may still change (an unfinished character).
                at = text.find(s, max(0, row.emitted - len(s)))
                if at >= 0 and (row.cut is None or at < row.cut):
                    row.cut, row.stop = at, s
        row.text = text
        visible = text if row.cut is None else text[: row.cut]
        end = len(visible)
        if not row.done and row.stop is None:
            if visible.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next byte
                end = len(visible.rstrip("\ufffd"))
            # Hold back the longest tail that may be the start of a stop sequence (of any of them).
            held = 0
            for s in self.stops:
                for k in range(min(len(s) - 1, end), held, -1):
                    if visible[:end].endswith(s[:k]):
                        held = k
                        break
            end -= held
        end = max(end, row.emitted)
        piece = visible[row.emitted : end]
        row.emitted = end
        self._events.put_nowait(TokenEvent(r, len(row.ids) - 1, token_id, piece, logprob, special, top))

    def _expire(self, why: str) -> None:
        if self.done:
            return
        if self.started is None:
            if self._on_cancel_queued is not None:
                self._on_cancel_queued(self)
            self._settle(
                DeadlineExceeded(
                    f"the request's deadline passed after {time.monotonic() - self.enqueued:.2f} s in the queue"
                )
            )
            return
        # Running: answer with what was generated so far; the rows stop in the backend where that is safe.
        self._stop_all(FinishReason.TIME.value)
        self._finish()

    def _stop_all(self, reason: str) -> None:
        open_rows = [i for i, row in enumerate(self.rows) if not row.done]
        for i in open_rows:
            self.rows[i].done, self.rows[i].reason = True, reason
        if open_rows and self._on_stop_rows is not None:
            self._on_stop_rows(self, open_rows)

    def completions(self, keep_prompt: bool) -> list[Completion]:
        out = []
        for row in self.rows:
            if not self.incremental:
                row.text = self.tok.decode(row.ids)
            text = row.text if row.cut is None else row.text[: row.cut]
            tail = text[row.emitted :] if self.incremental else ""
            if keep_prompt:
                full = self.tok.decode(row.prompt + row.ids)
                text = full[: len(full) - (len(row.text) - len(text))] if row.cut is not None else full
            out.append(
                Completion(
                    text=text,
                    token_ids=tuple(row.ids),
                    prompt_tokens=len(row.prompt),
                    finish_reason=row.reason or FinishReason.LENGTH.value,
                    logprobs=tuple(row.logprobs),
                    top_logprobs=tuple(row.top),
                    stop_sequence=row.stop,
                    prompt_ids=tuple(row.prompt),
                    stream_tail=tail,
                )
            )
        return out

    def _finish(self) -> None:
        self._settle(None)

    def _settle(self, exc: BaseException | None) -> None:
        if self._done.done():
            return
        self.finished = time.monotonic()
        for t in self._timers:
            t.cancel()
        self._on_stop_rows = None
        if exc is None:
            self._done.set_result(self.completions(not self.spec.remove_input_from_output))
        else:
            self._done.set_exception(exc)
            self._done.exception()  # retrieved: a caller that left does not make asyncio log it
        self._events.put_nowait(None)

    # timing, for headers, logs and metrics
    @property
    def queue_time(self) -> float:
        return (self.started or self.finished or time.monotonic()) - self.enqueued

    @property
    def inference_time(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.ids) for r in self.rows)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.rows)
