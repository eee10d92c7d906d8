#!/usr/bin/env python3
"""Probe: does DeepSpeed 0.19.8's kernel-injected BLOOM run int8 once its accelerator's dtype guard admits int8?

0.19.8's InferenceEngine refuses torch.int8 because the CUDA accelerator's `supported_dtypes()` lists only fp32/fp16/
bf16, while the transformer_inference op still carries the int8 paths (quantized_gemm/dequantize). This widens the
guard for one process and compares int8 with fp16 on the same random weights: greedy tokens, logits error, and
argmax agreement under forced decoding. Run on a GPU after scripts/gpu_check.sh's setup (wheels in /tmp/site).

    python3 scripts/gpu_int8_probe.py MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    model_dir = sys.argv[1]
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29577")):
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    acc = get_accelerator()
    base = acc.supported_dtypes
    acc.supported_dtypes = lambda: base() + [torch.int8]

    torch.manual_seed(0)
    prompts = torch.randint(5, 1000, (4, 8), device="cuda")
    mask = torch.ones_like(prompts)
    result: dict = {}
    ref = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float16).cuda().eval()
    with torch.no_grad():
        ref_out = ref.generate(prompts, attention_mask=mask, max_new_tokens=50, min_new_tokens=50, do_sample=False,
                               pad_token_id=3, output_scores=True, return_dict_in_generate=True)
    ref_logits = torch.stack(ref_out.scores).float()
    del ref
    torch.cuda.empty_cache()
    for dtype in (torch.float16, torch.int8):
        name = str(dtype).replace("torch.", "")
        try:
            t = time.time()
            model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float16).eval()
            eng = deepspeed.init_inference(model, dtype=dtype, tensor_parallel={"tp_size": 1},
                                           replace_with_kernel_inject=True, max_tokens=1024)
            m = eng.module
            load_s = time.time() - t
            with torch.no_grad():
                out = m.generate(prompts, attention_mask=mask, max_new_tokens=50, min_new_tokens=50, do_sample=False,
                                 pad_token_id=3, output_scores=True, return_dict_in_generate=True)
                logits = torch.stack(out.scores).float()
                same = (out.sequences == ref_out.sequences).all(dim=1).tolist()
                torch.cuda.synchronize()
                t = time.time()
                m.generate(prompts[:1], attention_mask=mask[:1], max_new_tokens=50, min_new_tokens=50,
                           do_sample=False, pad_token_id=3)
                torch.cuda.synchronize()
                ms = (time.time() - t) * 1000 / 50
            rel = float((logits - ref_logits).norm() / ref_logits.norm())
            result[name] = {"ok": True, "rows_same_as_fp16_hf": same, "free_run_logits_rel_err": rel,
                            "load_s": round(load_s, 1), "ms_per_step_bs1": round(ms, 2),
                            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
            del eng, m, model
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - the probe reports, it does not stop
            result[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print("INT8_PROBE " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
