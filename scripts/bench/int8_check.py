#!/usr/bin/env python3
"""The quantization error of the fast engine's weight-only int8 against the floating engine (fp16 on a GPU) on the
same random weights: relative logit error and forced-decoding argmax agreement (both engines fed the floating engine's
greedy tokens, so one early difference does not derail the rest), with the embedding (the tied head) int8 as served
and, for comparison, kept fp16; plus each variant's resident weight bytes.

    python scripts/bench/int8_check.py --shape 7b1 --json out.json
    python scripts/bench/int8_check.py --shape 176b --layers 2 --json out.json    # the 176B layer shape
    python scripts/bench/int8_check.py --shape tiny                                # a CPU dry run

On a GPU the activations are fp16 and the decode steps run the int8 Triton kernels (CUDA graphs off: the same
kernels, eager launches); on a CPU fp32 and the eager path.
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
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import random

    import torch

    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.quant import forced_decoding_error, quantize_weights
    from bloom_server.fast.shapes import PRESETS, BloomShape
    from bloom_server.fast.weights import random_weights

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    shape = PRESETS.get(args.shape) or BloomShape(2048, 64, 2, 4)
    shape = shape.with_layers(args.layers) if args.layers else shape
    rng = random.Random(1234)
    prompts = [[rng.randrange(10, shape.vocab_size) for _ in range(args.prompt_tokens)] for _ in range(args.rows)]
    seq = args.prompt_tokens + args.steps + 1
    t0 = time.perf_counter()

    def engine(w):
        return FastEngine(w, shape, max_batch=args.rows, max_seq=seq, cuda_graphs=False)

    out: dict = {"shape": args.shape, "layers": shape.n_layer, "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "activations": str(dtype).replace("torch.", "")}  # fmt: skip
    with torch.inference_mode():
        ref = engine(random_weights(shape, None, dtype=dtype, device=device, seed=0))
        out["ref_weight_bytes"] = ref.model.w.nbytes()
        for name, emb in (("int8", True), ("int8_fp16_head", False)):
            w = quantize_weights(random_weights(shape, None, dtype=dtype, device=device, seed=0), embedding=emb)
            if cuda:
                torch.cuda.empty_cache()
            eng = engine(w)
            r = forced_decoding_error(ref, eng, prompts, args.steps)
            r.pop("errors")
            r["weight_bytes"] = w.nbytes()
            r["bytes_vs_ref"] = w.nbytes() / out["ref_weight_bytes"]
            out[name] = r
            print(f"# {args.shape} ({shape.n_layer} layers) {name}: {r['weight_bytes'] / 1e9:.2f} GB "
                  f"({r['bytes_vs_ref']:.3f}x the reference); forced decoding {r['rows']} rows x {r['steps']} steps: argmax "
                  f"agreement {100 * r['argmax_agreement']:.1f}%, relative logit error mean "
                  f"{r['rel_logit_error_mean']:.4f} max {r['rel_logit_error_max']:.4f}", flush=True)  # fmt: skip
            del eng, w
    out["seconds"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
