"""Structured output's grammar engine: grammars (types.Grammar: JSON schema, JSON object, regex; api/grammar.py builds
them from each surface's fields) compiled by llguidance and turned into per-row allowed-token masks.

Used on rank 0 by the frontend (check a grammar before anything is queued) and on every rank in sampling, by the
backends and the fast engine's batcher (one matcher per constrained row, advanced by the row's tokens; the next mask
filled from it). Because the frontend and the fast engine may not import each other, it sits below both: it imports
only the leaf modules (tests/test_layers.py). Every rank computes the same masks from the same tokens (a matcher is a
deterministic function of the grammar and the tokens so far), so nothing is broadcast per step and the lockstep
digest of the tokens still compares the ranks.

llguidance rather than xgrammar or outlines-core: on a BLOOM-sized vocabulary it compiles schemas far faster, and it
is the one that enforces every keyword it accepts (docs/results/structured-output.md).
llguidance and torch are imported inside functions: importing this module does nothing.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloom_server import host
from bloom_server.errors import InvalidRequest
from bloom_server.types import Grammar

if TYPE_CHECKING:
    import torch

# Compiled grammars kept (LRU): a repeated schema (the usual case for a program calling the server) is not compiled
# again; the bound keeps memory flat whatever clients send.
CACHE_ENTRIES = 256
# A row's matcher is a copy of a kept one (microseconds; a compile takes 0.3-7 ms). Copies of one matcher share its
# lexer behind one lock, so rows copied from one fill their masks about one at a time: each grammar keeps as many
# independent matchers as the fill pool has threads, and rows take copies of them in turn, for at most
# TEMPLATE_GRAMMARS grammars (LRU) (docs/results/structured-output.md).
TEMPLATE_GRAMMARS = 16
# llguidance's own resource limits, tighter than its defaults where a hostile grammar could cost memory or time:
# lexer states are about 1-2 kB each, and a mask step's fuel is its CPU time (about 14k per ms).
LIMITS = dict(max_lexer_states=50_000, max_grammar_size=100_000, initial_lexer_fuel=1_000_000,
              step_lexer_fuel=200_000, step_max_items=50_000)  # fmt: skip
# Compact JSON (no free whitespace between tokens): a model cannot pad an answer with endless blanks.
JSON_OPTIONS = {"whitespace_flexible": False}


def available() -> str | None:
    """None when the grammar engine can be imported, else why not."""
    try:
        import llguidance  # noqa: F401
    except ImportError as exc:
        return f"the grammar engine (llguidance) is not installed: {exc}"
    return None


def _limits() -> Any:
    import llguidance

    return llguidance.LLParserLimits(**LIMITS)


def _grammar_text(g: Grammar) -> str:
    import llguidance

    if g.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(g.source)
    schema = {"type": "object"} if g.kind == "json_object" else json.loads(g.source)
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


class Grammars:
    """One per process: the grammar engine's view of the tokenizer and the cache of checked grammars. Thread-safe
    (rank 0 checks on the event loop, the engine thread builds matchers)."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: tuple[int, ...], templates: int | None = None):
        import llguidance

        # n_vocab: the model's logits width (BLOOM pads its embedding past the tokenizer's ids); ids past the
        # tokenizer's are never allowed.
        self.tokenizer = llguidance.LLTokenizer(str(tokenizer_json), n_vocab=vocab_size,
                                                eos_token=list(eos_ids) or None)  # fmt: skip
        self.vocab_size = vocab_size
        self._cache: collections.OrderedDict[Grammar, tuple[str, str]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._executor: Any = None
        self.threads = min(32, host.cpus_per_rank())  # the fill pool's: this rank's share of the CPUs
        self.templates = templates or self.threads  # independent matchers kept per grammar
        self._templates: collections.OrderedDict[Grammar, tuple[list[Any], Any]] = collections.OrderedDict()

    @classmethod
    def for_model(cls, model_dir: Path, eos_ids: tuple[int, ...], vocab_size: int | None = None) -> Grammars:
        if vocab_size is None:
            vocab_size = int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
        return cls(Path(model_dir) / "tokenizer.json", vocab_size, eos_ids)

    def compiled(self, g: Grammar) -> tuple[str, str]:
        """(llguidance grammar, error or ""), cached."""
        with self._lock:
            hit = self._cache.get(g)
            if hit is not None:
                self._cache.move_to_end(g)
                return hit
        import llguidance

        try:
            text = _grammar_text(g)
            error = llguidance.LLMatcher.validate_grammar(text, self.tokenizer, limits=_limits())
            if not error:
                # A grammar that compiles may still match no text (a $ref that only refers to itself, an empty
                # character class): its matcher fails on its first mask, and a row would end at once with nothing.
                probe = llguidance.LLMatcher(self.tokenizer, text, limits=_limits())
                probe.compute_bitmask()
                if probe.is_error():
                    error = "no text matches this grammar"
        except (ValueError, TypeError) as exc:
            text, error = "", str(exc)
        out = (text, error)
        with self._lock:
            self._cache[g] = out
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return out

    def check(self, g: Grammar, field: str) -> None:
        """Raise InvalidRequest naming `field` when the grammar does not compile (bad schema, bad regex,
        unsupported keyword, over the limits)."""
        _, error = self.compiled(g)
        if error:
            raise InvalidRequest(f"{field}: {_first_line(error)}", field=field)

    def matcher(self, g: Grammar) -> Any:
        """A fresh matcher of a grammar that `check` passed: a copy of the grammar's kept matchers, each in turn
        (compiled from the cached grammar text the first time each is needed)."""
        import llguidance

        text, error = self.compiled(g)
        if error:
            raise ValueError(error)
        with self._lock:
            kept = self._templates.get(g)
            if kept is None:
                kept = self._templates[g] = ([], itertools.count())
                while len(self._templates) > TEMPLATE_GRAMMARS:
                    self._templates.popitem(last=False)
            else:
                self._templates.move_to_end(g)
            i = next(kept[1]) % self.templates
            template = kept[0][i] if i < len(kept[0]) else None
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, text, limits=_limits())
            with self._lock:
                if len(kept[0]) < self.templates:
                    kept[0].append(template)
        return template.deep_copy()

    def _pool(self) -> Any:
        """llguidance's thread pool, one per process: as many threads as this rank's share of the CPUs (its default
        takes 80% of the affinity mask, which leaves a 2-core host one thread, and ignores a container's quota)."""
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=self.threads)
        return self._executor

    def fill(self, matchers: list[tuple[Any, int]], bitmask: torch.Tensor) -> None:
        """Each (matcher, row) writes its allowed tokens into row `row` of `bitmask` ([rows, words] int32, CPU,
        contiguous), in parallel on llguidance's threads (the GIL is released): the call lasts about as long as
        its slowest row, not the sum of the rows."""
        self._pool().unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


def _first_line(error: str) -> str:
    """The engine's error on one line (its regex errors span several), bounded."""
    line = " ".join(part.strip() for part in error.strip().splitlines() if part.strip()) or "invalid grammar"
    return line[:400]


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[k, words] int32 (token t is bit t % 32 of word t // 32) -> [k, vocab_size] bool, on the bitmask's device. Read
    as bytes (token t: bit t % 8 of byte t // 8, the words being little-endian): the unpacked temporary is a byte per
    token, not an int32."""
    import torch

    bits = bitmask.contiguous().view(torch.uint8)  # [k, 4 * words]
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor | None, bitmask: torch.Tensor) -> None:
    """logits [n, V] in place: in each of `rows` ([k] long, on logits' device; None: every row, in order, k = n),
    tokens whose bit is 0 in the matching row of `bitmask` ([k, words] int32, on logits' device) get -inf. A few
    elementwise kernels, no sync; with rows None no copies of the logits."""
    blocked = allowed_tokens(bitmask, logits.shape[1]).logical_not_()
    if rows is None:
        logits.masked_fill_(blocked, float("-inf"))
        return
    sub = logits.index_select(0, rows)
    logits.index_copy_(0, rows, sub.masked_fill_(blocked, float("-inf")))


class RowMatchers:
    """The matchers of one batch's constrained rows (keyed by any hashable row id), on one rank. `advance` feeds
    rows their chosen tokens; `masks` fills the next masks of the rows still under their grammar, on the caller's
    thread (a fill on a worker thread measured slower: docs/results/structured-output.md). `fill_s`: host seconds
    the fills took."""

    def __init__(self, grammars: Grammars):
        self.grammars = grammars
        self.rows: dict[Any, Any] = {}
        self.done: set[Any] = set()  # ended (EOS taken, or the token broke the grammar): masks no longer apply
        # Rows whose matcher failed (one of the engine's limits reached while following the grammar), with the
        # engine's reason: their last mask let only EOS through, so their output must not count as an answer.
        self.failed: dict[Any, str] = {}
        self.fill_s = 0.0

    def add(self, key: Any, g: Grammar) -> None:
        self.rows[key] = self.grammars.matcher(g)
        self.done.discard(key)

    def drop(self, key: Any) -> None:
        self.rows.pop(key, None)
        self.done.discard(key)
        self.failed.pop(key, None)

    def _check_failed(self, key: Any, m: Any) -> None:
        if m.is_error():
            self.failed[key] = _first_line(m.get_error())
            self.done.add(key)

    def __contains__(self, key: Any) -> bool:
        return key in self.rows

    def advance(self, pairs: list[tuple[Any, int]]) -> None:
        """Feed each (key, token) its row's token; a row whose matcher had stopped or refuses the token is done.
        Unknown and done rows are skipped."""
        for key, token in pairs:
            m = self.rows.get(key)
            if m is None or key in self.done:
                continue
            if m.is_stopped() or not m.consume_token(int(token)):
                self.done.add(key)
                self._check_failed(key, m)

    def active(self, keys: list[Any]) -> list[Any]:
        return [k for k in keys if k in self.rows and k not in self.done]

    def masks(self, keys: list[Any], pin: bool = False) -> torch.Tensor:
        """[len(keys), words] int32 on the CPU (pinned with `pin`, for an asynchronous copy to the GPU): the allowed
        tokens of each row (keys must be active)."""
        import torch

        bitmask = torch.empty((len(keys), bitmask_words(self.grammars.vocab_size)), dtype=torch.int32, pin_memory=pin)
        t0 = time.perf_counter()
        self.grammars.fill([(self.rows[k], i) for i, k in enumerate(keys)], bitmask)
        self.fill_s += time.perf_counter() - t0
        for k in keys:
            self._check_failed(k, self.rows[k])
        return bitmask
