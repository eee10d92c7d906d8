"""Plain data passed between layers: the request-level types (sampling parameters, grammars, finish reasons, model
and rank facts). No torch, no FastAPI. The batches that cross ranks are in runtime/protocol.py."""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

# The generate() keyword arguments of the original server, in its order. All optional.
GENERATE_KWARGS: tuple[str, ...] = (
    "min_length",
    "do_sample",
    "early_stopping",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "bos_token_id",
    "pad_token_id",
    "eos_token_id",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "max_time",
    "max_new_tokens",
    "decoder_start_token_id",
    "diversity_penalty",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "remove_input_from_output",
)
# Accepted beyond the original server's: transformers' generate() takes them too.
EXTRA_GENERATE_KWARGS: tuple[str, ...] = ("min_new_tokens",)
ACCEPTED_GENERATE_KWARGS: tuple[str, ...] = GENERATE_KWARGS + EXTRA_GENERATE_KWARGS


@dataclass(frozen=True)
class Grammar:
    """What a constrained row's output must match (bloom_server.structured): kind "json_schema" (source: the schema
    as canonical JSON text), "json_object" (any JSON object; source empty) or "regex" (source: the pattern)."""

    kind: str
    source: str


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos_token"  # the model produced its end-of-sequence token
    TIME = "max_time"  # max_time ran out
    GRAMMAR = "grammar_error"  # the grammar engine gave up on the row (one of its limits): the answer is not valid


def eos_set(eos_token_id: Any) -> frozenset[int]:
    """The eos_token_id setting (one id, a list of ids, or None) as a set of ids."""
    if eos_token_id is None:
        return frozenset()
    ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,)
    return frozenset(int(t) for t in ids)


# The one end-of-row rule: a row ends at an EOS token (kept in its output) or once it holds its max_new_tokens.
# row_end is the rule token by token, cut_row the same rule over a run of tokens; every rank-0 and backend path
# that decides where a row ends calls one of them.
def row_end(token: int, count: int, limit: int, eos_ids: Collection[int]) -> FinishReason | None:
    """Whether a row ends with `token`, its `count`-th new token, given its max_new_tokens `limit`; None: it goes on."""
    if token in eos_ids:
        return FinishReason.EOS
    return FinishReason.LENGTH if count >= limit else None


def cut_row(
    tokens: Sequence[int], limit: int, eos_ids: Collection[int], have: int = 0
) -> tuple[tuple[int, ...], FinishReason | None]:
    """A row's next `tokens` (after the `have` it holds) cut by row_end: up to and including the first EOS, at most
    up to `limit` in all; with why the row ended there, or None if it goes on."""
    take = tuple(tokens[: max(0, limit - have)])
    if eos_ids:
        for i, t in enumerate(take):
            if t in eos_ids:
                return take[: i + 1], FinishReason.EOS
    return take, (FinishReason.LENGTH if have + len(take) >= limit else None)


@dataclass(frozen=True)
class SamplingParams:
    """Settings that every row of one generate call must share, as keyword arguments for `generate()`.

    `kwargs` holds only what the client set (validated), never max_new_tokens: the batch runs to the largest
    max_new_tokens of its rows and each row is cut at its own.
    """

    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        return cls(tuple(sorted((k, _freeze(v)) for k, v in d.items())))

    def as_dict(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.kwargs}

    @property
    def do_sample(self) -> bool:
        return bool(dict(self.kwargs).get("do_sample", False))


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _thaw(v: Any) -> Any:
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


@dataclass(frozen=True)
class ModelInfo:
    """What the loaded model is, as rank 0 reports it."""

    model_id: str
    model_dir: str
    backend: str
    dtype: str
    world_size: int
    revision: str | None = None
    max_total_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RankContext:
    """Where this process sits among the launcher's ranks. Built by the runtime, read by backends."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_type: str = "cpu"  # "cuda" or "cpu"

    @property
    def is_leader(self) -> bool:
        return self.rank == 0
