"""Host time of one continuous-batching step (FastBackend.cstep over the RowScheduler), on CPU.

Keeps --rows rows live (a finished row is replaced by a new join at the next step, as a loaded server does) and times
each cstep. Two engines:
  tiny  the embedded tiny BLOOM (2 layers, hidden 64, vocabulary 2048): real prefill/decode, small compute;
  fake  FastEngine with the model calls replaced by near-free tensor ops of the same shapes (tokens/positions/logits
        [B, V]): what is left is the step's host work (bookkeeping, Python per row, small tensor ops).
Reports the median and mean per-step host microseconds (wall) and the mean thread CPU time per step (robust on a
shared machine), and with --profile the top functions of a cProfile of the
steps (cumulative and own time per step).

    python scripts/bench/cstep_overhead.py --engine fake --rows 64 --steps 400 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bloom_server.backends.fast import FastBackend
from bloom_server.fast.engine import FastEngine
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.weights import from_checkpoint
from bloom_server.frontend.batching.continuous import Join
from bloom_server.types import SamplingParams


def tiny_engine(rows: int, max_seq: int, model_dir: Path | None) -> FastEngine:
    from bloom_server.storage.tiny import build_tiny_model

    if model_dir is None:
        model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny-bloom")
    shape = BloomShape.from_dir(model_dir)
    return FastEngine(from_checkpoint(model_dir, shape, dtype=torch.float32), shape, max_batch=rows, max_seq=max_seq)


def fake_engine(rows: int, max_seq: int, model_dir: Path | None) -> FastEngine:
    """The tiny engine with its model calls replaced: decode = one small op chain on tok/pos plus a logits buffer,
    prefill = positions only. Tokens are a deterministic function of (token, position)."""
    e = tiny_engine(rows, max_seq, model_dir)
    V = e.shape.vocab_size
    logits_buf = torch.zeros((rows, V))

    def step(B: int, S: int) -> torch.Tensor:
        tok, pos = e.tok[:B], e.pos[:B]
        tok.copy_((tok * 31 + pos * 7 + 3) % V)
        pos.add_(1)
        return logits_buf[:B]

    def prefill_rows(slot_ids, prompts, starts=None):
        lengths = [len(p) + (starts[i] if starts else 0) for i, p in enumerate(prompts)]
        slots = torch.tensor(list(slot_ids), dtype=torch.long)
        e.pos[slots] = torch.tensor(lengths, dtype=torch.long)
        for s, ln in zip(slot_ids, lengths):
            e.host_pos[s] = ln
            e.live[s] = True
        out = torch.zeros((len(prompts), V))
        out[:, :] = 0.0
        for i, p in enumerate(prompts):
            out[i, (p[-1] * 13 + len(p)) % V] = 1.0
        return out

    e._step = step  # type: ignore[method-assign]
    e._prefill_rows = prefill_rows  # type: ignore[method-assign]
    return e


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("tiny", "fake"), default="fake")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--new-tokens", default="16-128", help="max_new_tokens range per row")
    ap.add_argument("--prompt-tokens", default="8-64")
    ap.add_argument("--eos", type=int, default=None, help="EOS id (rows may finish early on it)")
    ap.add_argument("--rank0", action="store_true", help="compute log-probabilities as rank 0 does")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    lo_n, hi_n = (int(x) for x in a.new_tokens.split("-"))
    lo_p, hi_p = (int(x) for x in a.prompt_tokens.split("-"))
    engine = (fake_engine if a.engine == "fake" else tiny_engine)(a.rows, a.max_seq, a.model_dir)
    backend = FastBackend.__new__(FastBackend)
    backend.engine = engine
    backend._defaults = {}
    rng = random.Random(a.seed)
    V = engine.shape.vocab_size
    rids = iter(range(1, 1 << 30))
    live: set[int] = set()

    def joins(k: int) -> tuple[Join, ...]:
        out = []
        for _ in range(k):
            rid = next(rids)
            live.add(rid)
            prompt = tuple(rng.randrange(10, V) for _ in range(rng.randint(lo_p, hi_p)))
            out.append(Join(rid, prompt, rng.randint(lo_n, hi_n), SamplingParams(), 0, a.eos, 0, 0))
        return tuple(out)

    class Step:  # engine.continuous.CStep's face
        def __init__(self, j, leaves=()):
            self.joins, self.leaves = j, leaves

    times: list[float] = []
    cpu: list[float] = []  # the engine thread's CPU time per step: robust when other processes share the cores
    tokens = 0
    prof = cProfile.Profile() if a.profile else None
    pending = joins(a.rows)
    total = a.warmup + a.steps
    for i in range(total):
        step = Step(pending)
        timed = i >= a.warmup
        if timed and prof is not None:
            prof.enable()
        c0, t0 = time.thread_time(), time.perf_counter()
        res = backend.cstep(step, rank0=a.rank0)
        dt, dc = time.perf_counter() - t0, time.thread_time() - c0
        if timed and prof is not None:
            prof.disable()
        for rid, _ in res.finished:
            live.discard(rid)
        if timed:
            times.append(dt)
            cpu.append(dc)
            tokens += len(res.tokens)
        pending = joins(a.rows - len(live))
    med, mean = statistics.median(times) * 1e6, statistics.fmean(times) * 1e6
    summary = {
        "engine": a.engine,
        "rows": a.rows,
        "steps": a.steps,
        "rank0": a.rank0,
        "step_us_median": round(med, 1),
        "step_us_mean": round(mean, 1),
        "step_us_p90": round(sorted(times)[int(0.9 * len(times))] * 1e6, 1),
        "step_cpu_us_mean": round(statistics.fmean(cpu) * 1e6, 1),
        "tokens_per_step": round(tokens / a.steps, 2),
        "us_per_token": round(sum(times) * 1e6 / max(1, tokens), 2),
    }
    print(json.dumps(summary))
    if prof is not None:
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("cumulative").print_stats(a.top)
        st.sort_stats("tottime").print_stats(a.top)
        print(f"(profile over {a.steps} steps; divide times by {a.steps} for per-step figures)")
        print(s.getvalue())
    if a.json is not None:
        a.json.write_text(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
