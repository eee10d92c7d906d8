#!/usr/bin/env python3
"""The int8 kernels alone, per row count: the gemv and the tiled GEMM (fast/triton_kernels.py) on each linear layer of
the decode step (the model's own plan: qkv, dense, fc1, fc2, the head), against cuBLAS on the fp16 weight, L2 flushed
before each timed call (a step reads every weight from HBM). Per row count: one decode step's worth of each kernel
(n_layer x the block's four layers + the head), each kernel's largest error against fp32 over the dequantized
weights, and the row count from which the GEMM stays ahead (what GEMM_MIN_ROWS is set from).

    python scripts/bench/int8_gemm.py --shape 7b1 --rows 1,8,16,32,64,128,256 --json out.json
    TRITON_INTERPRET=1 python scripts/bench/int8_gemm.py --shape tiny --rows 1,17     # a CPU dry run (no timings)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["tiny", "560m", "7b1", "176b"], default="tiny")
    p.add_argument("--rows", default="1,8,16,32,64,128,256")
    p.add_argument("--deadline-s", type=float, default=None, help="skip the row counts that would start after this")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from bloom_server.fast import triton_kernels as tk
    from bloom_server.fast.fusion import FUSE_VARIANTS
    from bloom_server.fast.shapes import PRESETS, BloomShape

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    shape = PRESETS.get(args.shape) or BloomShape(301, 64, 2, 4)
    rows = [int(r) for r in args.rows.split(",")]
    plan = tk.decode_plan(hidden=shape.hidden_size, n_head=shape.n_head, vocab_size=shape.vocab_size, world=1,
                          dtype="float16", max_batch=max(rows), max_seq=64, fuse=frozenset(FUSE_VARIANTS["triton_head"]),
                          quant=True)  # fmt: skip
    g = torch.Generator(device=dev).manual_seed(0)
    layers = {}
    for c in plan.gemvs:
        q = torch.randint(-127, 128, (c.N, c.K), dtype=torch.int8, device=dev, generator=g)
        s = torch.rand(c.N, device=dev, generator=g) * 1e-3 + 1e-4
        layers[c.name] = (c, q, s, (q.float() * s[:, None]).half(), torch.randn(c.N, device=dev, generator=g).half())
    count = {c.name: (1 if c.name == "head" else shape.n_layer) for c in plan.gemvs}

    def timed(fn) -> float:
        if not cuda:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=20) / 1e3

    out: dict = {"shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu", "rows": []}
    print("| rows | fp16 cuBLAS ms/step | int8 gemv ms/step | int8 gemm ms/step | gemv/fp16 | gemm/fp16 | "
          "max rel err gemv / gemm |\n|---|---|---|---|---|---|---|", flush=True)  # fmt: skip
    with torch.inference_mode():
        for m in rows:
            if args.deadline_s is not None and time.perf_counter() - t0 > args.deadline_s:
                print(f"| {m} | skipped (deadline) |", flush=True)
                continue
            r: dict = {"rows": m, "ms": {"fp16": 0.0, "gemv": 0.0, "gemm": 0.0}, "err": {}, "layers": {}}
            for name, (c, q, s, w16, b) in layers.items():
                x = torch.randn(m, c.K, device=dev, generator=g).half()
                ref = x.float() @ (q.float() * s[:, None]).T + b.float()
                times = {"fp16": timed(lambda x=x, w16=w16, b=b: F.linear(x, w16, b))}
                for kind in ("gemv", "gemm"):
                    tk.set_int8_kernel(kind)
                    y = tk.gemv(x, q, b, scale=s)
                    err = float((y.float() - ref).abs().max() / ref.abs().max())
                    r["err"][kind] = max(r["err"].get(kind, 0.0), err)
                    times[kind] = timed(lambda x=x, q=q, b=b, s=s: tk.gemv(x, q, b, scale=s))
                tk.set_int8_kernel("auto")
                r["layers"][name] = {k: 1e3 * v for k, v in times.items()}
                for k, v in times.items():
                    r["ms"][k] += 1e3 * v * count[name]
            out["rows"].append(r)
            ms = r["ms"]
            print(f"| {m} | {ms['fp16']:.3f} | {ms['gemv']:.3f} | {ms['gemm']:.3f} | {ms['gemv'] / ms['fp16']:.3f} | "
                  f"{ms['gemm'] / ms['fp16']:.3f} | {r['err']['gemv']:.1e} / {r['err']['gemm']:.1e} |", flush=True)  # fmt: skip
    # The GEMM's row count: the smallest measured from which the GEMM is ahead of the gemv at every larger one.
    ahead = [r["rows"] for r in out["rows"] if r["ms"]["gemm"] < r["ms"]["gemv"]]
    lead = None
    for r in reversed(out["rows"]):
        if r["rows"] not in ahead:
            break
        lead = r["rows"]
    out["gemm_ahead_from"] = lead
    out["seconds"] = time.perf_counter() - t0
    worst = max((max(r["err"].values()) for r in out["rows"]), default=0.0)
    print(f"\nKERNELS {args.shape}: the GEMM ahead of the gemv from {lead} rows on (GEMM_MIN_ROWS is "
          f"{tk.GEMM_MIN_ROWS}); worst relative error {worst:.1e}; {out['seconds']:.0f} s", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
