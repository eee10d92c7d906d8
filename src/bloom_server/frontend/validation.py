"""Semantic checks of a generate request, on rank 0 before anything is broadcast, so no rank can fail alone.

The API layer has already parsed types (strings like "true" and "10" included); here the values meet the limits of
the engine and the preconditions of transformers' `generate()`. Every failure names its field and limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bloom_server.errors import InvalidRequest
from bloom_server.types import Grammar, SamplingParams

# generate() settings that only matter when sampling: dropped for greedy requests so that greedy requests with
# leftover values still share a call (they change nothing without sampling).
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "typical_p")
# Settings whose effect depends on the padded prompt length (HF counts min_length over the padded input; penalties
# see pad tokens): rows that use them are batched only with rows of the same prompt length.
LENGTH_SENSITIVE = (
    "min_length",
    "no_repeat_ngram_size",
    "repetition_penalty",
    "exponential_decay_length_penalty",
    "encoder_no_repeat_ngram_size",
)
TOKEN_ID_FIELDS = (
    "bos_token_id",
    "pad_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
)
DEFAULT_MAX_NEW_TOKENS = 100
MAX_NGRAM = 4096
# Logits are divided by the temperature and by the repetition penalty: below this they overflow float32 (inf, then
# NaN probabilities), and the failing step would take the whole batch down with it.
MIN_DIVISOR = 1e-4
MAX_DECAY_FACTOR = 2.0


@dataclass(frozen=True)
class GenerateSpec:
    params: SamplingParams
    max_new_tokens: int
    remove_input_from_output: bool
    seed: int | None
    # Not part of the batch key: constrained and free rows share a call (each row has its own mask).
    grammar: Grammar | None = None
    grammar_field: str = "grammar"  # the request's field that gave it: an error while following it names it

    def batch_key(self, prompt_len: int) -> tuple:
        d = dict(self.params.kwargs)
        length = prompt_len if any(k in d for k in LENGTH_SENSITIVE) else None
        # A seeded sampled request runs alone (with its own prompts) so that the seed reproduces it.
        seed = self.seed if self.params.do_sample and self.seed is not None else None
        return (self.params, length, seed)


def _check(ok: bool, field: str, message: str, limit: Any = None) -> None:
    if not ok:
        raise InvalidRequest(f"{field}: {message}", field=field, limit=limit)


def _finite(field: str, v: Any) -> None:
    if isinstance(v, float):
        _check(math.isfinite(v), field, "must be a finite number")


def validate_generate(
    kwargs: dict[str, Any],
    *,
    max_new_tokens_limit: int,
    cap_max_new_tokens: bool,
    default_remove_input: bool,
    vocab_size: int,
    seed: int | None = None,
) -> GenerateSpec:
    """kwargs: only what the client set (None means unset). Returns what every rank will run."""
    kw = {k: v for k, v in kwargs.items() if v is not None}
    for k, v in kw.items():
        _finite(k, v)
    do_sample = bool(kw.get("do_sample", False))

    if "temperature" in kw and do_sample:
        _check(kw["temperature"] > 0, "temperature", "must be > 0 when do_sample is true", "> 0")
        # Dividing the logits by less overflows float32 and makes the sampling step fail (for the whole batch).
        _check(kw["temperature"] >= MIN_DIVISOR, "temperature", f"must be >= {MIN_DIVISOR}", MIN_DIVISOR)
    if "top_p" in kw:
        _check(0 < kw["top_p"] <= 1, "top_p", "must be in (0, 1]", "(0, 1]")
    if "top_k" in kw:
        _check(kw["top_k"] >= 0, "top_k", "must be >= 0 (0 disables top-k)", ">= 0")
    if "typical_p" in kw:
        _check(0 < kw["typical_p"] <= 1, "typical_p", "must be in (0, 1]", "(0, 1]")
    if "repetition_penalty" in kw:
        _check(kw["repetition_penalty"] > 0, "repetition_penalty", "must be > 0", "> 0")
        _check(
            MIN_DIVISOR <= kw["repetition_penalty"] <= 1 / MIN_DIVISOR,
            "repetition_penalty",
            f"must be in [{MIN_DIVISOR}, {1 / MIN_DIVISOR:g}]",
            f"[{MIN_DIVISOR}, {1 / MIN_DIVISOR:g}]",
        )
    for f in ("min_length", "min_new_tokens", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
        if f in kw:
            _check(kw[f] >= 0, f, "must be >= 0", ">= 0")
    for f in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
        # An n-gram longer than any sequence the engine holds means nothing, and transformers allocates by it.
        if f in kw:
            _check(kw[f] <= MAX_NGRAM, f, f"must be <= {MAX_NGRAM}", MAX_NGRAM)
    if seed is not None:
        _check(0 <= seed < 2**63, "seed", "must be in [0, 2**63)", 2**63 - 1)
    if "max_time" in kw:
        _check(kw["max_time"] > 0, "max_time", "must be > 0 seconds", "> 0")
    if "diversity_penalty" in kw:
        _check(
            kw["diversity_penalty"] == 0,
            "diversity_penalty",
            "needs group beam search (num_beam_groups > 1), which this server does not run; use 0",
            0,
        )
    for f in TOKEN_ID_FIELDS:
        if f in kw:
            ids = kw[f] if isinstance(kw[f], (list, tuple)) else [kw[f]]
            _check(
                all(isinstance(i, int) and 0 <= i < vocab_size for i in ids) and len(ids) > 0,
                f,
                f"must be a token id in [0, {vocab_size})",
                vocab_size - 1,
            )
    if "exponential_decay_length_penalty" in kw:
        start, factor = kw["exponential_decay_length_penalty"]
        _check(start >= 0 and factor > 0, "exponential_decay_length_penalty", "must be [start >= 0, factor > 0]")
        _check(
            factor <= MAX_DECAY_FACTOR,
            "exponential_decay_length_penalty",
            f"factor must be <= {MAX_DECAY_FACTOR} (larger ones overflow the end-of-sequence score)",
            MAX_DECAY_FACTOR,
        )
        # min_length holds the end-of-sequence score at -inf while the decay scales its magnitude: -inf + inf = NaN,
        # and sampling from NaN fails inside the step (fatal for every rank). Greedy decoding survives it (as the
        # original server did), so only sampling is refused.
        _check(
            not (do_sample and (kw.get("min_length") or kw.get("min_new_tokens"))),
            "exponential_decay_length_penalty",
            "cannot be combined with min_length or min_new_tokens when sampling (one holds the end of sequence back, "
            "the other pushes it forward)",
        )

    max_new = kw.pop("max_new_tokens", None)
    if max_new is None:
        max_new = min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens_limit)
    _check(max_new >= 1, "max_new_tokens", "must be >= 1", 1)
    min_new = kw.pop("min_new_tokens", None)
    if min_new is not None:
        _check(min_new <= max_new, "min_new_tokens", f"must be <= max_new_tokens ({max_new})", max_new)
    if max_new > max_new_tokens_limit:
        _check(
            cap_max_new_tokens,
            "max_new_tokens",
            f"{max_new} is more than this server allows ({max_new_tokens_limit}); "
            "ask for fewer, or have the operator raise BLOOM_MAX_NEW_TOKENS (or set BLOOM_CAP_MAX_NEW_TOKENS=true "
            "to cap instead)",
            max_new_tokens_limit,
        )
        max_new = max_new_tokens_limit
    if min_new:  # 0 changes nothing: left out, so the request batches with those that do not set it
        kw["min_new_tokens"] = min(int(min_new), int(max_new))  # capped along with max_new_tokens
    remove_input = kw.pop("remove_input_from_output", default_remove_input)
    if not do_sample:
        for f in SAMPLING_ONLY:
            kw.pop(f, None)
    if isinstance(kw.get("exponential_decay_length_penalty"), list):
        kw["exponential_decay_length_penalty"] = tuple(kw["exponential_decay_length_penalty"])
    return GenerateSpec(SamplingParams.from_dict(kw), int(max_new), bool(remove_input), seed)


def check_prompts(
    prompt_ids: list[list[int]], *, max_input_length: int, max_new_tokens: int, total_limit: int, field: str = "text"
) -> None:
    for i, ids in enumerate(prompt_ids):
        name = f"{field}[{i}]"
        _check(len(ids) > 0, name, "is empty after tokenization")
        _check(
            len(ids) <= max_input_length,
            name,
            f"is {len(ids)} tokens long; the limit is {max_input_length} (max input length)",
            max_input_length,
        )
        _check(
            len(ids) + max_new_tokens <= total_limit,
            "max_new_tokens",
            f"{name} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{len(ids) + max_new_tokens} tokens, more than the engine is built for ({total_limit})",
            total_limit - len(ids),
        )
