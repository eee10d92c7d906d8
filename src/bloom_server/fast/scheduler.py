"""Continuous batching over FastEngine's slots: requests join the running batch at step boundaries and leave it the
step they finish, freeing their slot (TGI's batch `filter` / `concatenate`, done as slot moves in a static cache).

Each `step()`:
  0. leave: rows whose callers left (`leave(rid)`) are retired before anything runs, so their slots are free for
     this step's admissions;
  1. admit: waiting requests take the free slots after the live ones (slots stay a prefix [0, n)) and are
     prefilled together; each gets its first token from its own sampler;
  2. decode: one token for every live row, the new ones included (the engine's captured step; rows that need more
     than the step's own greedy argmax use their own sampler on their row of the logits);
  3. retire: rows that produced an EOS (at or after their min_new_tokens) or reached their max_new_tokens leave; the
     last live row moves into each hole, so the live slots stay a prefix and the fast path stays usable.
The step's tokens (the admitted rows' first tokens and every row's decoded token, with their log-probabilities when
asked) reach the host in one read: the step's one host sync. A row whose first token already finished it is decoded
once more with the others and that token is dropped (cheaper than a second sync).

Each row samples with its own seeded generator, so a row's tokens do not depend on which rows share its steps.
Under tensor parallelism every rank runs the same `leave`/`add`/`step` calls (the lockstep runtime broadcasts them
as one "cstep" per step; see backends/fast.py), so every rank makes the same admissions and retirements.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bloom_server.fast.engine import FastEngine
from bloom_server.fast.sampling import Sampler, SamplingConfig

STOPPED = "stopped"  # finish of a row whose caller left (leave())


@dataclass(eq=False)
class Request:
    rid: Any
    prompt: tuple[int, ...]
    max_new_tokens: int
    cfg: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    on_token: Callable[["Request", int], None] | None = None
    top_n: int = 0  # alternatives per token to report (with step(logprobs=True))
    pad_token_id: int = 0
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "eos" | "length" | "stopped"
    slot: int | None = None
    sampler: Sampler | None = None
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


@dataclass
class Emitted:
    """One token a step gave one row (the step's output, in order)."""

    req: Request
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class ContinuousBatcher:
    def __init__(self, engine: FastEngine):
        self.engine = engine
        self.waiting: collections.deque[Request] = collections.deque()
        self.live: list[Request] = []  # live[i] sits in slot i
        self.steps = 0
        self.emitted: list[Emitted] = []  # what the latest step produced

    def add(self, req: Request) -> None:
        if len(req.prompt) + req.max_new_tokens > self.engine.max_seq:
            raise ValueError(f"{len(req.prompt)} + {req.max_new_tokens} tokens; a slot holds {self.engine.max_seq}")
        if not req.prompt or req.max_new_tokens < 1:
            raise ValueError("a request needs a prompt and at least one new token")
        self.waiting.append(req)

    def leave(self, rid: Any) -> Request | None:
        """The row's caller left: a waiting row is dropped, a live one is retired at the start of the next step.
        Returns the request (finish "stopped") or None when the row is unknown or already finished."""
        for r in self.waiting:
            if r.rid == rid:
                self.waiting.remove(r)
                r.finish = STOPPED
                return r
        for r in self.live:
            if r.rid == rid and r.finish is None:
                r.finish = STOPPED
                return r
        return None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.live

    # ---- one step ----

    @torch.inference_mode()
    def step(self, logprobs: bool = False) -> list[Request]:
        """Leave, admit, decode, retire. Returns the requests that finished by EOS or length in this step (those
        that left are `leave()`'s to report). `self.emitted` holds the step's tokens; with `logprobs`, each with its
        log-probability under the raw logits and, for rows with `top_n`, the most likely alternatives."""
        self._retire()  # rows that left since the previous step: their slots are free for this step's admissions
        self.emitted = []
        new, first, first_logits = self._admit()
        decoded, logits = None, None
        if any(r.finish is None and r.max_new_tokens > 1 for r in self.live):
            decoded, logits = self._decode()
        finished = self._read(new, first, first_logits, decoded, logits, logprobs)
        self._retire()
        self.steps += 1
        return finished

    def run(self) -> None:
        while not self.idle:
            self.step()

    def _sampler(self, req: Request) -> Sampler:
        return Sampler(req.cfg, [req.prompt], vocab_size=self.engine.shape.vocab_size, device=self.engine.device,
                       seed=req.seed, max_new_tokens=req.max_new_tokens, pad_token_id=req.pad_token_id)  # fmt: skip

    def _admit(self) -> tuple[list[Request], torch.Tensor | None, torch.Tensor | None]:
        e = self.engine
        new: list[Request] = []
        while self.waiting and len(self.live) + len(new) < e.max_batch:
            req = self.waiting.popleft()
            req.slot = len(self.live) + len(new)
            req.sampler = self._sampler(req)
            new.append(req)
        if not new:
            return [], None, None
        logits = e.prefill([r.slot for r in new], [r.prompt for r in new])  # type: ignore[misc]
        firsts = torch.cat([r.sampler(logits[i : i + 1], 0) for i, r in enumerate(new)])  # type: ignore[misc]
        e.tok[new[0].slot : new[0].slot + len(new)] = firsts  # type: ignore[index,operator]
        self.live.extend(new)
        now = time.monotonic()
        for r in new:
            r.first_token_at = now
        return new, firsts, logits

    def _decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for every live slot [0, n) (rows already finished ride along; their token is dropped)."""
        e = self.engine
        n = len(self.live)
        e.suppress_eos((), False)  # per-row EOS rules are the rows' own samplers' business
        e.decode(list(range(n)))  # greedy argmax of every live row now sits in e.tok[:n]
        logits = e.last_logits
        assert logits is not None
        held: dict[tuple[int, ...], list[int]] = {}  # greedy rows whose EOS is still forbidden, by EOS ids
        for r in self.live:
            if r.finish is not None or r.max_new_tokens == 1:
                continue
            t = len(r.tokens) or 1  # a row admitted in this step has its first token, not recorded yet
            if self._greedy_now(r, t):
                continue
            if self._greedy_but_eos(r):  # min_length / min_new_tokens: batched below, a few kernels in all
                held.setdefault(r.cfg.eos_ids, []).append(r.slot)  # type: ignore[arg-type]
            else:  # its own rules: penalties, sampling, transformers' processors
                e.tok[r.slot] = r.sampler(logits[r.slot : r.slot + 1], t)[0]  # type: ignore[index,misc]
        for eos, slots in held.items():
            rows = torch.tensor(slots, dtype=torch.long, device=e.device)
            eos_t = torch.tensor(eos, dtype=torch.long, device=e.device)
            e.tok[rows] = logits[rows].float().index_fill(1, eos_t, float("-inf")).argmax(-1)
        return e.tok[:n], logits

    @staticmethod
    def _greedy_but_eos(r: Request) -> bool:
        """Greedy with nothing but EOS held back (what its Sampler would do: -inf on the EOS ids, then argmax)."""
        cfg = r.cfg
        return not cfg.do_sample and cfg.repetition_penalty == 1.0 and not cfg.uses_transformers

    def _read(self, new, first, first_logits, decoded, logits, logprobs: bool) -> list[Request]:
        """The step's one host read: first tokens of admitted rows, then the decoded token of every slot."""
        parts = [x for x in (first, decoded) if x is not None]
        if not parts:
            return []
        tokens = torch.cat(parts)
        lps = None
        if logprobs:
            lp_parts = []
            if first is not None:
                lp_parts.append(_chosen_logprobs(first_logits, first))
            if decoded is not None:
                lp_parts.append(_chosen_logprobs(logits, decoded))
            lps = torch.cat(lp_parts)
            host = torch.stack([tokens.double(), lps.double()]).tolist()  # token ids are exact in float64
            tok_host, lp_host = [int(t) for t in host[0]], host[1]
        else:
            tok_host, lp_host = tokens.tolist(), None
        tops: dict[int, list] = {}
        if logprobs:
            tops = self._tops(new, first_logits, logits, len(new) if first is not None else 0)
        done: list[Request] = []
        k = len(new) if first is not None else 0
        for i, r in enumerate(new):
            if self._take(r, tok_host[i], None if lp_host is None else lp_host[i], tops.get(i)):
                done.append(r)
        if decoded is not None:
            for slot, r in enumerate(self.live):
                if r.finish is not None:
                    continue
                j = k + slot
                if self._take(r, tok_host[j], None if lp_host is None else lp_host[j], tops.get(j)):
                    done.append(r)
        return done

    def _tops(self, new, first_logits, logits, k: int) -> dict[int, list]:
        """Alternatives for rows that ask for them, keyed like the step's token list (one more host read)."""
        want = [(i, r.top_n, first_logits[i]) for i, r in enumerate(new) if r.top_n and first_logits is not None]
        if logits is not None:
            want += [(k + s, r.top_n, logits[s]) for s, r in enumerate(self.live) if r.top_n and r.finish is None]
        if not want:
            return {}
        n = max(t for _, t, _ in want)
        rows = torch.stack([lg for _, _, lg in want]).float().log_softmax(-1)
        values, ids = torch.topk(rows, min(n, rows.shape[-1]), dim=-1)
        ids_h, values_h = ids.tolist(), values.tolist()
        return {key: list(zip(ids_h[i][:t], values_h[i][:t])) for i, (key, t, _) in enumerate(want)}

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

    def _take(self, r: Request, token: int, logprob: float | None = None, top: list | None = None) -> bool:
        """Record a row's new token; True when it finished with it."""
        r.tokens.append(token)
        self.emitted.append(Emitted(r, token, logprob, top))
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


def _chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row, without writing the [n, V] log-softmax."""
    scores = logits[: tokens.shape[0]].float()
    return scores.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scores, dim=-1)
