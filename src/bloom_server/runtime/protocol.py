"""Everything that crosses ranks: rank 0 decides each step, every rank runs it (runtime/lockstep.py) and the ranks
compare a digest of the result. A step is a kind and a payload; the payload types are here, or, for the whole-call
batches that the other layers build too, in types.py (re-exported here so that this module is the one list).

  noop      nothing (heartbeat)                      generate  GenerateBatch -> GenerateOutput
  forward   ForwardBatch -> float (NLL)              cstep     CStep -> CStepResult (continuous batching)
  shutdown  every rank leaves its loop
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bloom_server.types import ForwardBatch, GenerateBatch, GenerateOutput, Grammar, SamplingParams

__all__ = ["CSTEP", "FORWARD", "GENERATE", "NOOP", "SHUTDOWN", "CStep", "CStepResult", "ForwardBatch",
           "GenerateBatch", "GenerateOutput", "Join", "SamplingParams", "Step"]  # fmt: skip

NOOP, GENERATE, FORWARD, SHUTDOWN, CSTEP = "noop", "generate", "forward", "shutdown", "cstep"


@dataclass(frozen=True)
class Step:
    kind: str
    payload: Any = None


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
    only): per token, (log-probability, top alternatives or None)."""

    tokens: tuple[tuple[Any, int], ...]
    finished: tuple[tuple[Any, str], ...]
    live: int
    extra: tuple[tuple[float | None, Any], ...] | None = None

    def agreed(self) -> tuple:
        """The part every rank must hold alike (the digest the ranks compare)."""
        return self.tokens, self.finished, self.live
