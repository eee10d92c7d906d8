#!/usr/bin/env python3
"""Decode-fusion variants of the fast engine side by side, in one process on one GPU (fast/model.py's FUSE_VARIANTS).

For each variant and batch size: ms/step and % of the memory floor (bloom-server bench's own measure: the server's
generate path, medians of --cycles), the first generate's seconds (graph capture, Triton autotuning, torch.compile),
kernels per eager decode step (torch.profiler), and whether its greedy tokens equal the base variant's and
transformers' on the same weights. --micro: each layer GEMM alone at M = 1 and 8 (F.linear with bias, F.linear with no
bias, x @ w^T kept transposed-contiguous, the Triton GEMV), achieved GB/s, weights rotated past the L2 cache.
--long N: bs 1 at an N-token prompt, base against the other variants (the fused attention's long-key case).

    python scripts/fuse_probe.py --shape 7b1 --batch-size 1,8 --micro --long 1000 --json out.json
    python scripts/fuse_probe.py --shape 176b --layers 8 --batch-size 1 --variants base,eager,triton
    python scripts/fuse_probe.py --shape tiny --batch-size 1,2 --new-tokens 6 --cycles 1      # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bloom_server.tools import bench as B  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b1", choices=["560m", "7b1", "176b", "tiny"])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch-size", default="1,8")
    p.add_argument("--variants", default="base,eager,tgemv,tgemv_ln,triton,compile")
    p.add_argument("--compile-batch", default="1", help="batch sizes at which the compile variant runs")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--input-tokens", type=int, default=8)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="no transformers reference")
    p.add_argument("--micro", action="store_true")
    p.add_argument("--long", type=int, default=0, metavar="N")
    p.add_argument("--long-variants", default="base,triton_head")
    p.add_argument("--deadline-s", type=float, default=None)
    p.add_argument("--json")
    return p.parse_args()


def count_kernels(bench, engine, torch, bs: int) -> tuple[int | None, str]:
    """Kernels of one eager decode step of bs rows (profiled), and the most frequent names."""
    if bench.device.type != "cuda":
        return None, ""
    from torch.profiler import ProfilerActivity, profile

    prompts = bench.prompts(bs)
    saved = engine.cuda_graphs
    engine.cuda_graphs = False
    try:
        with torch.inference_mode():
            engine.prefill(list(range(bs)), prompts)
            engine.decode(list(range(bs)))  # warm (autotune, compile)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.decode(list(range(bs)))
                torch.cuda.synchronize()
    finally:
        engine.cuda_graphs = saved
        for s in range(bs):
            engine.release(s)
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kern = [e for e in events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    names: dict[str, int] = {}
    for e in kern:
        names[e.name[:60]] = names.get(e.name[:60], 0) + 1
    top = ", ".join(f"{n} x{c}" for n, c in sorted(names.items(), key=lambda kv: -kv[1])[:8])
    return len(kern), top


def micro(bench, torch) -> list[dict]:
    """Each layer GEMM alone: GB/s of its weight read, per method, M = 1 and 8."""
    import torch.nn.functional as F

    from bloom_server.fast import triton_kernels as tk

    shape, dev, dt = bench.shape, bench.device, bench.dtype
    h = shape.hidden_size
    gemms = {"qkv": (3 * h, h), "dense": (h, h), "fc1": (4 * h, h), "fc2": (h, 4 * h), "lm_head": (shape.vocab_size, h)}
    out = []
    for name, (N, K) in gemms.items():
        nbytes = N * K * dt.itemsize
        copies = max(2, -(-(400 << 20) // nbytes))  # > 400 MB in rotation: no L2 reuse between calls
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws] if name != "lm_head" else None
        b = torch.randn(N, device=dev, dtype=dt) * 0.02
        for M in (1, 8):
            x = torch.randn(M, K, device=dev, dtype=dt)
            methods = {
                "F.linear+bias": lambda w, i: F.linear(x, w, b),
                "F.linear": lambda w, i: F.linear(x, w),
                "x@wT(contig)": (lambda w, i: torch.matmul(x, wts[i])) if wts else None,
                "triton gemv+bias": (lambda w, i: tk.gemv(x, w, b)) if tk.available(dev) else None,
            }
            for mname, fn in methods.items():
                if fn is None:
                    continue
                try:
                    for i in range(copies):  # warm-up (Triton autotuning) outside the capture
                        fn(ws[i], i)
                    torch.cuda.synchronize()
                    # Timed as a CUDA graph replay, as the engine runs them: no launch overhead from Python (a
                    # Triton launch from Python costs more than the kernel itself).
                    reps = 3 * copies
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for r in range(reps):
                            fn(ws[r % copies], r % copies)
                    graph.replay()
                    torch.cuda.synchronize()
                    times = []
                    for _ in range(5):
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                        graph.replay()
                        e1.record()
                        torch.cuda.synchronize()
                        times.append(e0.elapsed_time(e1) / reps)
                    del graph
                    us = 1e3 * statistics.median(times)
                    gbs = nbytes / (us * 1e-6) / 1e9
                    out.append({"gemm": name, "N": N, "K": K, "M": M, "method": mname, "us": us, "GBps": gbs})
                    print(f"micro {name:8s} [{N}x{K}] M={M} {mname:18s} {us:8.1f} us {gbs:7.0f} GB/s", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"micro {name} M={M} {mname}: FAILED {type(exc).__name__}: {exc}", flush=True)
        del ws, wts
        torch.cuda.empty_cache()
    try:  # the configs Triton's autotuner picked, per (N, K, rows) key
        for key, cfg in tk._gemv_kernel.cache.items():
            print(f"micro autotune {key[:3]} -> {cfg}", flush=True)
    except Exception:  # noqa: BLE001
        pass
    return out


def long_check(bench, torch, variants: list[str], L: int, new: int = 24) -> list[dict]:
    """bs 1, an L-token prompt, `new` tokens: ms/step per variant (engine level, medians of 3)."""
    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.sampling import SamplingConfig

    prompt = [tuple(range(10, 10 + L))]
    res = []
    base_tokens = None
    for v in variants:
        e = FastEngine(bench.weights(), bench.shape, max_batch=1, max_seq=L + new)
        e.model.set_fuse(v)

        def run(n):
            B._sync(torch)
            t = time.perf_counter()
            out = e.generate(prompt, n, SamplingConfig(min_new_tokens=n))
            B._sync(torch)
            return time.perf_counter() - t, out.tokens

        run(new)
        full = [run(new) for _ in range(3)]
        pre = [run(1)[0] for _ in range(3)]
        ms = 1e3 * (statistics.median(t for t, _ in full) - statistics.median(pre)) / (new - 1)
        toks = full[-1][1]
        base_tokens = base_tokens or toks
        res.append({"variant": v, "prompt": L, "new": new, "ms_step": ms, "tokens_equal_base": toks == base_tokens})
        print(f"long: prompt {L}, bs 1, {v}: {ms:.2f} ms/step; tokens {'equal' if toks == base_tokens else 'DIFFER'} "
              "vs base", flush=True)  # fmt: skip
        del e
    return res


def main() -> int:
    a = parse()
    argv = ["--random-weights", a.shape, "--batch-size", a.batch_size, "--new-tokens", str(a.new_tokens),
            "--input-tokens", str(a.input_tokens), "--cycles", str(a.cycles), "--backend", "fast"]  # fmt: skip
    if a.layers:
        argv += ["--layers", str(a.layers)]
    if a.deadline_s:
        argv += ["--deadline-s", str(a.deadline_s)]
    bench = B.Bench(B.build_parser().parse_args(argv))
    torch = bench.torch
    torch.manual_seed(0)
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64
    with torch.inference_mode():
        floors = {"bandwidth_gbs": B.measure_bandwidth_gbs(torch, bench.device),
                  "tflops": B.measure_tflops(torch, bench.device, bench.dtype)}  # fmt: skip
    dev = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu"
    print(f"# fuse_probe: {bench.model_dir.model_id}, {bench.dtype}, {dev}, torch {torch.__version__}, bandwidth "
          f"{floors['bandwidth_gbs']:.0f} GB/s; input {a.input_tokens}, new {a.new_tokens}, {a.cycles} cycles",
          flush=True)  # fmt: skip
    try:
        import triton

        print(f"# triton {triton.__version__}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"# triton: not importable ({type(exc).__name__})", flush=True)
    result: dict = {"floors": floors, "rows": [], "micro": [], "long": []}

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2))

    bss = [int(x) for x in a.batch_size.split(",")]
    if not a.no_hf:
        hf, ready = bench.prepare("hf")
        for bs in bss:
            row = bench.measure("hf", hf, ready, bs, floors)
            result["rows"].append({"variant": "transformers", "bs": bs, "ms_step": row.ms_step,
                                   "floor": row.floor_fraction, "first_s": row.generate_s})  # fmt: skip
        del hf
    if a.micro and bench.device.type == "cuda":  # first: its Triton autotuning is what the variants then reuse
        with torch.inference_mode():
            result["micro"] = micro(bench, torch)
        save()
    base_tokens: dict[int, list] = {}
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    variants = [v for v in variants if v != "compile"] + ["LONG"] + [v for v in variants if v == "compile"]
    compile_bs = {int(x) for x in a.compile_batch.split(",")}
    for v in variants:
        if v == "LONG":  # the long-prompt check before the compile variant, whose compiling may use up the time
            if a.long and not bench.past_deadline():
                with torch.inference_mode():
                    result["long"] = long_check(bench, torch, a.long_variants.split(","), a.long)
                save()
            continue
        try:
            fast, ready = bench.prepare("fast")
            fast.engine.model.set_fuse(v)
        except Exception as exc:  # noqa: BLE001
            print(f"# {v}: FAILED to build: {type(exc).__name__}: {exc}", flush=True)
            continue
        for bs in bss:
            if v == "compile" and bs not in compile_bs:
                continue
            if bench.past_deadline():
                print(f"# {v} bs={bs}: skipped, past the deadline", flush=True)
                continue
            try:
                row = bench.measure("fast", fast, ready, bs, floors)
                toks = bench.last_tokens
                if v == "base":
                    base_tokens[bs] = toks
                vs_base = B._compare(toks, base_tokens[bs]) if bs in base_tokens else "-"
                kernels, top = count_kernels(bench, fast.engine, torch, bs)
                rec = {"variant": v, "bs": bs, "ms_step": row.ms_step, "floor": row.floor_fraction,
                       "floor_ms": row.floor_ms, "first_s": row.generate_s, "kernels_per_step": kernels,
                       "top_kernels": top, "vs_base": vs_base, "vs_hf": row.tokens_equal_hf or "-"}  # fmt: skip
                result["rows"].append(rec)
                print(f"## {v} bs={bs}: {row.ms_step:.2f} ms/step, {100 * row.floor_fraction:.1f}% of floor, first "
                      f"generate {row.generate_s:.1f} s, {kernels} kernels/eager step; vs base: {vs_base}; vs hf: "
                      f"{rec['vs_hf']}\n##   {top}", flush=True)  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                print(f"# {v} bs={bs}: FAILED: {type(exc).__name__}: {exc}", flush=True)
                result["rows"].append({"variant": v, "bs": bs, "error": f"{type(exc).__name__}: {exc}"[:300]})
            save()
        del fast
    print("\n| shape | bs | variant | ms/step | % of floor | first generate s | kernels/step | greedy vs base | greedy vs hf |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {bench.model_dir.model_id} | {r['bs']} | {r['variant']} | FAILED: {r['error'][:80]} | | | | | |")
            continue
        print(f"| {bench.model_dir.model_id} | {r['bs']} | {r['variant']} | {r['ms_step']:.2f} | "
              f"{100 * r['floor']:.1f}% | {r['first_s']:.1f} | {r.get('kernels_per_step') or '-'} | "
              f"{r.get('vs_base', '-')} | {r.get('vs_hf', '-')} |")  # fmt: skip
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
