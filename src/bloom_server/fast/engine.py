"""FastEngine: slots of a preallocated KV cache, and the three calls a scheduler needs.

  prefill(slot_ids, prompts[, starts])  run prompts (or chunks of them, each from its start) into their slots; logits
                                        of each one's last token
  decode(slot_ids, last_tokens, ...)    one new token for each slot
  release(slot) / move(src, dst)        free a slot; move a row so that the live slots stay a prefix [0, n)

The fast path is a decode over the prefix of slots [0, n): its shapes depend only on (batch bucket B >= n, key bucket
S > every row's position), so on CUDA each (B, S) is captured once as a CUDA graph and replayed: one launch per
token instead of ~20 per layer from Python. The step reads its input tokens and positions from static device
buffers and writes the greedy next token and the advanced positions back into them, so a greedy loop is replay
after replay with no host work and no host sync; other sampling runs on the graph's logits output. Rows [n, B) of
a bucket are padding: they run on the slots after the live ones and their outputs are ignored; each writes one key,
at position 0 of a free slot, or, in a slot whose row's prompt is still going in (chunked prefill), at that row's
next position, which its next chunk writes again before anything reads it. Keys are read up to the
bucket S, not the whole cache, so a short sequence does not pay for max_seq.

Any slot list that is not a prefix takes an eager path that gathers its rows (correct, slower).

When to capture: a static generate captures its shape on first use (it replays it for every token). The continuous
batch passes `capture_after`: a shape it meets before its graph exists runs eagerly instead of stalling every live
row for a capture, and the engine's idle moments capture the missing shapes one at a time (`capture_next`, run by
the lockstep loop on every rank when nothing is live or queued).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from bloom_server.fast.model import BloomRankModel, ChunkIndex, Packed
from bloom_server.fast.sampling import Sampler, SamplingConfig, to_device
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.tp import TPGroup
from bloom_server.fast.weights import BloomWeights

log = logging.getLogger(__name__)

# Bytes of prefill attention scores held at once ([rows * hp, L, L]); longer batches prefill in row chunks.
PREFILL_SCORE_BUDGET = 256 << 20
# With an EOS to watch for, the host looks at the device's "all finished" flag once per this many steps.
EOS_CHECK_EVERY = 16
# EOS ids the captured step can suppress at once (a call with more falls back to the eager sampler).
EOS_SLOTS = 4
# The continuous batch's decode runs a shape eagerly this many times before capturing it inside a step: a capture
# stalls every live row (an eager step only launches its kernels one by one), and idle moments capture the missing
# shapes first (docs/results/fast-engine.md "Decode graphs captured when idle").
GRAPH_AFTER_EAGER_STEPS = 64


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (and max_batch itself)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def seq_bucket(need: int, max_seq: int) -> int:
    """Keys a step reads: 64, 128, 256, then multiples of 256, capped at max_seq. At most 2x (short) or +255
    (long) keys more than needed, and few distinct shapes to capture."""
    for b in (64, 128, 256):
        if need <= b:
            return min(b, max_seq)
    return min(-(-need // 256) * 256, max_seq)


class StepObserver(Protocol):
    """Sees each step of `FastEngine.generate` (rank 0's streaming): `observe` gets the step's chosen tokens [n] and
    logits [n, V] on the device (valid until the next step); `stop` is asked before each step; `finish` at the end."""

    def observe(self, step: int, tokens: torch.Tensor, logits: torch.Tensor) -> None: ...

    def stop(self) -> bool:
        return False

    def finish(self) -> None: ...


@dataclass
class GenerateResult:
    tokens: list[list[int]]  # per row, the chosen tokens (the same count for every row; the caller cuts)
    timed_out: bool = False


class FastEngine:
    def __init__(
        self,
        weights: BloomWeights,
        shape: BloomShape,
        *,
        max_batch: int,
        max_seq: int,
        tp: TPGroup | None = None,
        cuda_graphs: bool | None = None,
    ):
        self.model = m = BloomRankModel(weights, shape, tp)
        self.shape = shape
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.device, self.dtype = m.device, m.dtype
        cache_shape = (shape.n_layer, max_batch, m.hp, max_seq, m.D)
        # Zeros, not empty: a masked key has probability 0, and 0 * NaN would still poison the sum over V.
        self.k_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        # Step buffers, row i = slot i on the fast path: the token to feed and the position it goes to.
        self.tok = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.rows = torch.arange(max_batch, device=self.device)
        self.host_pos = [0] * max_batch  # host mirror of self.pos for live slots: picks the bucket, no sync
        # EOS suppression inside the captured step (min_length / min_new_tokens): eos_bias (0 or -inf) is added to
        # the logits of the EOS_SLOTS columns eos_cols before the argmax. Set per generate call, no recapture.
        self.eos_cols = torch.zeros(EOS_SLOTS, dtype=torch.long, device=self.device)
        self.eos_bias = torch.zeros((), dtype=self.dtype, device=self.device)
        self.live = [False] * max_batch
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._eager: collections.Counter[tuple[int, int]] = collections.Counter()  # uncaptured shapes run eagerly
        self._no_graph: set[tuple[int, int]] = set()  # shapes whose capture ran out of device memory: eager for good
        # Plain numbers for /metrics (read from the event loop): graphs held, seconds spent capturing them, and decode
        # steps of the continuous batch that ran eagerly because their shape had no graph yet.
        self.graph_stats: dict[str, float] = {"graphs": 0, "capture_seconds": 0.0, "eager_steps": 0}
        self.last_logits: torch.Tensor | None = None  # [n, V] of the latest prefill/decode (valid until the next)

    # ---- memory facts ----

    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def kv_bytes_read(self, n: int, keys: int) -> int:
        """K and V bytes one decode step reads on this rank for n rows of `keys` keys each."""
        m = self.model
        return 2 * self.shape.n_layer * n * m.hp * keys * m.D * self.k_cache.element_size()

    # ---- slots ----

    def release(self, slot: int) -> None:
        self.live[slot] = False

    def move(self, src: int, dst: int) -> None:
        """Copy slot src's cache rows, token and position to dst, and free src (compaction after a row leaves)."""
        if src == dst:
            return
        n = self.host_pos[src]  # positions [0, n) hold the row's keys; the pending token is in tok/pos
        self.k_cache[:, dst, :, :n].copy_(self.k_cache[:, src, :, :n])
        self.v_cache[:, dst, :, :n].copy_(self.v_cache[:, src, :, :n])
        self.tok[dst].copy_(self.tok[src])
        self.pos[dst].copy_(self.pos[src])
        self.host_pos[dst] = self.host_pos[src]
        self.live[dst], self.live[src] = True, False

    # ---- prefill ----

    @torch.inference_mode()
    def prefill(
        self, slot_ids: Sequence[int], prompts: Sequence[Sequence[int]], starts: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Run each prompt into its slot from position 0, or, with `starts`, each chunk from its start (positions
        [0, start) of the slot already hold that row's keys: an earlier chunk, a prefix copied in). Returns logits
        [n, V] of each prompt's (chunk's) last token."""
        if len(slot_ids) != len(prompts) or not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("prefill needs one non-empty prompt per slot")
        if starts is not None and not any(starts):
            starts = None  # every row from position 0: the plain prefill
        ends = [len(p) + (starts[i] if starts is not None else 0) for i, p in enumerate(prompts)]
        if max(ends) >= self.max_seq:
            raise ValueError(f"prompt of {max(ends)} tokens: the engine holds {self.max_seq} positions per slot")
        # Row batches of at most PREFILL_SCORE_BUDGET bytes of scores each, the rows taken longest first so that each
        # batch's attention pads to lengths near its own.
        per_pair = self.model.hp * self.dtype.itemsize * 3  # bytes of bias+scores+probs per (query, key) of a row
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        groups: list[list[int]] = []
        keys = 0
        for i in order:
            g = groups[-1] if groups else None
            if (
                g is not None
                and (len(g) + 1) * len(prompts[g[0]]) * max(keys, ends[i]) * per_pair <= PREFILL_SCORE_BUDGET
            ):
                g.append(i)
                keys = max(keys, ends[i])
            else:
                groups.append([i])
                keys = ends[i]
        outs = [
            self._prefill_rows([slot_ids[i] for i in g], [prompts[i] for i in g],
                               None if starts is None else [starts[i] for i in g])
            for g in groups
        ]  # fmt: skip
        logits = outs[0] if len(outs) == 1 else torch.cat(outs)
        done = [i for g in groups for i in g]
        if done != sorted(done):  # back to the callers' order
            back = [0] * len(done)
            for k, i in enumerate(done):
                back[i] = k
            logits = logits[to_device(back, logits.device)]
        self.last_logits = logits
        return logits

    def _prefill_rows(
        self, slot_ids: Sequence[int], prompts: Sequence[Sequence[int]], starts: Sequence[int] | None
    ) -> torch.Tensor:
        m = self.model
        n, L = len(prompts), max(len(p) for p in prompts)
        lengths_host = [len(p) for p in prompts]
        ends_host = lengths_host if starts is None else [s + ln for s, ln in zip(starts, lengths_host)]
        cols = [(i, c) for i, ln in enumerate(lengths_host) for c in range(ln)]
        index = [[t for p in prompts for t in p], [i for i, _ in cols], [c for _, c in cols]]
        if starts is not None:  # each real token's slot and position
            index += [[slot_ids[i] for i, _ in cols], [starts[i] + c for i, c in cols]]
        # Asynchronous copies (to_device): a blocking one would wait for the decode the continuous batcher queued ahead.
        at = to_device(index, self.device)
        lengths = to_device(lengths_host, self.device)
        s0 = slot_ids[0]
        # Consecutive slots (a burst into free slots): a slice, so the K/V writes are plain copies, not index kernels.
        slots = (
            slice(s0, s0 + n) if list(slot_ids) == list(range(s0, s0 + n)) else to_device(list(slot_ids), self.device)
        )
        packed = Packed(at[1], at[2], n, L, at[1] * L + at[2]) if len(cols) < n * L else None  # padding to skip
        tokens = at[0] if packed is not None else at[0].view(n, L)
        if starts is None:
            chunk, bias = None, m.prefill_bias(lengths, L)
        else:
            single = (slot_ids[0], starts[0]) if n == 1 else None
            chunk = ChunkIndex(at[3], at[4], at[1], at[2], max(ends_host), single)
            bias = m.prefill_bias(lengths, L, to_device(list(starts), self.device), chunk.keys)
        x = m.embed(tokens)  # [n, L, h], or packed [T, h]
        for li in range(self.shape.n_layer):
            x = m.prefill_layer(li, x, bias, self.k_cache[li], self.v_cache[li], slots, chunk, packed)
        # only the last token's logits: [n, h]
        last = (
            x[torch.cumsum(lengths, 0) - 1]
            if packed is not None
            else x[torch.arange(n, device=self.device), lengths - 1]
        )
        self.pos[slots] = lengths if starts is None else to_device(ends_host, self.device)
        for s, end in zip(slot_ids, ends_host):
            self.host_pos[s] = end
            self.live[s] = True
        return m.logits(last)

    def hold(self, slot: int, n: int) -> None:
        """Positions [0, n) of the slot hold a row's keys (copied in, e.g. a cached prefix): the next prefill chunk
        goes on from n."""
        self.host_pos[slot] = n
        self.pos[slot] = n
        self.live[slot] = True

    # ---- decode ----

    def _step(self, B: int, S: int) -> torch.Tensor:
        """One token for rows [0, B) from self.tok/self.pos; writes the argmax into self.tok and advances self.pos.
        Static shapes for a given (B, S): this is what gets captured. Returns logits [B, V]."""
        m = self.model
        tok, pos = self.tok[:B], self.pos[:B]
        x = m.embed(tok)  # [B, h]
        bias = m.decode_bias(pos, S)  # [B*hp, 1, S], shared by every layer
        rows = self.rows[:B]
        for li in range(self.shape.n_layer):
            x = m.decode_layer(li, x, bias, self.k_cache[li], self.v_cache[li], rows, pos, S, prefix=True)
        logits = m.logits(x)
        tok.copy_(self._greedy(logits))
        pos.add_(1)
        return logits

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """Argmax after the EOS suppression (in place on logits [B, V]: the sampler sees the same scores)."""
        # index_add (not indexed assignment): a plain kernel inside the graph. Repeated columns add the bias twice:
        # -inf stays -inf, 0 stays 0.
        logits.index_add_(1, self.eos_cols, self.eos_bias.expand(logits.shape[0], EOS_SLOTS))
        return torch.argmax(logits, dim=-1)

    def suppress_eos(self, eos_ids: Sequence[int], on: bool) -> None:
        """Forbid (on) or allow the EOS ids in the step's own argmax. A few device writes; no recapture."""
        if eos_ids:
            ids = (list(eos_ids) * EOS_SLOTS)[:EOS_SLOTS]  # repeats are harmless: the same bias, written twice
            self.eos_cols.copy_(torch.tensor(ids, dtype=torch.long))
        self.eos_bias.fill_(float("-inf") if (on and eos_ids) else 0.0)

    def _graph(self, B: int, S: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (B, S)
        if key not in self._graphs:
            t0 = time.perf_counter()
            saved = (self.tok.clone(), self.pos.clone())
            # Warm up on a side stream (cuBLAS handles, NCCL communicators), undoing the step's buffer updates. Its
            # K/V writes land at the rows' current positions, which the real step rewrites with the same values.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(B, S)
                    self.tok.copy_(saved[0])
                    self.pos.copy_(saved[1])
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # Graphs share one memory pool: they never run at once, and a graph's output is read before the next.
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._step(B, S)
            self._graphs[key] = (graph, out)
            took = time.perf_counter() - t0
            self.graph_stats["graphs"] = len(self._graphs)
            self.graph_stats["capture_seconds"] += took
            log.debug("captured decode graph B=%d S=%d in %.0f ms", B, S, 1e3 * took)
        return self._graphs[key]

    def _try_graph(self, B: int, S: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """The shape's graph, captured now if need be; None where its capture ran out of device memory: the shape then
        runs eagerly for good (every rank alike: the ranks hold the same shapes and memory), and no step or idle
        moment fails for a graph it can do without."""
        if (B, S) in self._graphs:
            return self._graphs[B, S]
        if (B, S) in self._no_graph:
            return None
        saved = (self.tok.clone(), self.pos.clone())
        try:
            return self._graph(B, S)
        except torch.cuda.OutOfMemoryError:
            self.tok.copy_(saved[0])
            self.pos.copy_(saved[1])
            self._no_graph.add((B, S))
            log.warning("decode graph B=%d S=%d: out of device memory while capturing it; this shape runs without a "
                        "graph", B, S)  # fmt: skip
            return None

    def graph_shapes(self) -> list[tuple[int, int]]:
        """Every (batch bucket, key bucket) a decode over slot prefixes can take, shortest keys first."""
        needs = (1, 65, 129, *range(257, self.max_seq, 256), self.max_seq)
        keys = sorted({seq_bucket(need, self.max_seq) for need in needs})
        return [(B, S) for S in keys for B in batch_buckets(self.max_batch)]

    @torch.inference_mode()
    def capture_next(self) -> bool:
        """Idle work (no row live): capture one decode graph not held yet, the shapes already run eagerly first (most
        used first), then `graph_shapes` in order. True while more remain after it; False at once without graphs."""
        if not self.cuda_graphs or any(self.live):
            return False
        tried = self._graphs.keys() | self._no_graph
        todo = [k for k, _ in self._eager.most_common() if k not in tried]
        todo += [k for k in self.graph_shapes() if k not in tried and k not in todo]
        if not todo:
            return False
        # No row is live: every slot's buffers are free to use. Position 0 keeps the warm-up steps' K/V writes inside
        # the cache whatever the slots held before.
        self.tok.zero_()
        self.pos.zero_()
        self._try_graph(*todo[0])
        if len(todo) == 1:
            log.info("decode graphs: all %d shapes captured (%.1f s in all)", len(self._graphs),
                     self.graph_stats["capture_seconds"])  # fmt: skip
        return len(todo) > 1

    def _bucket_batch(self, n: int) -> int:
        for b in batch_buckets(self.max_batch):
            if b >= n:
                return b
        raise ValueError(f"{n} rows; the engine holds {self.max_batch}")

    def _prefix_step(self, n: int, capture_after: int = 0) -> torch.Tensor:
        """Decode slots [0, n) from the step buffers. Returns logits [n, V]; self.tok[:n] holds the argmax. A shape
        with no graph yet runs eagerly its first `capture_after` times (module docstring), then is captured."""
        need = max(self.host_pos[:n]) + 1
        if need > self.max_seq:
            raise ValueError(f"a slot is full: {self.max_seq} positions")
        S = seq_bucket(need, self.max_seq)
        B = self._bucket_batch(n)
        if B > n:
            self.pos[n:B].zero_()  # padding rows: free slots, position 0
            held = [s for s in range(n, B) if self.live[s]]
            if held:  # a row whose prompt is going in: its next position, which its next chunk writes before use
                self.pos[to_device(held, self.device)] = to_device([self.host_pos[s] for s in held], self.device)
        entry = None
        if self.cuda_graphs and ((B, S) in self._graphs or self._eager[B, S] >= capture_after):
            entry = self._try_graph(B, S)
        if entry is not None:
            graph, out = entry
            graph.replay()
            logits = out[:n]
        else:
            if self.cuda_graphs:
                self._eager[B, S] += 1
                self.graph_stats["eager_steps"] += 1
            logits = self._step(B, S)[:n]
        for i in range(n):
            self.host_pos[i] += 1
        return logits

    def _rows_step(self, slot_ids: Sequence[int]) -> torch.Tensor:
        """Eager decode of any slots (gathers their cache rows). Returns logits [n, V]; writes tok/pos of the slots."""
        m = self.model
        rows = torch.tensor(list(slot_ids), dtype=torch.long, device=self.device)
        need = max(self.host_pos[s] for s in slot_ids) + 1
        if need > self.max_seq:
            raise ValueError(f"a slot is full: {self.max_seq} positions")
        S = seq_bucket(need, self.max_seq)
        tok, pos = self.tok[rows], self.pos[rows]
        x = m.embed(tok)
        bias = m.decode_bias(pos, S)
        for li in range(self.shape.n_layer):
            x = m.decode_layer(li, x, bias, self.k_cache[li], self.v_cache[li], rows, pos, S, prefix=False)
        logits = m.logits(x)
        self.tok[rows] = self._greedy(logits)
        self.pos[rows] = pos + 1
        for s in slot_ids:
            self.host_pos[s] += 1
        return logits

    @torch.inference_mode()
    def decode(
        self,
        slot_ids: Sequence[int],
        last_tokens: torch.Tensor | None = None,
        sampler: Sampler | None = None,
        step: int = 0,
        capture_after: int = 0,
    ) -> torch.Tensor:
        """Feed each slot its last token (default: the one the previous step chose, already in the step buffer) and
        return the next tokens [n] (long, on the device; a view of the step buffer, valid until the next step).
        `step` is the index of the token being chosen, for the sampler (min_length, history). `capture_after`: run
        a shape that has no CUDA graph yet eagerly that many times before capturing it (0: capture at once)."""
        n = len(slot_ids)
        prefix = list(slot_ids) == list(range(n))
        if prefix:
            if last_tokens is not None:
                self.tok[:n].copy_(last_tokens)
            logits = self._prefix_step(n, capture_after)
            chosen = self.tok[:n]
        else:
            rows = torch.tensor(list(slot_ids), dtype=torch.long, device=self.device)
            if last_tokens is not None:
                self.tok[rows] = last_tokens
            logits = self._rows_step(slot_ids)
            chosen = self.tok[rows]
        self.last_logits = logits
        if sampler is not None:
            if sampler.cfg.plain_greedy:
                sampler.observe(chosen, step)
            else:
                picked = sampler(logits, step)
                if prefix:
                    self.tok[:n].copy_(picked)
                    chosen = self.tok[:n]
                else:
                    self.tok[rows] = picked
                    chosen = picked
        return chosen

    # ---- a whole static batch (what the lockstep backend and the benchmark run) ----

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        cfg: SamplingConfig | None = None,
        *,
        seed: int = 0,
        pad_token_id: int = 0,
        max_time: float | None = None,
        observer: StepObserver | None = None,
    ) -> GenerateResult:
        """Greedy or sampled continuation of each prompt, max_new_tokens each (or fewer for every row, once every row
        has produced an EOS at or after min_new_tokens, or max_time ran out, or the observer says stop). Rows use
        slots [0, n). `observer` sees each step's tokens and logits on the device, right after they are chosen."""
        cfg = cfg or SamplingConfig()
        n = len(prompts)
        if n > self.max_batch:
            raise ValueError(f"{n} rows; the engine holds {self.max_batch}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_seq:
            raise ValueError(f"{longest} + {max_new_tokens} tokens; the engine holds {self.max_seq} per slot")
        start = time.monotonic()
        suppress = cfg.min_new_tokens > 0 and bool(cfg.eos_ids)
        if suppress and len(cfg.eos_ids) > EOS_SLOTS:
            cfg = replace(cfg, in_graph_eos=False)  # the sampler masks them itself then
        sampler = Sampler(
            cfg,
            prompts,
            vocab_size=self.shape.vocab_size,
            device=self.device,
            seed=seed,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
        )
        slots = list(range(n))
        self.suppress_eos(cfg.eos_ids, suppress and cfg.in_graph_eos)
        out = torch.empty((n, max_new_tokens), dtype=torch.long, device=self.device)
        logits = self.prefill(slots, prompts)
        first = sampler(logits, 0)
        out[:, 0] = first
        self.tok[:n].copy_(first)
        if observer is not None:
            observer.observe(0, out[:, 0], logits)
        eos = sampler.eos
        done = torch.isin(first, eos) if eos is not None else None
        produced, timed_out = 1, False
        for t in range(1, max_new_tokens):
            if done is not None and t >= cfg.min_new_tokens and t % EOS_CHECK_EVERY == 0:
                if bool(done.all()):  # the one host sync, every EOS_CHECK_EVERY steps
                    break
            if max_time is not None and time.monotonic() - start > max_time:
                timed_out = True
                break
            if observer is not None and observer.stop():
                break
            if t == cfg.min_new_tokens and suppress:
                self.suppress_eos(cfg.eos_ids, False)
            nxt = self.decode(slots, None, sampler, t)
            out[:, t] = nxt
            produced = t + 1
            if observer is not None:
                observer.observe(t, out[:, t], self.last_logits)  # type: ignore[arg-type]
            if done is not None:
                done |= torch.isin(nxt, eos)
        if observer is not None:
            observer.finish()
        for s in slots:
            self.release(s)
        self.suppress_eos((), False)
        return GenerateResult(out[:, :produced].tolist(), timed_out)

    # ---- scoring ----

    def _hidden(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        n, L = len(rows), max(len(r) for r in rows)
        tokens = torch.zeros((n, L), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=self.device)
        return self.model.forward_hidden(tokens.to(self.device), lengths)  # [n, L, h]

    @torch.inference_mode()
    def forward_logits(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [n, L, V] (fp32) of every position of each row, right-padded (past a row's length: junk)."""
        return self.model.logits(self._hidden(rows)).float()

    @torch.inference_mode()
    def nll(self, conditioning: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> float:
        """Mean negative log-likelihood of every response token given the text before it, over the whole batch.
        Logits are computed only where a response token is predicted (the vocabulary is large)."""
        rows = [list(c) + list(r) for c, r in zip(conditioning, responses)]
        hidden = self._hidden(rows)
        picks, targets = [], []
        for i, (c, r) in enumerate(zip(conditioning, responses)):
            # Token t is predicted from position t - 1.
            picks.append(hidden[i, len(c) - 1 : len(c) + len(r) - 1])
            targets.extend(r)
        logits = self.model.logits(torch.cat(picks)).float()  # [sum of response lengths, V]
        target = torch.tensor(targets, dtype=torch.long, device=self.device)
        return float(torch.nn.functional.cross_entropy(logits, target))
