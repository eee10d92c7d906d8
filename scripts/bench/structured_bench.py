#!/usr/bin/env python3
"""Structured output's cost on the fast engine's continuous batcher: time per output token of a full batch whose
rows are all unconstrained ("free"), all constrained by one JSON schema ("constrained"), or half and half
("mixed": every row shares each step, so the step time is the free rows' time per token too). Same process, same
weights, runs interleaved (free, constrained, mixed, repeated), medians reported.

    python3 scripts/bench/structured_bench.py --shape 7b1 --json OUT.json            # a GPU: random 7b1-shape weights
    python3 scripts/bench/structured_bench.py --shape tiny --new-tokens 16 --repeats 1   # any CPU, seconds

Weights are random (seeded; fast/weights.py random_weights), so the text is noise and only the grammar shapes it:
a constrained row's tokens are the grammar's. The masks are computed by the same code the server runs (each step:
the previous tokens read, each constrained row's mask filled on the host while the decode runs, then applied on
the device). `--tokenizer` takes a tokenizer.json (BLOOM's own for realistic mask costs: its 250k tokens make a
mask costlier than the embedded tiny model's 2k, which is the default when none is given; with `--shape tiny` the
vocabulary is widened to the tokenizer's). Per step it reports the host time of the mask fills (on llguidance's
threads, the engine thread waiting), how long the engine thread waited for the device's tokens (near 0: the host,
not the device, sets the pace) and, on a GPU, each decode's forward on the device and the device time between two
forwards (the masked choice, the copies, and any wait for the host). Only steps where every row of the batch is live
count (a row that finishes early would shrink the batch). Bounded by --time-limit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# A realistic schema with free-text fields (what makes constrained rows run long: strings, arrays of objects).
SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "format": "uuid"},
        "customer": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                     "required": ["name", "email"], "additionalProperties": False},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "notes": {"type": "string"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
            "price": {"type": "number", "minimum": 0}}, "required": ["sku", "quantity", "price"],
            "additionalProperties": False}},
    },
    "required": ["order_id", "customer", "status", "notes", "items"],
    "additionalProperties": False,
}  # fmt: skip


# The grammar engine's costly case (docs/results/structured-output.md): strings bounded by maxLength or a pattern.
BOUNDED = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 8},
        "summary": {"type": "string", "maxLength": 400},
    },
    "required": ["title", "code", "email", "tags", "summary"],
    "additionalProperties": False,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["tiny", "560m", "7b1"], default="7b1")
    p.add_argument("--layers", type=int, default=None, help="this many layers of the shape (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps per run")
    p.add_argument("--input-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: the embedded tiny model's)")
    p.add_argument("--schema", default=None,
                   help="a JSON schema file, or `bounded` (strings under maxLength / pattern / format); default: an "
                   "order with free text")  # fmt: skip
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds; no new run starts after this")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--fill", choices=["pool", "serial"], default="pool",
                   help="pool: the server's fill (llguidance's thread pool, every row in one call); serial: each row's "
                        "mask in turn on the engine thread (an alternative under test: no pool hand-off)")  # fmt: skip
    p.add_argument("--templates", type=int, default=None,
                   help="independent matchers kept per grammar, rows copies of them in turn (default: the server's, "
                        "the fill pool's threads; 1: every row a copy of one, sharing one lexer)")  # fmt: skip
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="the process's GIL switch interval (default: CPython's 5 ms): how long the engine thread may "
                        "wait for the GIL held by a fill thread")  # fmt: skip
    p.add_argument(
        "--timeline",
        action="store_true",
        help="then one constrained run traced: each step's host stages and device work on one clock (GPU)",
    )
    return p.parse_args(argv)


def _padded_vocab(tokenizer_json: Path | None) -> int:
    """The tiny shape's vocabulary: the embedded model's 2,048, or the given tokenizer's ids rounded up to 128 (as
    BLOOM pads its 250,680 tokens to 250,880)."""
    if tokenizer_json is None:
        return 2048
    tok = json.loads(Path(tokenizer_json).read_text())
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return -(-(max(ids) + 1) // 128) * 128


def main(argv: list[str] | None = None) -> int:
    import torch

    from bloom_server import structured
    from bloom_server.api.grammar import make_grammar
    from bloom_server.fast import rows as rows_mod
    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.rows import Request, RowScheduler
    from bloom_server.fast.sampling import SamplingConfig
    from bloom_server.fast.shapes import PRESETS, BloomShape
    from bloom_server.fast.weights import random_weights

    args = parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    t_start = time.monotonic()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.float16 if cuda else torch.float32
    tokenizer_json = args.tokenizer
    # tiny: the embedded model's layers, its vocabulary widened to the tokenizer's (a BLOOM-sized mask on any CPU)
    shape = PRESETS[args.shape] if args.shape in PRESETS else BloomShape(_padded_vocab(tokenizer_json), 64, 2, 4)
    if args.layers:
        shape = BloomShape(shape.vocab_size, shape.hidden_size, args.layers, shape.n_head)
    if tokenizer_json is None:
        from bloom_server.storage.tiny import build_tiny_model

        tokenizer_json = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny") / "tokenizer.json"
    schema = (
        BOUNDED if args.schema == "bounded" else json.loads(Path(args.schema).read_text()) if args.schema else SCHEMA
    )
    grammar = make_grammar("json_schema", schema, "schema")
    eos = 2  # BLOOM's </s> (and the embedded model's)
    grammars = structured.Grammars(tokenizer_json, shape.vocab_size, (eos,), templates=args.templates)
    grammars.check(grammar, "schema")
    if args.fill == "serial":  # the alternative: no hand-off to the pool's threads (docs/results/structured-output.md)
        import llguidance.torch as llg_torch

        def serial_fill(matchers, bitmask):
            for m, row in matchers:
                llg_torch.fill_next_token_bitmask(m, bitmask, row)

        grammars.fill = serial_fill  # type: ignore[method-assign]

    bs, new = args.batch_size, args.new_tokens
    weights = random_weights(shape, None, dtype=dtype, device=device, seed=0)
    engine = FastEngine(weights, shape, max_batch=bs, max_seq=args.input_tokens + new + 8)
    gen = torch.Generator().manual_seed(0)
    prompts = [tuple(int(t) for t in torch.randint(10, 2000, (args.input_tokens,), generator=gen)) for _ in range(bs)]

    read_s = [0.0]
    inner_read = rows_mod._Pending.read
    # One traced run (CUDA only): host instants and device events of each step on one clock, to see which side
    # waits for which (`timeline` below). Entries: (what, host seconds, device event or None).
    trace: list[tuple[str, float, Any]] | None = None

    def mark(what: str, event: bool = False) -> None:
        if trace is not None:
            trace.append((what, time.perf_counter(), None))
            if event:  # and when the device gets there
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                trace.append((what, 0.0, ev))

    def timed_read(self):  # the engine thread's wait for the device's tokens
        t0 = time.perf_counter()
        mark("read")
        out = inner_read(self)
        mark("read_done")
        read_s[0] += time.perf_counter() - t0
        return out

    rows_mod._Pending.read = timed_read  # type: ignore[method-assign]

    # The device's side (CUDA only): an event before and after each decode's forward, read after the run. "forward"
    # is its time on the device; "gap" the device time from one forward's end to the next one's start (the masked
    # choice, the copies, and any idle wait for the host): which side a slow constrained step waited for.
    marks: list[tuple] = []
    inner_decode = engine.decode

    def timed_decode(*a, **kw):
        if not cuda:
            return inner_decode(*a, **kw)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        mark("decode")
        out = inner_decode(*a, **kw)
        end.record()
        mark("decode_queued")
        marks.append((start, end))
        if trace is not None:  # the forward's own device start and end
            trace.append(("forward_start", 0.0, start))
            trace.append(("forward_end", 0.0, end))
        return out

    engine.decode = timed_decode  # type: ignore[method-assign]
    inner_stage, inner_fill = rows_mod._Pending.stage, grammars.fill

    def traced_stage(self):  # the step's tokens chosen and their copy queued: "staged" on the device is its end
        inner_stage(self)
        mark("staged", event=True)

    def traced_fill(matchers, bitmask):
        mark("fill")
        inner_fill(matchers, bitmask)
        mark("fill_done")

    rows_mod._Pending.stage = traced_stage  # type: ignore[method-assign]
    grammars.fill = traced_fill  # type: ignore[method-assign]

    def device_ms() -> tuple[float, float]:
        """(forward, gap) ms per step, means over the timed steps (0, 0 on a CPU)."""
        if len(marks) < 2:
            return 0.0, 0.0
        fwd = [a.elapsed_time(b) for a, b in marks]
        gaps = [marks[i][1].elapsed_time(marks[i + 1][0]) for i in range(len(marks) - 1)]
        return statistics.mean(fwd), statistics.mean(gaps)

    def run(constrained: int, traced: bool = False) -> dict:
        nonlocal trace
        cb = RowScheduler(engine)
        cb.grammars = grammars
        rows = [Request(rid=i, prompt=prompts[i], max_new_tokens=new, cfg=SamplingConfig(eos_ids=(eos,)),
                        grammar=grammar if i < constrained else None) for i in range(bs)]  # fmt: skip
        for r in rows:
            cb.add(r)
        cb.step()  # admits and prefills every row
        cb.step()  # the first decode (pipelined: the admissions' tokens are read now)
        if cuda:
            torch.cuda.synchronize()
        matchers = cb._matcher_set() if constrained else None
        if matchers is not None:
            matchers.fill_s = 0.0
        read_s[0] = 0.0
        marks.clear()
        if traced:
            trace = [("ref", 0.0, _clock_ref())]
        steps, t0 = 0, time.perf_counter()
        while len(cb.live) == bs and all(r.finish is None for r in rows) and steps < new - 3:
            cb.step()
            steps += 1
        if cuda:
            torch.cuda.synchronize()
        if traced:
            timeline(trace)
            trace = None
        elapsed = time.perf_counter() - t0
        fwd_ms, gap_ms = device_ms()
        fill = matchers.fill_s if matchers is not None else 0.0
        read = read_s[0]
        while not cb.idle:  # finish the run (not timed)
            cb.step()
        per = 1e3 / max(1, steps)
        return {"steps": steps, "ms_per_token": elapsed * per, "mask_host_ms_per_step": fill * per,
                "token_wait_ms_per_step": read * per,
                "device_forward_ms": fwd_ms, "device_gap_ms": gap_ms}  # fmt: skip

    def _clock_ref() -> Any:
        """An event the idle device passes at (about) the host instant recorded beside it: device events map onto
        the host's clock from there."""
        torch.cuda.synchronize()
        ref = torch.cuda.Event(enable_timing=True)
        ref.record()
        ref.synchronize()
        return ref, time.perf_counter()

    def timeline(entries: list) -> None:
        """Per step, on the host's clock and relative to the instant the host queued the step's decode (ms,
        medians over the traced steps): when each host stage ran and when the device started and ended the
        forward and finished the step's choice (its tokens staged)."""
        (ref, t_ref), steps, cur = entries[0][2], [], None
        for what, t, ev in entries[1:]:
            if ev is not None:
                t = t_ref + ref.elapsed_time(ev) / 1e3
            if what == "decode":
                cur = {}
                steps.append(cur)
            if cur is not None:
                key = what + ("@device" if ev is not None else "")
                cur.setdefault(key, t)
        rows = []
        for st in steps[1:-1]:
            t0 = st["decode"]
            rows.append({k: (v - t0) * 1e3 for k, v in st.items()})
        keys = ["decode_queued", "forward_start@device", "read", "read_done", "fill", "fill_done", "staged",
                "forward_end@device", "staged@device"]  # fmt: skip
        print(f"timeline of {len(rows)} constrained steps, ms after the host queued the step's decode (median):")
        for k in keys:
            vals = [r[k] for r in rows if k in r]
            if vals:
                print(f"  {k:22s} {statistics.median(vals):8.3f}  (p10 {sorted(vals)[len(vals) // 10]:.3f}, "
                      f"p90 {sorted(vals)[len(vals) * 9 // 10]:.3f})")  # fmt: skip
        period = [b["decode"] - a["decode"] for a, b in zip(steps, steps[1:])]
        if period:
            print(f"  step period            {1e3 * statistics.median(period):8.3f}")

    modes = {"free": 0, "constrained": bs, "mixed": bs // 2}
    run(0)  # warm-up: CUDA graphs of the buckets these runs use, cuBLAS
    run(bs)  # the grammar's template matcher, llguidance's lexer states
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        if rep and time.monotonic() - t_start > args.time_limit:
            break
        for mode, n in modes.items():
            results[mode].append(run(n))

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    summary = {m: {"ms_per_token": med(m, "ms_per_token"), "mask_host_ms_per_step": med(m, "mask_host_ms_per_step"),
                   "token_wait_ms_per_step": med(m, "token_wait_ms_per_step"),
                   "device_forward_ms": med(m, "device_forward_ms"), "device_gap_ms": med(m, "device_gap_ms"),
                   "timed_steps": [r["steps"] for r in results[m]], "runs_ms_per_token":
                   [round(r["ms_per_token"], 4) for r in results[m]]} for m in modes}  # fmt: skip
    free = summary["free"]["ms_per_token"]
    out = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "shape": args.shape, "layers": shape.n_layer, "vocab": shape.vocab_size, "dtype": str(dtype),
        "batch_size": bs, "new_tokens": new, "tokenizer": str(tokenizer_json), "schema": args.schema or "order",
        "tokenizer_tokens": grammars.tokenizer.vocab_size, "fill": args.fill,
        "templates": grammars.templates,
        "modes": summary,
        "constrained_over_free": summary["constrained"]["ms_per_token"] / free,
        "mixed_over_free": summary["mixed"]["ms_per_token"] / free,
        "target_constrained_over_free": 1.15,
        "seconds": time.monotonic() - t_start,
    }  # fmt: skip
    print(f"device {out['device']}, shape {args.shape} ({shape.n_layer} layers, vocab {shape.vocab_size}), bs {bs}, "
          f"tokenizer {tokenizer_json} ({out['tokenizer_tokens']} tokens), fill {args.fill}, templates {grammars.templates}")  # fmt: skip
    print("| rows | ms per output token (median) | runs | host mask ms/step | token wait ms/step | device forward ms | "
          "device gap ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for m in modes:
        s = summary[m]
        print(f"| {m} | {s['ms_per_token']:.3f} | {s['runs_ms_per_token']} | {s['mask_host_ms_per_step']:.3f} | "
              f"{s['token_wait_ms_per_step']:.3f} | {s['device_forward_ms']:.3f} | {s['device_gap_ms']:.3f} |")  # fmt: skip
    print(f"constrained / free: {out['constrained_over_free']:.3f} (target <= 1.15); "
          f"mixed / free: {out['mixed_over_free']:.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if cuda and args.timeline:  # after the results are out: a diagnostic
        run(bs, traced=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
