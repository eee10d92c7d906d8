"""Continuous batching over FastEngine's slots: requests join the running batch at step boundaries and leave it the
step they finish, freeing their slot (TGI's batch `filter` / `concatenate`, done as slot moves in a static cache).

Each `step()` (pipelined, the default):
  0. leave: rows whose callers left (`leave(rid)`) are retired before anything runs (an unread token of theirs is
     dropped);
  1. admit: waiting requests take the free slots after the live ones (rows joining: their prompts go in), and the
     joining rows' prompts are prefilled together, in arrival order, within the step's token budget (below), queued
     ahead of this step's decode; a row whose prompt is in gets its first token from its own sampler (into the step
     buffer, with its own copy to the host started) and is live from then on, so this step's decode takes it on;
  2. decode: one token for every live row, queued on the device (the engine's captured step; rows that need more
     than the step's own greedy argmax use their own sampler on their row of the logits, also on the device). The
     step's tokens are copied aside and their copy to the host is started, nothing waits for them yet;
  3. read: the previous step's tokens, then this step's first tokens, reach the host (the step's host wait, while
     this step's decode runs): a joining row's first token waits for the decode in flight and its own prefill, never
     for a decode of its own step. Rows that produced an EOS (at or after their min_new_tokens) or reached their
     max_new_tokens are finished;
  4. retire: finished rows leave; the last live row moves into each hole, so the live slots stay a prefix [0, n)
     and the fast path stays usable (a slot freed here is taken by the next step's admissions).
So a request added before a step with a slot free is admitted by it, and, when its prompt (after its cached prefix)
fits the step's budget, its first token is read in that same step (`Request.wait_steps`, `prefill_steps`: 0 and 1).
Chunked prefill (`step_tokens`, `chunk_tokens`; 0: no limit, every joining prompt goes in whole in the step it is
admitted): a step computes at most `step_tokens` tokens, one per decoded row and the rest for the joining prompts,
at most `chunk_tokens` of one prompt, so a long prompt goes in over several steps while the live rows keep
decoding. Strictly in arrival order (a row's prompt gets tokens only once every row before it is in), so rows
become live in slot order and the live slots stay a prefix: joining rows sit in the slots after the live ones
(moved down with them when live rows retire). The prefix cache (`prefix_cache`, fast/prefix_cache.py) puts a
joining row's cached prefix in its slot when its prompt starts going in; a row's prompt blocks are cached once it is
in. No budget applies while no row decodes (a burst on an idle batch goes in as fast as unchunked).

So the device never waits for the host's bookkeeping: step t+1's decode is queued before step t's tokens are read.
The price: a row's later tokens reach the caller one step later, and a row whose end is only known from its token (EOS,
or its last token) rides along in one more decode, whose token is dropped. Decisions are taken from the tokens,
never from timing, so every rank (and a non-pipelined run, `pipeline=False`) gives each row the same tokens.

Each row samples with its own seeded generator, so a row's tokens do not depend on which rows share its steps.
Under tensor parallelism every rank runs the same `leave`/`add`/`step` calls (the lockstep runtime broadcasts them
as one "cstep" per step; see backends/fast.py), so every rank makes the same admissions and retirements.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bloom_server.fast.engine import GRAPH_AFTER_EAGER_STEPS, FastEngine
from bloom_server.fast.prefix_cache import PrefixCache
from bloom_server.fast.sampling import Sampler, SamplingConfig, to_device
from bloom_server.types import FinishReason, row_end

log = logging.getLogger(__name__)

STOPPED = "stopped"  # finish of a row whose caller left (leave())


@dataclass(eq=False)
class Request:
    rid: Any
    prompt: tuple[int, ...]
    max_new_tokens: int
    cfg: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    on_token: Callable[[Request, int], None] | None = None
    top_n: int = 0  # alternatives per token to report (with step(logprobs=True))
    pad_token_id: int = 0
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in its slot (a joining row's prompt goes in over one or more steps)
    finish: str | None = None  # "eos" | "length" | "stopped" | "grammar" (its grammar engine gave up on it)
    slot: int | None = None
    sampler: Sampler | None = None
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None  # when the host read its first token
    issued: int = 0  # tokens chosen on the device so far (read or not)
    plain: bool = False  # the step's own argmax is its token at every step
    greedy: bool = False  # greedy with at most EOS held back (min_new_tokens)
    grammar: Any = None  # types.Grammar: its tokens must follow it (masked before they are chosen)
    cached: int | None = None  # prompt tokens copied from the prefix cache (None: not looked up yet)
    # Its time to a first token, in the scheduler's steps (`RowScheduler.steps`): the step it was added before, the
    # step that gave it a slot, the step whose read gave the host its first token.
    queued_step: int | None = None
    admitted_step: int | None = None
    first_step: int | None = None

    @property
    def wait_steps(self) -> int | None:
        """Steps that ran while it waited for a slot (0: admitted by the first step after it was added)."""
        if self.admitted_step is None or self.queued_step is None:
            return None
        return self.admitted_step - self.queued_step

    @property
    def prefill_steps(self) -> int | None:
        """Steps from its admission to its first token read, both counted (1: in the step that admitted it)."""
        if self.first_step is None or self.admitted_step is None:
            return None
        return self.first_step - self.admitted_step + 1


@dataclass
class Emitted:
    """One token a step gave one row (the step's output, in order)."""

    req: Request
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class _Pending:
    """Tokens chosen on the device but not yet read by the host: one segment per launch (a decode of the live slots,
    the first tokens of admitted rows), each with the rows its entries belong to (None: an entry to drop, a row
    riding along after its last token). `stage()` starts their copy to the host (pinned, non-blocking on CUDA) and
    records an event, so the read waits for exactly these tokens and not for steps queued after them."""

    __slots__ = ("rows", "tokens", "logprobs", "tops", "host", "host_tops", "event")

    def __init__(self) -> None:
        self.rows: list[Request | None] = []
        self.tokens: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []
        self.tops: list[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]] = []  # (entry, n) keys, ids, values
        self.host: torch.Tensor | None = None
        self.host_tops: list[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]] = []
        self.event: Any = None

    def add(self, rows: list, tokens: torch.Tensor, logprobs: torch.Tensor | None) -> int:
        base = len(self.rows)
        self.rows.extend(rows)
        self.tokens.append(tokens)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        return base

    def stage(self) -> None:
        tokens = self.tokens[0] if len(self.tokens) == 1 else torch.cat(self.tokens)
        if self.logprobs:  # token ids are exact in float64: one tensor, one copy
            lps = self.logprobs[0] if len(self.logprobs) == 1 else torch.cat(self.logprobs)
            dev = torch.stack([tokens.double(), lps.double()])
        else:
            dev = tokens
        self.host = _to_host(dev)
        self.host_tops = [(keys, _to_host(ids), _to_host(vals)) for keys, ids, vals in self.tops]
        if dev.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()
        self.tokens, self.logprobs, self.tops = [], [], []

    def read(self) -> tuple[list[int], list[float] | None, dict[int, list]]:
        if self.event is not None:
            self.event.synchronize()
        assert self.host is not None
        if self.host.dim() == 2:
            both = self.host.tolist()
            tokens, lps = [int(t) for t in both[0]], both[1]
        else:
            tokens, lps = self.host.tolist(), None
        tops: dict[int, list] = {}
        for keys, ids, vals in self.host_tops:
            ids_h, vals_h = ids.tolist(), vals.tolist()
            for i, (key, t) in enumerate(keys):
                tops[key] = list(zip(ids_h[i][:t], vals_h[i][:t]))
        return tokens, lps, tops


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start a device tensor's copy to host memory without waiting for it (on CPU: the tensor itself)."""
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class RowScheduler:
    """The engine-side holder of continuous batching's rows: waiting, joining (prompt going in), live (decoding).
    `pipeline` (default): step t+1's decode is queued on the device before step t's tokens are read, so the
    device never waits for the host's bookkeeping (see the module docstring); False reads each step's own tokens
    at its end (the same tokens per row, one step earlier; for tests and comparisons). `step_tokens`,
    `chunk_tokens`: chunked prefill (0: off); `prefix_cache`: a PrefixCache over this engine, or None."""

    def __init__(
        self,
        engine: FastEngine,
        pipeline: bool = True,
        *,
        step_tokens: int = 0,
        chunk_tokens: int = 0,
        prefix_cache: PrefixCache | None = None,
    ):
        if step_tokens and step_tokens <= engine.max_batch:
            raise ValueError(f"a step budget of {step_tokens} tokens leaves no prefill beside {engine.max_batch} rows")
        self.engine = engine
        self.pipeline = pipeline
        self.step_tokens = step_tokens
        self.chunk_tokens = chunk_tokens
        self.prefix_cache = prefix_cache
        self.waiting: collections.deque[Request] = collections.deque()
        self.live: list[Request] = []  # live[i] sits in slot i
        self.joining: list[Request] = []  # joining[i] sits in slot len(live) + i: its prompt is going in
        self.steps = 0
        # What the latest step read, in order, as parallel lists (no object per token): the rows' ids, their
        # tokens, and with logprobs each token's (log-probability, top alternatives or None).
        self.out_rids: list[Any] = []
        self.out_tokens: list[int] = []
        self.out_extra: list[tuple[float | None, list | None]] = []
        self._out_reqs: list[Request] = []
        self.out_firsts: list[Request] = []  # rows whose first token the latest step read
        self._pending: _Pending | None = None  # chosen on the device, not yet read (at most one step's worth)
        self._ended = 0  # live rows finished or left since the last _retire
        self.grammars: Any = None  # structured.Grammars of the engine's vocabulary: set by the owner before a
        # constrained row is added
        self._matchers: Any = None  # structured.RowMatchers, by row id

    def add(self, req: Request) -> None:
        if len(req.prompt) + req.max_new_tokens > self.engine.max_seq:
            raise ValueError(f"{len(req.prompt)} + {req.max_new_tokens} tokens; a slot holds {self.engine.max_seq}")
        if not req.prompt or req.max_new_tokens < 1:
            raise ValueError("a request needs a prompt and at least one new token")
        req.queued_step = self.steps
        self.waiting.append(req)

    def leave(self, rid: Any) -> Request | None:
        """The row's caller left: a waiting row is dropped, a live one is retired at the start of the next step
        (a token of it still unread is dropped). Returns the request (finish "stopped") or None when the row is
        unknown or already finished."""
        for r in self.waiting:
            if r.rid == rid:
                self.waiting.remove(r)
                r.finish = STOPPED
                return r
        for r in itertools.chain(self.live, self.joining):
            if r.rid == rid and r.finish is None:
                r.finish = STOPPED
                self._ended += 1
                return r
        return None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.live and not self.joining

    # ---- one step ----

    @torch.inference_mode()
    def step(self, logprobs: bool = False) -> list[Request]:
        """Leave, admit, decode, read, retire. Returns the requests that finished by EOS or length in this step (those
        that left are `leave()`'s to report). `self.emitted` holds the tokens read in this step (pipelined: those
        chosen in the previous step, then this step's admissions' first tokens); with `logprobs`, each with its
        log-probability under the raw logits and, for rows with `top_n`, the most likely alternatives."""
        self._retire()  # rows that left since the previous step: out before anything runs
        self.out_rids, self.out_tokens, self.out_extra, self._out_reqs, self.out_firsts = [], [], [], [], []
        n = len(self.live) if self._decoding() else 0  # tokens of the step's budget the decode takes
        firsts = _Pending()
        if self.pipeline:  # queued ahead of the decode: a joining row's first token does not wait for a decode,
            self._admit(firsts, logprobs, n)  # and the rows whose prompt is in are in this step's decode already
            if firsts.rows:
                firsts.stage()
        nxt = _Pending()
        decoded = self._decode(nxt, logprobs) if self._decoding() else None  # queued behind the prefill
        finished: list[Request] = []
        if self.pipeline:
            prev, self._pending = self._pending, None
            # The host waits for the previous step's tokens, then reads this step's first tokens while this decode
            # runs; the decode's constrained rows get their masks once the last of those is in.
            if prev is not None:
                finished = self._process(prev)
            if firsts.rows:
                finished += self._process(firsts)
            if decoded is not None:  # constrained rows: their masks need the tokens just read
                self._choose(nxt, decoded, logprobs)
            self._retire()
            if not self.live:
                nxt = _Pending()  # only rows that finished rode along: nothing to read
            if nxt.rows:
                nxt.stage()
                self._pending = nxt
        else:  # each step reads its own tokens, its admissions' first tokens in the same read (one token a row)
            if decoded is not None:
                self._choose(nxt, decoded, logprobs)
            self._admit(nxt, logprobs, n)
            if nxt.rows:
                nxt.stage()
                finished = self._process(nxt)
            self._retire()
        self.steps += 1
        return finished

    def _decoding(self) -> bool:
        return any(r.finish is None and r.issued < r.max_new_tokens for r in self.live)

    @property
    def emitted(self) -> list[Emitted]:
        """The latest step's tokens as objects (for callers outside the hot path)."""
        extra = self.out_extra or [(None, None)] * len(self.out_tokens)
        return [Emitted(r, t, lp, top) for r, t, (lp, top) in zip(self._out_reqs, self.out_tokens, extra)]

    def run(self) -> None:
        while not self.idle:
            self.step()

    def _sampler(self, req: Request) -> Sampler:
        return Sampler(req.cfg, [req.prompt], vocab_size=self.engine.shape.vocab_size, device=self.engine.device,
                       seed=req.seed, max_new_tokens=req.max_new_tokens, pad_token_id=req.pad_token_id)  # fmt: skip

    def _admit(self, into: _Pending, logprobs: bool, decoded: int) -> None:
        """Waiting requests take the free slots after the live and joining ones; then the joining rows' prompts go
        in, in arrival order, within what the step's budget leaves after its `decoded` rows (no budget while no row
        decodes: nobody's next token waits for this step), all in one prefill. A row looks up the prefix cache when
        its prompt starts going in, not when it gets its slot, so that it finds what the rows ahead of it put there
        meanwhile; a row whose next block is being computed in this step by a row ahead of it waits for the next step
        (then it copies that block instead of computing it again). Each row whose prompt is in becomes live: its
        first token (from its own sampler) goes into the step buffer, so this step's decode already takes it on, and
        into `into`."""
        e = self.engine
        while self.waiting and len(self.live) + len(self.joining) < e.max_batch:
            req = self.waiting.popleft()
            req.slot = len(self.live) + len(self.joining)
            req.admitted_step = self.steps
            req.plain, req.greedy = _plain_greedy(req.cfg), _greedy(req.cfg)
            if req.grammar is not None:
                req.plain = False
                self._matcher_set().add(req.rid, req.grammar)
            # A plain greedy row never calls its sampler (the argmaxes of admission and decode are its tokens): none is
            # made, which spares a burst of them per-row device work (the EOS ids' copy) at admission.
            req.sampler = None if req.plain else self._sampler(req)
            self.joining.append(req)
        budget = bool(self.step_tokens and decoded)
        left = self.step_tokens - decoded if budget else None
        rows: list[Request] = []
        chunks, starts = [], []
        computing: set[tuple[int, ...]] = set()  # the next uncached block (with all before it) of rows in this step
        for r in self.joining:
            if r.cached is None:
                cache = self.prefix_cache
                if cache is not None:
                    nxt = r.prompt[: cache.cached(r.prompt) + cache.block]  # its first block to compute
                    if len(nxt) < len(r.prompt) and nxt in computing:
                        break  # a row ahead computes this block now: copy it next step (arrival order: stop here)
                    r.cached = r.prefilled = cache.load(r.slot, r.prompt)  # type: ignore[arg-type]
                    computing.add(nxt)
                else:
                    r.cached = 0
            take = len(r.prompt) - r.prefilled
            if self.chunk_tokens and budget:
                take = min(take, self.chunk_tokens)
            if left is not None:
                take = min(take, left)
                left -= take
            if take <= 0:
                break
            rows.append(r)
            chunks.append(r.prompt[r.prefilled : r.prefilled + take])
            starts.append(r.prefilled)
            r.prefilled += take
            if r.prefilled < len(r.prompt):
                break  # in arrival order: the next row's prompt once this one is in
            if left is not None:
                left -= 1  # its prompt is in: this step's decode takes its next token too
        if not rows:
            return
        logits = e.prefill([r.slot for r in rows], chunks, starts)
        new = [r for r in rows if r.prefilled == len(r.prompt)]  # the first rows: at most the last one is partial
        if not new:
            return
        del self.joining[: len(new)]
        for r in new:
            r.issued = 1
        if self.prefix_cache is not None:
            self.prefix_cache.insert([(r.slot, r.prompt) for r in new])  # type: ignore[misc]
        constrained = [i for i, r in enumerate(new) if r.grammar is not None]
        scores = logits
        if constrained:  # the grammars' first masks (nothing consumed yet: no wait on the device), on a copy: the
            scores = logits.clone()  # log-probabilities are the raw logits', as the decode's are
            self._mask(scores, constrained, [new[i].rid for i in constrained])
        firsts = self._first_tokens(new, scores)
        e.tok[new[0].slot : new[0].slot + len(new)] = firsts  # type: ignore[index,operator]
        self.live.extend(new)
        base = into.add(list(new), firsts, _chosen_logprobs(logits, firsts) if logprobs else None)
        if logprobs:
            self._want_tops(into, [(base + i, r, logits[i]) for i, r in enumerate(new) if r.top_n])

    def _first_tokens(self, new: list[Request], scores: torch.Tensor) -> torch.Tensor:
        """The admitted rows' first tokens [n] from their prompts' last scores (rows [0, n) of `scores`; a partial
        chunk's row may follow): the plain greedy rows' in one argmax (a burst of them is one kernel, not one call per
        row), the others from their own samplers."""
        plain = [i for i, r in enumerate(new) if r.plain]
        if len(plain) == len(new):
            return scores[: len(new)].argmax(-1)
        firsts = torch.empty(len(new), dtype=torch.long, device=scores.device)
        if plain:
            at = to_device(plain, scores.device)
            firsts[at] = scores[at].argmax(-1)
        for i, r in enumerate(new):
            if not r.plain:
                firsts[i : i + 1] = r.sampler(scores[i : i + 1], 0)  # type: ignore[misc]
        return firsts

    def _decode(self, into: _Pending, logprobs: bool) -> tuple:
        """One token for every live slot [0, n); rows already finished (or whose finish is not read yet) ride along
        and their token is dropped. Device work only. Constrained rows are left to `_choose` (their masks need the
        previous step's tokens, read after this decode is queued), which puts the step's tokens into `into`."""
        e = self.engine
        n = len(self.live)
        e.suppress_eos((), False)  # per-row EOS rules are the rows' own samplers' business
        e.decode(list(range(n)), capture_after=GRAPH_AFTER_EAGER_STEPS)  # every live row's greedy argmax: e.tok[:n]
        logits = e.last_logits
        assert logits is not None
        rows: list[Request | None] = []
        held: dict[tuple[int, ...], list[int]] = {}  # greedy rows whose EOS is still forbidden, by EOS ids
        constrained: list[tuple[Request, int]] = []
        for r in self.live:
            t = r.issued
            if r.finish is not None or t >= r.max_new_tokens:
                rows.append(None)
                continue
            rows.append(r)
            r.issued = t + 1
            if r.grammar is not None:
                constrained.append((r, t))
                continue
            if r.plain or (r.greedy and t >= r.cfg.min_new_tokens):  # the step's own argmax
                continue
            if r.greedy:  # min_length / min_new_tokens: batched below, a few kernels in all
                held.setdefault(r.cfg.eos_ids, []).append(r.slot)  # type: ignore[arg-type]
            else:  # its own rules: penalties, sampling, transformers' processors
                e.tok[r.slot] = r.sampler(logits[r.slot : r.slot + 1], t)[0]  # type: ignore[index,misc]
        for eos, slots in held.items():
            idx, eos_t = to_device(slots, e.device), to_device(eos, e.device)  # no stream sync
            e.tok[idx] = logits[idx].float().index_fill(1, eos_t, float("-inf")).argmax(-1)
        decoded = (rows, constrained, logits, n)
        if not constrained:
            self._choose(into, decoded, logprobs)
            return None
        return decoded

    def _choose(self, into: _Pending, decoded: tuple, logprobs: bool) -> None:
        """The constrained rows' tokens of a queued decode (each row's grammar mask, computed on the host from the
        tokens read so far while the decode runs, then applied on the device before its own choice), then the
        step's tokens into `into`. A row whose matcher ended (EOS, or a finish read meanwhile) is not masked."""
        rows, constrained, logits, n = decoded
        e = self.engine
        live = [(r, t) for r, t in constrained if r.finish is None and r.rid in self._matchers.rows
                and r.rid not in self._matchers.done]  # fmt: skip
        if live:
            slots = to_device([r.slot for r, _ in live], e.device)
            all_greedy = all(r.greedy for r, _ in live)  # the usual case: the logits' dtype, one argmax (same tokens)
            scores = logits.index_select(0, slots)
            scores = scores if all_greedy else scores.float()
            self._mask(scores, None, [r.rid for r, _ in live])
            if all_greedy:
                e.tok[slots] = scores.argmax(-1)
            else:
                greedy = [j for j, (r, _) in enumerate(live) if r.greedy]
                if greedy:  # one argmax for every greedy constrained row
                    idx = to_device(greedy, e.device)
                    e.tok[to_device([live[j][0].slot for j in greedy], e.device)] = scores[idx].argmax(-1)
                for j, (r, t) in enumerate(live):
                    if not r.greedy:  # its own rules (penalties, sampling) on its masked scores
                        e.tok[r.slot] = r.sampler(scores[j : j + 1], t)[0]  # type: ignore[index,misc]
        tokens = e.tok[:n].clone()  # the step buffer is rewritten by the next decode (and by moves)
        base = into.add(rows, tokens, _chosen_logprobs(logits, tokens) if logprobs else None)
        if logprobs:
            self._want_tops(into, [(base + s, r, logits[s]) for s, r in enumerate(rows) if r is not None and r.top_n])

    def _matcher_set(self) -> Any:
        if self._matchers is None:
            from bloom_server import structured

            if self.grammars is None:
                raise ValueError("a constrained row needs the batcher's grammars (structured.Grammars)")
            self._matchers = structured.RowMatchers(self.grammars)
        return self._matchers

    def _mask(self, scores: torch.Tensor, rows: list[int] | None, rids: list[Any]) -> None:
        """scores[rows] (None: every row, in order) in place: -inf where the grammar of row id rids[i] allows nothing.
        The masks are filled on the host (llguidance's threads, in parallel over rows) and copied to the device
        without a stream sync."""
        from bloom_server import structured

        cuda = scores.device.type == "cuda"
        bitmask = self._matchers.masks(rids, pin=cuda)
        bitmask = bitmask.to(scores.device, non_blocking=True) if cuda else bitmask
        structured.apply_bitmask(scores, None if rows is None else to_device(rows, scores.device), bitmask)

    @staticmethod
    def _want_tops(into: _Pending, want: list) -> None:
        """Alternatives for rows that ask for them (computed now, on the device; read with the tokens)."""
        if not want:
            return
        n = max(r.top_n for _, r, _ in want)
        scores = torch.stack([lg for _, _, lg in want]).float().log_softmax(-1)
        values, ids = torch.topk(scores, min(n, scores.shape[-1]), dim=-1)
        into.tops.append(([(key, r.top_n) for key, r, _ in want], ids, values))

    def _process(self, p: _Pending) -> list[Request]:
        """Read a staged step's tokens (the host's one wait) and record them on their rows, in order; the
        constrained rows' matchers take their tokens first."""
        tokens, lps, tops = p.read()
        done: list[Request] = []
        if self._matchers is not None:
            fed = [(r.rid, tokens[i]) for i, r in enumerate(p.rows) if r is not None and r.finish is None
                   and r.grammar is not None]  # fmt: skip
            if fed:
                self._matchers.advance(fed)
        now = None
        rids, out, reqs = self.out_rids, self.out_tokens, self._out_reqs
        extra = self.out_extra if lps is not None else None
        for i, r in enumerate(p.rows):
            if r is None or r.finish is not None:  # rode along after its end, or its caller left
                continue
            token = tokens[i]
            toks = r.tokens
            toks.append(token)
            rids.append(r.rid)
            out.append(token)
            reqs.append(r)
            if extra is not None:
                extra.append((lps[i], tops.get(i)))  # type: ignore[index]
            if r.first_token_at is None:
                r.first_token_at = now = now or time.monotonic()
                r.first_step = self.steps
                self.out_firsts.append(r)
            if r.on_token is not None:
                r.on_token(r, token)
            end = _end(r, token, len(toks))
            if r.grammar is not None and r.rid in self._matchers.failed:  # its last mask let only EOS through
                log.warning("row %s: the grammar engine gave up: %s", r.rid, self._matchers.failed[r.rid])
                end = "grammar"
            if end is not None:
                r.finish = end
                done.append(r)
        self._ended += len(done)
        return done

    def _retire(self) -> None:
        """Free finished rows' slots; move the last live rows into the holes so the live slots stay [0, n), and the
        joining rows down after them."""
        if not self._ended:  # no live row finished or left since the last retire
            return
        self._ended = 0
        e = self.engine
        i = 0
        while i < len(self.live):
            if self.live[i].finish is None:
                i += 1
                continue
            gone = self.live[i]
            if gone.grammar is not None:
                self._matchers.drop(gone.rid)
            last = self.live.pop()
            if last is not gone:
                e.move(last.slot, i)  # type: ignore[arg-type]
                last.slot = i
                self.live[i] = last
            else:
                e.release(gone.slot)  # type: ignore[arg-type]
            gone.slot = None
        if any(r.finish is not None for r in self.joining):  # callers that left while their prompt went in
            for r in self.joining:
                if r.finish is not None:
                    if r.grammar is not None:
                        self._matchers.drop(r.rid)
                    e.release(r.slot)  # type: ignore[arg-type]
                    r.slot = None
            self.joining = [r for r in self.joining if r.finish is None]
        for k, r in enumerate(self.joining):  # slots strictly increasing: each target is free by the time it moves
            if r.slot != len(self.live) + k:
                e.move(r.slot, len(self.live) + k)  # type: ignore[arg-type]
                r.slot = len(self.live) + k


def _end(r: Request, token: int, k: int) -> str | None:
    """How a row ends with `token` as its k-th: "eos" (at or past its min_new_tokens), "length", or None."""
    end = row_end(token, k, r.max_new_tokens, r.cfg.eos_ids)
    if end is FinishReason.EOS and k <= r.cfg.min_new_tokens:  # an EOS inside min_new_tokens goes on
        end = FinishReason.LENGTH if k >= r.max_new_tokens else None
    if end is None:
        return None
    return "eos" if end is FinishReason.EOS else "length"


def _plain_greedy(cfg: SamplingConfig) -> bool:
    """The step's own argmax is this row's token at every step (no per-row rule ever applies)."""
    return _greedy(cfg) and (cfg.min_new_tokens == 0 or not cfg.eos_ids)


def _greedy(cfg: SamplingConfig) -> bool:
    """Greedy with nothing but EOS held back (what its Sampler would do: -inf on the EOS ids, then argmax)."""
    return not cfg.do_sample and cfg.repetition_penalty == 1.0 and not cfg.uses_transformers


def _chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row, without writing the [n, V] log-softmax."""
    scores = logits[: tokens.shape[0]].float()
    return scores.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scores, dim=-1)
