#!/usr/bin/env python3
"""The fast engine's prefill alone (fast/engine.py `prefill`), per case, against the GEMMs' throughput: how long a
burst of prompts, a long prompt and a chunk after cached keys take on the device, the TFLOPS that makes, and (with
`--profile`) where the device time goes, kernel by kernel (torch.profiler, CUDA time).

Cases (random weights of the shape, fp16 on a GPU):
  wave       64 prompts of 16-256 tokens (seeded, as the standard load draws them): the first wave of a burst
  long       one 1,500-token prompt (the long joiner)
  chunkN     one N-token chunk after 1,000 positions already in the slot (a chunked prefill's later piece)
  linear     the wave's packed tokens through one layer's four linear layers, 30 times: cuBLAS's share alone
  stepwave   the wave as the server takes it: 64 rows added to a fresh scheduler (fast/rows.py RowScheduler, with a
             prefix cache as the server has on a GPU), one step: admission, the prefill, the first tokens read, the
             first decode queued. Its time beyond `wave` is the step's own; `--profile` lists its top host time.
  stepjoin   the long joiner as the server takes it: 63 rows decoding, then the 1,500-token prompt joins under a step
             budget (`--step-tokens`, the server's --prefill-step-tokens; 0: in one step); prints the live rows'
             step times before and during the join (the "largest gap / median" of the joiner load); `--profile`
             lists the top host time of the join's steps.

    python3 scripts/bench/prefill_profile.py --shape 7b1 --profile
    python3 scripts/bench/prefill_profile.py --shape tiny --repeats 1      # a CPU dry run
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["tiny", "560m", "7b1"], default="7b1")
    p.add_argument("--layers", type=int, default=None, help="this many layers of the shape (default: all)")
    p.add_argument("--count-ops", action="store_true",
                   help="then each case's aten calls once (torch.profiler on the host): the kernels it launches")  # fmt: skip
    p.add_argument("--cases", default="wave,stepwave,long,chunk512,chunk256,chunk128,linear")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="then the top kernels of one wave and one long prefill")
    p.add_argument(
        "--attention",
        default="sdpa,eager",
        help="the prefill attentions to time (fast/model.py); the first is profiled",
    )
    p.add_argument("--cache-mb", type=int, default=2048, help="stepwave's prefix cache (0: none)")
    p.add_argument("--step-tokens", type=int, default=320, help="stepjoin's step budget (0: unchunked)")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.prefix_cache import PrefixCache
    from bloom_server.fast.rows import Request, RowScheduler
    from bloom_server.fast.sampling import SamplingConfig
    from bloom_server.fast.shapes import PRESETS, BloomShape
    from bloom_server.fast.weights import random_weights

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    shape = PRESETS[args.shape] if args.shape in PRESETS else BloomShape(2048, 64, 2, 4)  # tiny: the embedded model's
    if args.layers:
        shape = BloomShape(shape.vocab_size, shape.hidden_size, args.layers, shape.n_head)
    t0 = time.perf_counter()
    w = random_weights(shape, None, dtype=dtype, device=dev, seed=0)
    eng = FastEngine(w, shape, max_batch=64, max_seq=1600)
    print(f"device {torch.cuda.get_device_name(0) if cuda else 'cpu'}, shape {args.shape}, weights in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    rng = random.Random(0)
    vocab = min(shape.vocab_size, 250_000)
    wave = [[rng.randrange(10, vocab) for _ in range(rng.randint(16, 256))] for _ in range(64)]
    long = [[rng.randrange(10, vocab) for _ in range(1500)]]
    block_params = sum(t.numel() for t in (w.layers[0].qkv_w, w.layers[0].dense_w, w.layers[0].fc1_w,
                                           w.layers[0].fc2_w)) * shape.n_layer  # fmt: skip

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, repeats: int) -> float:
        fn()
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    def report(name: str, att: str, ms: float, tokens: int) -> None:
        tflops = 2 * block_params * tokens / (ms / 1e3) / 1e12
        print(f"| {name} | {att} | {tokens} | {ms:.2f} | {tflops:.0f} |")

    runs = {}

    def run_wave() -> None:
        eng.prefill(list(range(64)), wave)

    def run_long() -> None:
        eng.prefill([0], long)

    runs["wave"] = (run_wave, sum(map(len, wave)))
    runs["long"] = (run_long, 1500)
    for case in args.cases.split(","):
        if case.startswith("chunk"):
            size = int(case[5:])
            chunk = [long[0][1000 : 1000 + size]]
            runs[case] = ((lambda c=chunk: (eng.hold(0, 1000), eng.prefill([0], c, [1000]))), size)
    packed = sum(map(len, wave))
    x = torch.randn(packed, shape.hidden_size, dtype=dtype, device=dev)
    lw = w.layers[0]

    def run_linear() -> None:
        for _ in range(shape.n_layer):
            F.linear(x, lw.qkv_w, lw.qkv_b)
            F.linear(x, lw.dense_w, lw.dense_b)
            mid = F.linear(x, lw.fc1_w, lw.fc1_b)
            F.linear(mid, lw.fc2_w, lw.fc2_b)

    runs["linear"] = (run_linear, packed)
    cache = PrefixCache(eng, args.cache_mb << 20) if args.cache_mb and "stepwave" in args.cases else None

    def run_step_wave() -> None:
        sched = RowScheduler(eng, prefix_cache=cache)
        for i, prompt in enumerate(wave):
            sched.add(Request(rid=i, prompt=tuple(prompt), max_new_tokens=4, cfg=SamplingConfig(eos_ids=(2,))))
        sched.step()  # reads the wave's first tokens; its first decode is queued
        assert len(sched.out_firsts) == len(wave), len(sched.out_firsts)
        sync()
        for slot in range(len(wave)):
            eng.release(slot)
        if cache is not None:  # every repeat a cold wave, as a server's first
            cache.__init__(eng, args.cache_mb << 20)

    runs["stepwave"] = (run_step_wave, packed)
    join_steps: list[float] = []  # the latest stepjoin's step times during the join, ms

    def run_step_join(around_join=contextlib.nullcontext) -> None:
        sched = RowScheduler(eng, step_tokens=args.step_tokens)
        for i in range(63):
            sched.add(Request(rid=i, prompt=tuple(wave[i][:32]), max_new_tokens=400, cfg=SamplingConfig()))
        for _ in range(12):  # all in, decoding, the decode's graphs captured
            sched.step()
        before = []
        for _ in range(8):
            t = time.perf_counter()
            sched.step()
            before.append((time.perf_counter() - t) * 1e3)
        sched.add(Request(rid="joiner", prompt=tuple(long[0]), max_new_tokens=4, cfg=SamplingConfig()))
        join_steps.clear()
        with around_join():
            while not any(r.rid == "joiner" for r in sched.live) and len(join_steps) < 40:
                t = time.perf_counter()
                sched.step()
                join_steps.append((time.perf_counter() - t) * 1e3)
            for _ in range(2):  # the joiner's first decode
                t = time.perf_counter()
                sched.step()
                join_steps.append((time.perf_counter() - t) * 1e3)
            sync()
        med = statistics.median(before)
        print(f"stepjoin (budget {args.step_tokens}): step before the join {med:.1f} ms (median); during it "
              f"{', '.join(f'{x:.1f}' for x in join_steps)}; largest / median {max(join_steps) / med:.2f}")  # fmt: skip
        for slot in range(64):
            eng.release(slot)

    runs["stepjoin"] = (run_step_join, len(long[0]))
    attentions = args.attention.split(",")
    print("| case | attention | tokens | ms (median) | block TFLOPS |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for case in args.cases.split(","):
            fn, tokens = runs[case]
            for att in attentions if case != "linear" else attentions[:1]:
                eng.model.prefill_attention = att
                if case == "stepjoin":  # it prints its own steps
                    for _ in range(args.repeats):
                        fn()
                    continue
                report(case, att, timed(fn, args.repeats), tokens)
        if len(attentions) > 1:  # the same wave's last logits under each attention
            outs = {}
            for att in attentions:
                eng.model.prefill_attention = att
                outs[att] = eng.prefill(list(range(64)), wave).float()
            a, b = outs[attentions[0]], outs[attentions[1]]
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            print(f"wave's last logits, {attentions[1]} against {attentions[0]}: max abs diff "
                  f"{(a - b).abs().max().item():.4g}, argmax agreement {agree:.3f}")  # fmt: skip
        eng.model.prefill_attention = attentions[0]
        if args.count_ops:
            from torch.profiler import ProfilerActivity, profile

            views = ("view", "as_strided", "transpose", "reshape", "select", "expand", "t", "permute", "slice",
                     "unsqueeze", "resolve_conj", "detach_", "lift_fresh", "alias", "_unsafe_view", "empty",
                     "empty_strided", "empty_like", "linear", "layer_norm", "index_put_", "matmul", "to", "_to_copy",
                     "scaled_dot_product_attention")  # fmt: skip  # wrappers and views: no kernel of their own
            for case in args.cases.split(","):
                if case == "stepjoin":  # many steps: its step times are its report
                    continue
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    runs[case][0]()
                    sync()
                counts = {e.key[6:]: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
                kernels = {k: v for k, v in counts.items() if k not in views}
                top = ", ".join(f"{k} {v}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:8])
                print(f"ops {case}: {sum(counts.values())} aten calls, {sum(kernels.values())} computing ({top})")
        if args.profile and cuda:
            from torch.profiler import ProfilerActivity, profile

            for case in ("wave", "long", "chunk512", "stepwave", "stepjoin"):
                if case not in runs or case not in args.cases.split(","):
                    continue
                fn = runs[case][0]
                acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
                if case == "stepjoin":  # the join's steps alone
                    prof = profile(activities=acts)
                    fn(lambda p=prof: p)
                else:
                    fn()
                    sync()
                    with profile(activities=acts) as prof:
                        fn()
                        sync()
                host = case.startswith("step")  # a scheduler's step: its host side
                print(f"\n## {case}: top {'host' if host else 'device'} time")
                print(prof.key_averages().table(sort_by="cpu_time_total" if host else "cuda_time_total",
                                                row_limit=24 if host else 14, max_name_column_width=60))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
