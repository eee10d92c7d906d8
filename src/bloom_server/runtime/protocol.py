"""Everything that crosses ranks: rank 0 decides each step, every rank runs it (runtime/lockstep.py) and the ranks
compare a digest of the result. A step is a kind and a payload; every payload and result type is here (their fields
use the request-level types of types.py). Plain dataclasses: importing this module imports nothing heavy.

  noop      nothing (heartbeat)                      generate  GenerateBatch -> GenerateOutput
  forward   ForwardBatch -> float (NLL)              cstep     CStep -> CStepResult (continuous batching)
  idle      the backend's idle work -> bool (more)   shutdown  every rank leaves its loop
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bloom_server.types import FinishReason, Grammar, SamplingParams

NOOP, GENERATE, FORWARD, SHUTDOWN, CSTEP, IDLE = "noop", "generate", "forward", "shutdown", "cstep", "idle"


@dataclass(frozen=True)
class Step:
    kind: str
    payload: Any = None


@dataclass(frozen=True)
class GenerateBatch:
    """One generate call: what rank 0 broadcasts and every rank runs.

    input_ids: one list of token ids per row (no padding; backends pad on their side).
    max_new_tokens: per row; the call runs to the largest and cuts each row at its own.
    seed: every rank seeds its RNG from it, so sampled tokens agree across tensor-parallel ranks.
    grammars: per row, the Grammar its tokens must follow, or None (empty: no row is constrained).
    """

    input_ids: tuple[tuple[int, ...], ...]
    max_new_tokens: tuple[int, ...]
    params: SamplingParams
    seed: int
    pad_token_id: int
    eos_token_id: int | None
    grammars: tuple[Grammar | None, ...] = ()


@dataclass(frozen=True)
class GenerateOutput:
    """Per row: the new token ids (prompt excluded, cut at EOS inclusive and at the row's max_new_tokens)."""

    token_ids: tuple[tuple[int, ...], ...]
    finish_reasons: tuple[FinishReason, ...]


@dataclass(frozen=True)
class ForwardBatch:
    """Negative log-likelihood of each response given its conditioning text (token ids, no padding)."""

    conditioning_ids: tuple[tuple[int, ...], ...]
    response_ids: tuple[tuple[int, ...], ...]
    pad_token_id: int


@dataclass(frozen=True)
class Join:
    """A row joining the running batch (broadcast to every rank)."""

    rid: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    params: SamplingParams
    seed: int
    eos_token_id: int | None
    pad_token_id: int
    top_n: int = 0
    grammar: Grammar | None = None  # the row's output must follow it (every rank builds the same matcher)


@dataclass(frozen=True)
class CStep:
    """One continuous step's changes: rows that join, and row ids whose callers left. `drain`: run steps until every
    row has finished (set by the runtime on a cstep submitted on its own, such as the warm-up's, rather than taken by
    the continuous loop: the backend reads a step's tokens one step later, so a lone step would leave them unread)."""

    joins: tuple[Join, ...] = ()
    leaves: tuple[int, ...] = ()
    drain: bool = False


@dataclass(frozen=True)
class CStepResult:
    """What one continuous step read on this rank. tokens: (row id, token) in the order they were chosen (pipelined:
    the previous step's decode, then the previous step's admissions' first tokens; one per row, except in a
    draining step, which holds every step it ran); finished:
    (row id, reason): "eos_token", "length", or "stopped" (it left); live: rows held after the step. extra (rank 0
    only): per token, (log-probability, top alternatives or None). firsts: (row id, steps it waited for a slot, steps
    from its admission to this read) of each row whose first token this step read (fast/rows.py Request)."""

    tokens: tuple[tuple[Any, int], ...]
    finished: tuple[tuple[Any, str], ...]
    live: int
    extra: tuple[tuple[float | None, Any], ...] | None = None
    firsts: tuple[tuple[Any, int, int], ...] = ()

    def agreed(self) -> tuple:
        """The part every rank must hold alike (the digest the ranks compare)."""
        return self.tokens, self.finished, self.live
