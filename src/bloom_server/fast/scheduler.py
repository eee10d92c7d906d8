"""Continuous batching over FastEngine's slots: requests join the running batch at step boundaries and leave it the
step they finish, freeing their slot (TGI's batch `filter` / `concatenate`, done as slot moves in a static cache).

Each `step()`:
  1. admit: waiting requests take the free slots after the live ones (slots stay a prefix [0, n)) and are
     prefilled together; each gets its first token;
  2. decode: one token for every live row (the engine's captured step; rows that need more than the step's own
     greedy argmax use their own sampler on their row of the logits);
  3. retire: rows that produced an EOS (at or after their min_new_tokens) or reached their max_new_tokens leave; the
     last live row moves into each hole, so the live slots stay a prefix and the fast path stays usable.
Tokens are read to the host once per step (to see EOS and to stream them); on the GPU that read overlaps nothing,
which is the price of step-level scheduling.

This runs on one rank. Under tensor parallelism every rank must make the same admissions, which the lockstep
runtime would broadcast as a step (join/leave lists) before each step: not wired yet.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bloom_server.fast.engine import FastEngine
from bloom_server.fast.sampling import Sampler, SamplingConfig


@dataclass(eq=False)
class Request:
    rid: Any
    prompt: tuple[int, ...]
    max_new_tokens: int
    cfg: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    on_token: Callable[["Request", int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "eos" | "length"
    slot: int | None = None
    sampler: Sampler | None = None
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


class ContinuousBatcher:
    def __init__(self, engine: FastEngine):
        self.engine = engine
        self.waiting: collections.deque[Request] = collections.deque()
        self.live: list[Request] = []  # live[i] sits in slot i
        self.steps = 0

    def add(self, req: Request) -> None:
        if len(req.prompt) + req.max_new_tokens > self.engine.max_seq:
            raise ValueError(f"{len(req.prompt)} + {req.max_new_tokens} tokens; a slot holds {self.engine.max_seq}")
        self.waiting.append(req)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.live

    # ---- one step ----

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit, decode, retire. Returns the requests that finished in this step."""
        finished = self._admit()
        if self.live:
            finished += self._decode()
        self._retire()
        self.steps += 1
        return finished

    def run(self) -> None:
        while not self.idle:
            self.step()

    def _sampler(self, req: Request) -> Sampler:
        return Sampler(req.cfg, [req.prompt], vocab_size=self.engine.shape.vocab_size, device=self.engine.device,
                       seed=req.seed, max_new_tokens=req.max_new_tokens)  # fmt: skip

    def _admit(self) -> list[Request]:
        e = self.engine
        new: list[Request] = []
        while self.waiting and len(self.live) + len(new) < e.max_batch:
            req = self.waiting.popleft()
            req.slot = len(self.live) + len(new)
            req.sampler = self._sampler(req)
            new.append(req)
        if not new:
            return []
        logits = e.prefill([r.slot for r in new], [r.prompt for r in new])  # type: ignore[misc]
        firsts = torch.cat([r.sampler(logits[i : i + 1], 0) for i, r in enumerate(new)])  # type: ignore[misc]
        e.tok[new[0].slot : new[0].slot + len(new)] = firsts  # type: ignore[index,operator]
        self.live.extend(new)
        done = []
        now = time.monotonic()
        for r, t in zip(new, firsts.tolist()):
            r.first_token_at = now
            if self._take(r, t):
                done.append(r)
        return done

    def _decode(self) -> list[Request]:
        e = self.engine
        n = len(self.live)
        rows = [r for r in self.live if r.finish is None]
        if not rows:
            return []
        e.suppress_eos((), False)  # per-row EOS rules are the rows' own samplers' business
        e.decode(list(range(n)))  # greedy argmax of every live row now sits in e.tok[:n]
        logits = e.last_logits
        for r in rows:
            t = len(r.tokens)
            if not self._greedy_now(r, t):  # its own rules: penalties, sampling, EOS held back, ...
                e.tok[r.slot] = r.sampler(logits[r.slot : r.slot + 1], t)[0]  # type: ignore[index,misc]
        tokens = e.tok[:n].tolist()  # the step's one host read
        return [r for r in rows if self._take(r, tokens[r.slot])]  # type: ignore[index]

    @staticmethod
    def _greedy_now(r: Request, t: int) -> bool:
        """Can this row take the step's own argmax at token t?"""
        cfg = r.cfg
        return (
            not cfg.do_sample
            and cfg.repetition_penalty == 1.0
            and not cfg.uses_transformers
            and (t >= cfg.min_new_tokens or not cfg.eos_ids)
        )

    def _take(self, r: Request, token: int) -> bool:
        """Record a row's new token; True when it finished with it."""
        r.tokens.append(token)
        if r.on_token is not None:
            r.on_token(r, token)
        if token in r.cfg.eos_ids and len(r.tokens) > r.cfg.min_new_tokens:
            r.finish = "eos"
        elif len(r.tokens) >= r.max_new_tokens:
            r.finish = "length"
        return r.finish is not None

    def _retire(self) -> None:
        """Free finished rows' slots; move the last live rows into the holes so the live slots stay [0, n)."""
        e = self.engine
        i = 0
        while i < len(self.live):
            if self.live[i].finish is None:
                i += 1
                continue
            gone = self.live[i]
            last = self.live.pop()
            if last is not gone:
                e.move(last.slot, i)  # type: ignore[arg-type]
                last.slot = i
                self.live[i] = last
            else:
                e.release(gone.slot)  # type: ignore[arg-type]
            gone.slot = None
