"""Decode attention on a GPU: the fused Triton kernel (fast/triton_kernels.py decode_attention, which reads each row's
own keys) against the eager chain (fast/model.py _decode_attend: scatter, baddbmm with the ALiBi bias, softmax, bmm
over the whole key bucket), each captured as a CUDA graph of one layer's call and replayed, over batch sizes, key
buckets and two spreads of row lengths: every row at the bucket's end ("full") and lengths uniform in the bucket
("mixed", what a continuous batch of mixed requests holds). Prints a table of microseconds per layer call, the
largest difference of the two outputs, and each one's largest difference from the same math in fp32, and the smallest (row, head) count from which the fused kernel wins at every
bucket (fast/model.py's ATTN_WIDE_PROGRAMS uses it).

    python scripts/attn_probe.py [--heads 32] [--head-dim 128] [--batch 1,4,8,16,32,64,128] [--keys 128,256,512,1024]
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv: list[str] | None = None) -> int:
    import torch

    from bloom_server.fast import triton_kernels as tk
    from bloom_server.fast.model import BloomRankModel, alibi_slopes

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", default="1,4,8,16,32,64,128")
    p.add_argument("--keys", default="128,256,512,1024")
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attn_probe: needs a GPU", file=sys.stderr)
        return 2
    dev, dt = torch.device("cuda"), torch.float16
    hp, D = a.heads, a.head_dim
    batches = [int(x) for x in a.batch.split(",")]
    keys = [int(x) for x in a.keys.split(",")]
    bmax, smax = max(batches), max(keys)
    m = types.SimpleNamespace(hp=hp, D=D, inv_norm=1.0 / math.sqrt(D), heads=torch.arange(hp, device=dev),
                              slopes=alibi_slopes(hp).to(dev), dtype=dt, device=dev)  # fmt: skip
    m._attend = lambda q, k, v, b: BloomRankModel._attend(m, q, k, v, b)
    g = torch.Generator(device=dev).manual_seed(0)
    kc = torch.randn(bmax, hp, smax, D, device=dev, dtype=dt, generator=g)
    vc = torch.randn(bmax, hp, smax, D, device=dev, dtype=dt, generator=g)
    print(f"# attn_probe: {torch.cuda.get_device_name(dev)}, {hp} heads x {D}, fp16, one layer's call as a CUDA graph, "
          f"median of 5 x {a.iters} replays")  # fmt: skip
    print("| spread | B | S | B x heads | eager us | fused us | fused / eager | max abs diff | eager vs fp32 | fused vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    m32 = types.SimpleNamespace(**{**vars(m), "dtype": torch.float32})
    m32._attend = lambda q, k, v, b: BloomRankModel._attend(m32, q, k, v, b)
    wins: dict[int, bool] = {}
    for spread in ("full", "mixed"):
        for B in batches:
            for S in keys:
                if spread == "full":
                    pos = torch.full((B,), S - 1, device=dev, dtype=torch.long)
                else:
                    pos = torch.randint(0, S, (B,), device=dev, generator=g)
                qkv = torch.randn(B, hp * 3 * D, device=dev, dtype=dt, generator=g)
                rows = torch.arange(B, device=dev)
                bias = BloomRankModel.decode_bias(m, pos, S)
                k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()

                def eager():
                    return BloomRankModel._decode_attend(m, qkv, k1, v1, rows, pos, S, True, bias)

                def fused():
                    return tk.decode_attention(qkv, k2, v2, pos, m.slopes, S, m.inv_norm, hp, D)

                times, outs = {}, {}
                for name, fn in (("eager", eager), ("fused", fused)):
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        for _ in range(2):
                            outs[name] = fn()
                    torch.cuda.current_stream().wait_stream(s)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        outs[name] = fn()
                    runs = []
                    for _ in range(5):
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                        for _ in range(a.iters):
                            graph.replay()
                        e1.record()
                        torch.cuda.synchronize()
                        runs.append(e0.elapsed_time(e1) * 1e3 / a.iters)
                    times[name] = sorted(runs)[2]
                diff = (outs["eager"].float() - outs["fused"].float()).abs().max().item()
                ref = BloomRankModel._decode_attend(m32, qkv.float(), kc[:B].float(), vc[:B].float(), rows, pos, S, True,
                                                    bias.float())  # fmt: skip (the fp16 ALiBi bias, as both use it)
                e32 = (outs["eager"].float() - ref).abs().max().item()
                f32 = (outs["fused"].float() - ref).abs().max().item()
                r = times["fused"] / times["eager"]
                if spread == "mixed":
                    wins[B * hp] = wins.get(B * hp, True) and r < 1.0
                print(f"| {spread} | {B} | {S} | {B * hp} | {times['eager']:.1f} | {times['fused']:.1f} | {r:.2f} | "
                      f"{diff:.2e} | {e32:.2e} | {f32:.2e} |")  # fmt: skip
    ok = [n for n in sorted(wins) if all(wins[k] for k in wins if k >= n)]
    print(f"fused wins at every key bucket (mixed lengths) from {ok[0] if ok else 'never'} (row, head) programs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
