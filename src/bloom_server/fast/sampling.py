"""Choosing the next token on the device, with the meaning transformers' `generate()` gives each setting.

The common settings (greedy, temperature, top-k, top-p, repetition_penalty, min_length) are done here with a few
tensor ops and no host syncs; sampling draws from a seeded device generator (argmax of probs / Exp(1) noise, which
samples from probs without the host round trip of multinomial). The rare ones (typical_p, no_repeat_ngram_size,
forced_bos/eos_token_id, exponential_decay_length_penalty) are run through transformers' own logits processors, in
generate()'s order, on the full token history: exact semantics, at the cost of a slower step for those requests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from bloom_server.types import eos_set

log = logging.getLogger(__name__)

# transformers' GenerationConfig defaults that matter here: sampling without top_k uses top_k=50 there.
HF_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
}
RARE = ("typical_p", "no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id",
        "exponential_decay_length_penalty")  # fmt: skip


@dataclass(frozen=True)
class SamplingConfig:
    """One generate call's settings (shared by its rows)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # EOS is forbidden before this many new tokens
    eos_ids: tuple[int, ...] = ()
    typical_p: float = 1.0
    no_repeat_ngram_size: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None
    # The engine's captured step suppresses EOS itself before min_new_tokens (greedy needs no logits then).
    in_graph_eos: bool = True

    @classmethod
    def from_generate_kwargs(
        cls,
        kwargs: dict[str, Any],
        *,
        eos_token_id: int | Sequence[int] | None,
        prompt_width: int,
        defaults: dict[str, Any] | None = None,
    ) -> SamplingConfig:
        """kwargs as the server validated them (transformers names). prompt_width: the longest prompt of the call,
        which is what transformers counts min_length from (its left-padded input). min_new_tokens (not an API
        setting; the benchmark forces its token count with it) is honoured too."""
        d = {**HF_DEFAULTS, **(defaults or {}), **kwargs}
        eos = d.get("eos_token_id", eos_token_id)
        eos_ids = tuple(sorted(eos_set(eos)))
        do_sample = bool(d.get("do_sample", False))
        forced_eos = d.get("forced_eos_token_id")
        decay = d.get("exponential_decay_length_penalty")
        cfg = cls(
            do_sample=do_sample,
            temperature=float(d["temperature"]) if do_sample else 1.0,
            top_k=int(d["top_k"] or 0) if do_sample else 0,
            top_p=float(d["top_p"]) if do_sample else 1.0,
            repetition_penalty=float(d["repetition_penalty"]),
            min_new_tokens=max(int(d.get("min_length") or 0) - prompt_width, int(d.get("min_new_tokens") or 0), 0)
            if eos_ids
            else 0,
            eos_ids=eos_ids,
            typical_p=float(d["typical_p"]) if do_sample else 1.0,
            no_repeat_ngram_size=int(d.get("no_repeat_ngram_size") or 0),
            forced_bos_token_id=d.get("forced_bos_token_id"),
            forced_eos_token_id=(tuple(forced_eos) if isinstance(forced_eos, (list, tuple)) else (forced_eos,))
            if forced_eos is not None
            else None,
            exponential_decay_length_penalty=tuple(decay) if decay is not None else None,  # type: ignore[arg-type]
        )
        if int(d.get("encoder_no_repeat_ngram_size") or 0) > 0:
            log.warning("encoder_no_repeat_ngram_size needs an encoder-decoder model; ignored for BLOOM")
        return cfg

    @property
    def uses_transformers(self) -> bool:
        return (
            (self.do_sample and self.typical_p < 1.0)
            or self.no_repeat_ngram_size > 0
            or self.forced_bos_token_id is not None
            or self.forced_eos_token_id is not None
            or (self.exponential_decay_length_penalty is not None and bool(self.eos_ids))
        )

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: the engine's captured step already computes it, no logits leave the graph."""
        return (
            not self.do_sample
            and self.repetition_penalty == 1.0
            and (self.min_new_tokens == 0 or self.in_graph_eos)
            and not self.uses_transformers
        )

    def greedy(self) -> SamplingConfig:
        return replace(self, do_sample=False)


def to_device(data: Any, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list or CPU tensor on `device`, queued like a kernel: a plain host-to-device copy waits for the stream
    to drain first (PyTorch syncs after a blocking copy), which would stall the continuous batcher behind the decode
    it queued ahead (fast/rows.py); from pinned memory the copy is asynchronous (the caching host allocator keeps
    the pinned block until the copy is done)."""
    device = torch.device(device)
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Sampler:
    """Per generate call: picks each row's next token from [n, V] logits. `step` counts tokens chosen so far."""

    def __init__(
        self,
        cfg: SamplingConfig,
        prompts: Sequence[Sequence[int]],
        *,
        vocab_size: int,
        device: torch.device | str,
        seed: int = 0,
        max_new_tokens: int = 1,
        pad_token_id: int = 0,
    ):
        self.cfg = cfg
        n = len(prompts)
        self.device = torch.device(device)
        self.generator: torch.Generator | None = None
        if cfg.do_sample:
            self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.eos = to_device(cfg.eos_ids, self.device) if cfg.eos_ids else None
        self.seen: torch.Tensor | None = None
        if cfg.repetition_penalty != 1.0 and not cfg.uses_transformers:
            # [n, V] bool: tokens already in each row (prompt + generated), updated as tokens are chosen.
            self.seen = torch.zeros((n, vocab_size), dtype=torch.bool, device=self.device)
            for i, p in enumerate(prompts):
                if p:
                    self.seen[i, to_device(list(p), self.device)] = True
        self.hf: list[Any] | None = None
        if cfg.uses_transformers:
            self._init_transformers(prompts, max_new_tokens, pad_token_id)

    # ---- the transformers path (rare settings) ----

    def _init_transformers(self, prompts: Sequence[Sequence[int]], max_new: int, pad: int) -> None:
        from transformers.generation import logits_process as lp

        cfg, dev = self.cfg, self.device
        P = max(len(p) for p in prompts)
        self.width = P
        # [n, P + max_new]: the history transformers' processors read, left-padded as generate() pads it.
        self.seq = torch.full((len(prompts), P + max_new), pad, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            if p:
                self.seq[i, P - len(p) : P] = to_device(list(p), dev)
        eos = list(cfg.eos_ids)
        procs: list[Any] = []
        if cfg.repetition_penalty != 1.0:
            procs.append(lp.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
        if cfg.no_repeat_ngram_size > 0:
            procs.append(lp.NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
        if cfg.min_new_tokens > 0 and eos:
            procs.append(lp.MinLengthLogitsProcessor(P + cfg.min_new_tokens, eos, device=str(dev)))
        if cfg.forced_bos_token_id is not None:
            procs.append(lp.ForcedBOSTokenLogitsProcessor(cfg.forced_bos_token_id))
        if cfg.forced_eos_token_id is not None:
            procs.append(lp.ForcedEOSTokenLogitsProcessor(P + max_new, list(cfg.forced_eos_token_id), device=str(dev)))
        if cfg.exponential_decay_length_penalty is not None and eos:
            procs.append(lp.ExponentialDecayLengthPenalty(cfg.exponential_decay_length_penalty, eos, P))
        if cfg.do_sample:
            if cfg.temperature != 1.0:
                procs.append(lp.TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_k:
                procs.append(lp.TopKLogitsWarper(cfg.top_k))
            if cfg.top_p < 1.0:
                procs.append(lp.TopPLogitsWarper(cfg.top_p))
            if cfg.typical_p < 1.0:
                procs.append(lp.TypicalLogitsWarper(cfg.typical_p))
        self.hf = procs

    # ---- the common path ----

    def _process(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """scores [n, V] fp32 -> processed scores (greedy: argmax of these; sampling: softmax of these)."""
        cfg = self.cfg
        if self.seen is not None:
            # A seen token's score is divided by the penalty when positive, multiplied when negative.
            p = cfg.repetition_penalty
            scores = torch.where(self.seen, torch.where(scores > 0, scores / p, scores * p), scores)
        if self.eos is not None and step < cfg.min_new_tokens:
            scores = scores.index_fill(1, self.eos, float("-inf"))
        if not cfg.do_sample:
            return scores
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k or cfg.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # [n, V]
            drop = torch.zeros_like(sorted_scores, dtype=torch.bool)
            if cfg.top_k:
                k = min(cfg.top_k, scores.shape[-1])
                # Ties with the k-th score survive, as a threshold on the value keeps them.
                drop |= sorted_scores < sorted_scores[:, k - 1 : k]
            if cfg.top_p < 1.0:
                probs = torch.softmax(sorted_scores.masked_fill(drop, float("-inf")), dim=-1)
                # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
                before = torch.cumsum(probs, dim=-1) - probs
                drop |= before >= cfg.top_p
                drop[:, 0] = False
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
        return scores

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """logits [n, V] (any float dtype) -> next tokens [n] long, on the device, without a host sync."""
        scores = logits.float()
        if self.hf is not None:
            cur = self.seq[:, : self.width + step]
            for proc in self.hf:
                scores = proc(cur, scores)
        else:
            scores = self._process(scores, step)
        if self.cfg.do_sample:
            probs = torch.softmax(scores, dim=-1)
            noise = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
            tokens = torch.argmax(probs / noise, dim=-1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        self.observe(tokens, step)
        return tokens

    def observe(self, tokens: torch.Tensor, step: int) -> None:
        """Record the chosen tokens [n] (also those chosen inside the captured step, for plain greedy)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.hf is not None:
            self.seq[:, self.width + step] = tokens
